import json
import math

import pytest
import torch

import attention_sinks as sinks
import common.stats
from common.config import lookup, parse
from common.dit import TinyDiT, attention_hook, attention_ref
from common.sampler import sample_labels

N_CTX = 5  # BOS + 4 label tokens, as in the models the script loads


def qkv(B=3, H=2, N=13, Dh=8, seed=0, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = [torch.randn(B, H, N, Dh, generator=g) for _ in range(3)]
    return sharp * q, k, v  # sharp > 1: peaked attention, so the sinks carry real mass


def trained_like_model(depth=2):
    """A small TinyDiT with random (non-zero) adaLN weights, so every attention call matters."""
    torch.manual_seed(0)
    model = TinyDiT(img_size=8, patch=4, width=32, depth=depth, heads=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


# --- the intervention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sinks.PATHS)
@pytest.mark.parametrize("control", ["sink", "random"])
@pytest.mark.parametrize("selection", sinks.SELECTIONS)
def test_k0_intervention_is_the_identity_bit_for_bit(path, control, selection):
    q, k, v = qkv()
    for rows in ("all", "image"):
        out, *_ = sinks.sink_attention(q, k, v, N_CTX, 0, path, control, selection=selection, rows=rows,
                                       generator=torch.Generator().manual_seed(1))
        assert torch.equal(out, attention_ref(q, k, v))
    model = trained_like_model()  # ... and through the model's hook, over a whole sampling trajectory
    y = torch.arange(4) % 9
    with attention_hook(model, lambda q, k, v, layer: attention_ref(q, k, v)):
        ref = sample_labels(model, y, 3)
    hook = sinks.SinkHook(model.n_ctx, sinks.Removal((0, 1), 0, path, selection), control, seed=3)
    with attention_hook(model, hook):
        assert torch.equal(sample_labels(model, y, 3), ref)


class Spy:
    """Wraps a hook and records which layers' attention outputs differ from plain attention."""

    def __init__(self, hook):
        self.hook, self.edited = hook, set()

    def __call__(self, q, k, v, layer):
        out = self.hook(q, k, v, layer)
        if not torch.equal(out, attention_ref(q, k, v)):
            self.edited.add(layer)
        return out


@pytest.mark.parametrize("layers", [(1,), (0, 2)])
def test_the_hook_edits_only_the_chosen_layers(layers):
    model = trained_like_model(depth=3)
    y = torch.arange(4) % 9
    with attention_hook(model, sinks.SinkHook(model.n_ctx)):
        ref = sample_labels(model, y, 3)
    for control in ("sink", "random"):
        spy = Spy(sinks.SinkHook(model.n_ctx, sinks.Removal(layers, 1), control))
        with attention_hook(model, spy):
            assert not torch.equal(sample_labels(model, y, 3), ref)  # k = 1 does change the samples
        assert spy.edited == set(layers)


@pytest.mark.parametrize("path", sinks.PATHS)
@pytest.mark.parametrize("first_row", [0, N_CTX])
def test_remove_keys_agrees_with_its_slow_twin(path, first_row):
    q, k, v = qkv(B=2, H=3, N=11, sharp=3.0)
    g = torch.Generator().manual_seed(5)
    for selection in sinks.SELECTIONS:
        sel = sinks.choose_keys(torch.rand(2, 3, 11, generator=g), 2, "sink", selection)
        out, probs = sinks.remove_keys(q, k, v, sel, path, first_row)
        assert torch.allclose(out, sinks.remove_keys_ref(q, k, v, sel, path, first_row), atol=1e-5)
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:3]), atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_score_path_removes_each_heads_top_k_for_every_query_row(k):
    q, k_, v = qkv(N=13, sharp=3.0)
    _, before = attention_ref(q, k_, v, return_probs=True)
    out, probs, sel, mass = sinks.sink_attention(q, k_, v, N_CTX, k, "score", "sink")  # default: rows="all"
    by_hand = before[:, :, N_CTX:].mean(2)  # incoming mass from the image rows only
    assert torch.allclose(mass, by_hand)
    assert torch.equal(sel, torch.zeros_like(sel).scatter_(-1, by_hand.topk(k, -1).indices, True))  # the top-k
    assert probs.masked_select(sel[:, :, None, :].expand_as(probs)).abs().max() < 1e-6  # context rows too
    ref = before.masked_fill(sel[:, :, None, :], 0)  # the kept keys keep their relative weights
    assert torch.allclose(probs, ref / ref.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(out, probs @ v, atol=1e-6)


def test_image_rows_option_leaves_the_context_rows_untouched():
    q, k, v = qkv(N=13, sharp=3.0)
    _, before = attention_ref(q, k, v, return_probs=True)
    for selection in ("per_head", "union"):
        _, probs, sel, _ = sinks.sink_attention(q, k, v, N_CTX, 1, "score", "sink", selection=selection, rows="image")
        assert torch.equal(probs[:, :, :N_CTX], before[:, :, :N_CTX])  # the processor class's behaviour
        img = probs[:, :, N_CTX:]
        assert img.masked_select(sel[:, :, None, :].expand_as(img)).abs().max() < 1e-6
        assert not torch.allclose(probs[:, :, N_CTX:], before[:, :, N_CTX:])


def test_union_removes_the_top_kH_of_the_head_average_in_every_head():
    q, k, v = qkv(B=3, H=4, N=21, sharp=3.0)
    _, before = attention_ref(q, k, v, return_probs=True)
    avg = before[:, :, N_CTX:].mean(2).mean(1)  # (B, Nk) by hand
    for kk in (1, 2, 4):
        _, probs, sel, _ = sinks.sink_attention(q, k, v, N_CTX, kk, "score", "sink", selection="union")
        assert torch.equal(sel, sel[:, :1].expand_as(sel))  # one key set shared by the heads
        for b in range(3):
            assert set(sel[b, 0].nonzero().flatten().tolist()) == set(avg[b].topk(kk * 4).indices.tolist())
        assert probs.masked_select(sel[:, :, None, :].expand_as(probs)).abs().max() < 1e-6  # every head and row
    g = torch.Generator().manual_seed(0)
    draws = [sinks.choose_keys(torch.rand(3, 4, 21), 2, "random", "union", g) for _ in range(10)]
    for d in draws:
        assert torch.equal(d, d[:, :1].expand_as(d)) and torch.equal(d.sum(-1), torch.full((3, 4), 8))
    assert len({tuple(d[0, 0].nonzero().flatten().tolist()) for d in draws}) > 1  # redrawn at every call


def test_per_head_random_control_respects_the_budget_redraws_and_covers_every_key():
    g = torch.Generator().manual_seed(0)
    mass = torch.rand(4, 3, 21)
    for k in (0, 1, 2, 8):
        for _ in range(5):
            assert torch.equal(sinks.choose_keys(mass, k, "random", generator=g).sum(-1), torch.full((4, 3), k))
    ones = torch.stack([sinks.choose_keys(mass, 1, "random", generator=g) for _ in range(20)])
    assert len({tuple(s.nonzero()[:, -1].tolist()) for s in ones}) > 1  # a new draw at every call
    assert not torch.equal(ones[:, :, 0], ones[:, :, 1])  # heads draw their own keys ...
    assert ones.any(0).any(0).any(0).sum() >= 18  # ... uniformly: over 240 draws most of the 21 keys appear


def test_both_equals_the_score_path_when_every_row_is_masked():
    q, k, v = qkv(sharp=3.0)
    for selection in ("per_head", "union"):
        a = sinks.sink_attention(q, k, v, N_CTX, 1, "score", selection=selection)[0]
        assert torch.equal(a, sinks.sink_attention(q, k, v, N_CTX, 1, "both", selection=selection)[0])
        c = sinks.sink_attention(q, k, v, N_CTX, 1, "both", selection=selection, rows="image")[0]
        assert not torch.equal(a, c)  # the context rows read the zeroed value when only image rows are masked


def test_value_paths_replace_the_sinks_values_for_every_query():
    q, k, v = qkv()
    _, probs0 = attention_ref(q, k, v, return_probs=True)
    for path, repl in (("value_zero", torch.zeros_like(v)), ("value_mean", v.mean(2, keepdim=True).expand_as(v))):
        out, probs, sel, _ = sinks.sink_attention(q, k, v, N_CTX, 2, path, "sink")
        assert torch.equal(probs, probs0)  # scores untouched
        assert torch.allclose(out, probs0 @ torch.where(sel[..., None], repl, v), atol=1e-6)


def test_fixed_selection_is_the_first_k_keys_in_every_head():
    q, k, v = qkv(B=2, H=3, N=13)
    _, probs0 = attention_ref(q, k, v, return_probs=True)
    out, _, sel, _ = sinks.sink_attention(q, k, v, N_CTX, 1, "value_zero", "sink", selection="fixed")
    assert sel[..., 0].all() and sel.sum() == 2 * 3  # index 0 only: the BOS
    v_ref = v.clone()
    v_ref[:, :, 0] = 0
    assert torch.allclose(out, probs0 @ v_ref, atol=1e-6)
    assert torch.equal(sinks.choose_keys(torch.rand(2, 3, 13), 3, selection="fixed")[..., :3].sum(), torch.tensor(18))
    g = torch.Generator().manual_seed(0)
    rand = torch.stack([sinks.choose_keys(torch.rand(2, 3, 13), 1, "random", "fixed", g) for _ in range(30)])
    assert torch.equal(rand, rand[:, :, :1].expand_as(rand))  # one key, shared by the heads
    assert rand[:, 0, 0].any(0).sum() > 5  # not the BOS every time: uniform over the keys


def test_bad_names_raise():
    q, k, v = qkv()
    for kw in (dict(path="scores"), dict(control="sinks"), dict(selection="both"), dict(rows="text")):
        args = dict(path="score", control="sink", selection="per_head", rows="all") | kw
        with pytest.raises(ValueError):
            sinks.sink_attention(q, k, v, N_CTX, 1, args.pop("path"), args.pop("control"), **args)


# --- the measurements ----------------------------------------------------------------------------------


def test_the_statistics_are_the_shared_tested_ones():  # tests/test_common_stats.py checks them against oracles
    assert sinks.bootstrap_ci is common.stats.bootstrap_ci and sinks.sign_flip_p is common.stats.sign_flip_p
    assert sinks.holm is common.stats.holm


def test_paired_effect_on_hand_built_runs():
    """Feature vectors on the unit circle: the baseline at angle 0, the sink run at angle a, the random run at b,
    so the paired distances are 2 sin(a / 2) and 2 sin(b / 2) exactly."""
    n = 8
    at = lambda angle: torch.stack([torch.cos(angle), torch.sin(angle)], 1)  # noqa: E731
    a, b = torch.full((n,), 1.0), torch.full((n,), 0.25)
    correct = torch.ones(n)
    base = dict(x=torch.zeros(n, 1, 2, 2), feat=at(torch.zeros(n)), correct=correct)
    sink = dict(x=torch.full((n, 1, 2, 2), 0.5), feat=at(a), correct=torch.tensor([1.0] * 6 + [0.0] * 2))
    rand = dict(x=torch.full((n, 1, 2, 2), 0.1), feat=at(b), correct=torch.tensor([1.0] * 7 + [0.0]))
    e = sinks.paired_effect(base, sink, rand, sinks.Config(n_boot=200, n_perm=200))
    s_sink, s_rand = 2 * math.sin(0.5), 2 * math.sin(0.125)
    assert e["shift_sink"] == pytest.approx(s_sink) and e["shift_random"] == pytest.approx(s_rand)
    assert e["ddelta"] == pytest.approx(s_sink - s_rand) and e["shift_ratio"] == pytest.approx(s_sink / s_rand)
    assert e["ddelta_ci"] == pytest.approx([s_sink - s_rand] * 2, abs=1e-6)  # every pair has the same DDelta
    assert e["align_delta_sink"] == pytest.approx(-0.25) and e["align_delta_random"] == pytest.approx(-0.125)
    assert e["align_ddelta"] == pytest.approx(-0.125)  # sinks minus random, not the other way round
    assert e["shift_sink_l2"] == pytest.approx(0.5) and e["shift_random_l2"] == pytest.approx(0.1)
    assert e["p_value"] < 0.05 and e["align_p_value"] > 0.05  # 8 equal DDeltas: only 2 of 256 sign patterns tie


def test_detection_stats_on_a_known_pattern():
    S, L, B, H, N = 4, 2, 3, 2, 9
    M = torch.full((S, L, B, H, N), 0.5 / (N - 1))
    M[..., 0] = 0.5  # BOS always the sink ...
    M[2:, 1, :, :, 0], M[2:, 1, :, :, 7] = 0.5 / (N - 1), 0.5  # ... except layer 1 from step 2: image token 7
    st = sinks.detection_stats(M, N_CTX, layers=[0, 1])
    assert math.isclose(st["bos_overlap"], 0.75) and math.isclose(st["all_layers"]["image_share"], 0.25)
    assert math.isclose(st["all_layers"]["sink_strength"], 0.5 * N, rel_tol=1e-6)
    assert st["detection_by_layer"][1]["bos_share"] == 0.5 and st["all_layers"]["label_share"] == 0.0
    assert math.isclose(st["top1_switch_rate"], (1 / 3) / 2, rel_tol=1e-6)  # 1 change in 3, half the time
    assert st["first_image_token_overlap"] == 0 and st["top1_positions_per_trajectory"] == 1.5
    M[3, 1, 0, 0, 7], M[3, 1, 0, 0, N_CTX] = 0.5 / (N - 1), 0.5  # one (step, sample, head): the first image token
    st = sinks.detection_stats(M, N_CTX, layers=[1])  # read at layer 1 only
    assert math.isclose(st["bos_overlap"], 0.5) and math.isclose(st["all_layers"]["bos_share"], 0.75)
    assert math.isclose(st["first_image_token_overlap"], 1 / (S * B * H), rel_tol=1e-6)
    assert sinks.measured_layers(24) == [6, 12, 18] and sinks.measured_layers(4) == [1, 2, 3]
    assert sinks.detection_stats(M, N_CTX)["measured_layers"] == [0, 1]  # depth 2: {0, 1, 1}


# --- the experiment's design, its claims, the command line --------------------------------------------


def test_the_design_names_each_setting():
    cfg = sinks.Config(preset="cpu", ks="1,5", selection="union", query_rows="image")
    plan = sinks.design(cfg, [1, 5], 2, 4)
    for sel in ("per_head", "union"):
        assert plan["by_selection"][sel]["by_k"]["5"] == sinks.Removal((2,), 5, "score", sel, "image")
    assert set(plan["by_path"]) == set(sinks.PATHS)  # "both" differs from the score path only for image rows
    assert plan["by_path"]["value_mean"]["1"] == sinks.Removal((2,), 1, "value_mean", "union", "image")
    assert plan["fixed_bos"]["value_zero"] == sinks.Removal((2,), 1, "value_zero", "fixed", "image")
    assert plan["other_rows"].rows == "all" and [r.layers for r in plan["by_layer"]] == [(0,), (1,), (2,), (3,)]
    assert plan["multi_layer"].layers == (1, 2, 3)
    assert len(sinks.leaves(plan)) == 20 and len(set(sinks.leaves(plan))) == 17  # 3 repeats, each measured once
    assert set(sinks.design(sinks.Config(preset="cpu"), [1], 2, 4)["by_path"]) == set(sinks.PATHS[:3])
    assert sinks.replace(plan, lambda r: r.k)["by_selection"]["union"]["by_k"] == {"1": 1, "5": 5}
    assert sinks.key_share(5, "union", 4, 69) == pytest.approx(20 / 69)
    assert sinks.key_share(5, "per_head", 4, 69) == pytest.approx(5 / 69)


def hand_made_results(good: bool) -> dict:
    """Results that pass every claim (good) or fail every one, each on its own criterion."""
    shift = dict(shift_sink=0.3, shift_random=0.05 if good else 0.2, shift_ratio=6.0 if good else 1.5, ddelta=0.25,
                 p_holm=0.001, keys_removed_share=0.06, layers=[2])
    align = dict(align_delta_sink=0.01 if good else -0.1, align_delta_sink_ci=[-0.02, 0.04] if good else [-0.15, -0.05],
                 align_ddelta=0.0 if good else 0.08, align_ddelta_ci=[-0.03, 0.03] if good else [0.03, 0.13])
    by_k = {k: dict(shift, **align) for k in ("1", "5")}
    return dict(by_selection=dict(per_head=dict(by_k=by_k), union=dict(by_k=by_k)),
                multi_layer=dict(align, layers=[1, 2]),
                bos_overlap=0.001 if good else 0.01, first_image_token_overlap=0.0 if good else 0.05,
                measured_layers=[1, 2, 3], keys_per_layer=69)


def test_claims_decide_on_their_criteria():
    for good in (True, False):
        r = hand_made_results(good)
        claims = sinks.make_claims(r)
        assert len(claims) == 9
        for c in claims:
            assert c["reproduced"] is good, c["claim"]
            assert c["ours"] == lookup(r, c["key"])
    r = hand_made_results(True)
    r["by_selection"]["union"]["by_k"]["5"] = dict(r["by_selection"]["union"]["by_k"]["5"], p_holm=0.2)
    assert [c["reproduced"] for c in sinks.make_claims(r)][:2] == [True, False]  # not significant after Holm
    r["by_selection"]["union"]["by_k"]["5"]["keys_removed_share"] = 0.6  # sink and random sets overlap: untestable
    assert sinks.make_claims(r)[1]["reproduced"] is None
    r["by_selection"]["union"]["by_k"]["1"] = dict(r["by_selection"]["union"]["by_k"]["1"], align_ddelta=0.06)
    assert [c["reproduced"] for c in sinks.make_claims(r) if c["key"].endswith("align_ddelta")] == [False]


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_model_shape_matches_the_model_the_preset_builds(preset):
    from common import pretrain
    cfg = sinks.Config(preset=preset)
    model = TinyDiT(**pretrain.model_kwargs(sinks.model_config(cfg), 9, 3))  # shapes data: 9 classes, 3 channels
    n_keys = model.n_ctx + (model.img_size // model.P) ** 2
    assert sinks.model_shape(cfg) == (len(model.blocks), model.blocks[0].attn.H, n_keys)
    assert n_keys >= 69 and model.P == 2  # 64 image tokens or more: the budgets stay small


def test_help_prints(capsys):  # argparse formats help texts with %, so a stray percent sign would crash it
    with pytest.raises(SystemExit) as e:
        sinks.main(["--help"])
    assert e.value.code == 0 and "--mask-value" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--ks", "1,x"], ["--layer", "99"], ["--ks", "1,50"], ["--ks", "18"],
                                   ["--selection", "both"], ["--query-rows", "text"], ["--patch", "3"]])
@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_bad_flags_exit_2_before_any_work(flags, preset, monkeypatch, capsys):
    monkeypatch.setattr(sinks, "run", lambda cfg: pytest.fail("validation let a bad flag through to the run"))
    with pytest.raises(SystemExit) as e:
        sinks.main(["--preset", preset, *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error" in err


def test_the_largest_valid_bounds_pass():  # cpu: 4 layers, 4 heads, 69 keys: union k = 17 removes 68
    cfg = parse(sinks.Config, sinks.PRESETS, ["--preset", "cpu", "--ks", "1,17", "--layer", "3"])
    assert cfg.ks == "1,17" and cfg.layer == 3


def test_smoke_run_writes_every_key_and_repeats_itself(tmp_path):
    res = sinks.main(["--preset", "smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["keys_per_layer"] == 69 and saved["sample_steps"] == 4
    assert saved["key_share_removed"] == {"per_head": {"1": 1 / 69, "2": 2 / 69}, "union": {"1": 4 / 69, "2": 8 / 69}}
    entries = [*saved["by_layer"], saved["multi_layer"], saved["other_rows"], *saved["fixed_bos"].values()]
    entries += [e for d in saved["by_selection"].values() for e in d["by_k"].values()]
    entries += [e for d in saved["by_path"].values() for e in d.values()]
    for row in entries:
        for key in ("ddelta_ci", "align_delta_sink_ci", "align_ddelta_ci"):
            assert row[key][0] <= row[key.removesuffix("_ci")] <= row[key][1]
        assert 0 < row["p_value"] <= row["p_holm"] <= 1 and 0 < row["align_p_value"] <= row["align_p_holm"] <= 1
    m = saved["holm_family_size"]
    assert m == saved["sampling_runs"] - 1  # two tests per setting, two runs per setting
    raw = [row[k] for row in entries for k in ("p_value", "align_p_value")]
    adjusted = [row[k] for row in entries for k in ("p_holm", "align_p_holm")]
    assert min(adjusted) == pytest.approx(min(1.0, m * min(raw)))  # Holm: the smallest p times the family size
    assert len(saved["by_layer"]) == 2 and saved["multi_layer"]["layers"] == [0, 1]  # the smoke model: 2 layers
    assert 0 <= saved["bos_overlap"] <= 1 and saved["all_layers"]["sink_strength"] >= 1  # top-1 mass >= uniform
    for c in saved["claims"]:
        assert set(c) == {"claim", "paper", "ours", "key", "criterion", "reproduced", "note"}
        assert lookup(saved, c["key"]) == c["ours"] and c["reproduced"] in (True, False, None)
    for fig in ("fig_method.png", "fig_heatmap.png", "fig_triplets.png", "fig_shift_alignment.png"):
        assert (tmp_path / fig).stat().st_size > 1000
    again = sinks.main(["--preset", "smoke", "--out", str(tmp_path / "again")])  # same seed, same numbers
    assert again.pop("model_loaded_from_cache") is True and res.pop("model_loaded_from_cache") in (True, False)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in res.items() if k != "seconds"}
