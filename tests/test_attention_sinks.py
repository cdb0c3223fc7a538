import json
import math

import pytest
import torch

import attention_sinks as sinks
from common.config import lookup, parse
from common.dit import TinyDiT, attention_hook, attention_ref
from common.sampler import sample_labels

N_CTX = 5  # BOS + 4 label tokens, as in the base model


def qkv(B=3, H=2, N=13, Dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, Dh, generator=g) for _ in range(3)]


def trained_like_model():
    """A small TinyDiT with random (non-zero) adaLN weights, so every attention call matters."""
    torch.manual_seed(0)
    model = TinyDiT(img_size=8, patch=4, width=32, depth=2, heads=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("path", sinks.PATHS)
@pytest.mark.parametrize("control", ["sink", "random"])
@pytest.mark.parametrize("selection", sinks.SELECTIONS)
def test_k0_intervention_is_the_identity_bit_for_bit(path, control, selection):
    q, k, v = qkv()
    for rows in ("all", "image"):
        out, *_ = sinks.sink_attention(q, k, v, N_CTX, 0, path, control, selection=selection, rows=rows,
                                       generator=torch.Generator().manual_seed(1))
        assert torch.equal(out, attention_ref(q, k, v))
    # ... and through the model's hook, over a whole sampling trajectory
    model = trained_like_model()
    y = torch.arange(4) % 9
    with attention_hook(model, lambda q, k, v, layer: attention_ref(q, k, v)):
        ref = sample_labels(model, y, 3)
    with attention_hook(model, sinks.SinkHook(model.n_ctx, (0, 1), 0, path, control, selection, seed=3)):
        assert torch.equal(sample_labels(model, y, 3), ref)


def test_nonzero_k_changes_the_samples():  # the identity test above must not pass by doing nothing
    model = trained_like_model()
    y = torch.arange(4) % 9
    with attention_hook(model, sinks.SinkHook(model.n_ctx, (0, 1), 0)):
        ref = sample_labels(model, y, 3)
    with attention_hook(model, sinks.SinkHook(model.n_ctx, (0, 1), 1)):
        assert not torch.equal(sample_labels(model, y, 3), ref)


@pytest.mark.parametrize("k", [1, 3])
def test_score_path_removes_the_chosen_keys_for_every_query_row(k):
    q, k_, v = qkv(N=13)
    q = 3 * q  # peaked attention, so the sinks carry real mass before the edit
    _, before = attention_ref(q, k_, v, return_probs=True)
    out, probs, sel, mass = sinks.sink_attention(q, k_, v, N_CTX, k, "score", "sink")  # default: rows="all"
    assert torch.equal(sel.sum(-1), torch.full(sel.shape[:2], k))
    assert torch.equal(sel, torch.zeros_like(sel).scatter_(-1, mass.topk(k, -1).indices, True))  # the top-k
    assert probs.masked_select(sel[:, :, None, :].expand_as(probs)).abs().max() < 1e-6  # context rows too
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:3]), atol=1e-6)
    # the unmasked keys keep their relative weights: the edit is a renormalisation
    ref = before.masked_fill(sel[:, :, None, :], 0)
    assert torch.allclose(probs, ref / ref.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(out, probs @ v, atol=1e-6)


def test_image_rows_option_leaves_the_context_rows_untouched():
    q, k, v = qkv(N=13)
    q = 3 * q
    _, before = attention_ref(q, k, v, return_probs=True)
    for selection in ("per_head", "union"):
        out, probs, sel, _ = sinks.sink_attention(q, k, v, N_CTX, 1, "score", "sink", selection=selection,
                                                  rows="image")
        assert torch.equal(probs[:, :, :N_CTX], before[:, :, :N_CTX])  # the processor class's behaviour
        img = probs[:, :, N_CTX:]
        assert img.masked_select(sel[:, :, None, :].expand_as(img)).abs().max() < 1e-6
        assert not torch.allclose(probs[:, :, N_CTX:], before[:, :, N_CTX:])  # the image rows did change


def test_union_selection_removes_the_same_kH_keys_in_every_head_and_row():
    q, k, v = qkv(B=3, H=4, N=21)
    q = 3 * q
    _, before = attention_ref(q, k, v, return_probs=True)
    for kk in (1, 2, 5):
        out, probs, sel, mass = sinks.sink_attention(q, k, v, N_CTX, kk, "score", "sink", selection="union")
        H = q.shape[1]
        assert torch.equal(sel, sel[:, :1].expand_as(sel))  # one key set shared by the heads
        assert torch.equal(sel.sum(-1), torch.full(sel.shape[:2], kk * H))  # k*H keys
        # the top k*H of the head-averaged incoming mass, computed here by hand from the image rows
        avg = before[:, :, N_CTX:].mean(2).mean(1)  # (B, Nk)
        for b in range(3):
            assert set(sel[b, 0].nonzero().flatten().tolist()) == set(avg[b].topk(kk * H).indices.tolist())
        assert probs.masked_select(sel[:, :, None, :].expand_as(probs)).abs().max() < 1e-6  # every head, every row
    g = torch.Generator().manual_seed(0)
    draws = [sinks.choose_keys(torch.rand(3, 4, 21), 2, "random", "union", g) for _ in range(10)]
    for d in draws:
        assert torch.equal(d, d[:, :1].expand_as(d)) and torch.equal(d.sum(-1), torch.full((3, 4), 8))
    assert len({tuple(d[0, 0].nonzero().flatten().tolist()) for d in draws}) > 1  # redrawn at every call


def test_both_equals_the_score_path_when_every_row_is_masked():
    q, k, v = qkv()
    q = 3 * q
    for selection in ("per_head", "union"):
        a = sinks.sink_attention(q, k, v, N_CTX, 1, "score", selection=selection)[0]
        b = sinks.sink_attention(q, k, v, N_CTX, 1, "both", selection=selection)[0]
        assert torch.equal(a, b)  # nobody reads the zeroed value of a key that no row attends to
        c = sinks.sink_attention(q, k, v, N_CTX, 1, "both", selection=selection, rows="image")[0]
        assert not torch.equal(a, c)  # ... but the context rows do read it when only image rows are masked


def test_value_paths_replace_the_sinks_values_for_every_query():
    q, k, v = qkv()
    _, probs0 = attention_ref(q, k, v, return_probs=True)
    for path, repl in (("value_zero", torch.zeros_like(v)), ("value_mean", v.mean(2, keepdim=True).expand_as(v))):
        out, probs, sel, _ = sinks.sink_attention(q, k, v, N_CTX, 2, path, "sink")
        assert torch.equal(probs, probs0)  # scores untouched
        v_ref = torch.where(sel[..., None], repl, v)
        assert torch.allclose(out, probs0 @ v_ref, atol=1e-6)


def test_fixed_value_path_replaces_the_bos_value_in_every_head():
    q, k, v = qkv(B=2, H=3, N=13)
    _, probs0 = attention_ref(q, k, v, return_probs=True)
    for path in ("value_zero", "value_mean"):
        out, probs, sel, _ = sinks.sink_attention(q, k, v, N_CTX, 1, path, "sink", selection="fixed")
        assert torch.equal(probs, probs0) and sel[..., 0].all() and sel.sum() == 2 * 3  # index 0 only: the BOS
        v_ref = v.clone()
        v_ref[:, :, 0] = 0 if path == "value_zero" else v.mean(2)
        assert torch.allclose(out, probs0 @ v_ref, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    rand = [sinks.choose_keys(torch.rand(2, 3, 13), 1, "random", "fixed", g) for _ in range(30)]
    assert all(torch.equal(r.sum(-1), torch.ones(2, 3, dtype=torch.long)) for r in rand)  # one key, shared
    assert all(torch.equal(r, r[:, :1].expand_as(r)) for r in rand)
    assert torch.stack(rand)[:, 0, 0].any(0).sum() > 5  # not the BOS every time: uniform over keys


def test_random_control_respects_the_budget_and_redraws():
    g = torch.Generator().manual_seed(0)
    mass = torch.rand(4, 3, 21)
    draws = [sinks.choose_keys(mass, k, "random", generator=g) for k in (0, 1, 2, 8) for _ in range(20)]
    for sel, k in zip(draws, [k for k in (0, 1, 2, 8) for _ in range(20)]):
        assert sel.sum(-1).max() <= k and torch.equal(sel.sum(-1), torch.full((4, 3), k))
    ones = torch.stack(draws[20:40])  # k = 1, 20 calls
    assert len({tuple(s.nonzero()[:, -1].tolist()) for s in ones}) > 1  # a new draw at every call
    assert ones.float().mean(0).sum(-1).allclose(torch.ones(4, 3))  # one key per sample and head
    # every key can be drawn (uniform, not the sinks): over 20 calls x 12 rows most keys appear
    assert ones.any(0).any(0).any(0).sum() >= 18


def test_bootstrap_ci_covers_a_known_mean():
    """Synthetic paired data with a known mean difference 0.3: the 95% CI covers it in about 95%
    of 100 independent experiments, and lies above 0."""
    covered, above = 0, 0
    for rep in range(100):
        g = torch.Generator().manual_seed(rep)
        base = torch.randn(128, generator=g)
        treated = base + 0.3 + 0.5 * torch.randn(128, generator=g)  # paired: shared base
        lo, hi = sinks.bootstrap_ci(treated - base, 500, seed=rep)
        covered += lo <= 0.3 <= hi
        above += lo > 0
    assert 88 <= covered <= 99 and above == 100


def test_sign_flip_p_value():
    g = torch.Generator().manual_seed(0)
    assert sinks.sign_flip_p(0.5 + torch.randn(64, generator=g), 999, 0) < 0.01
    ps = [sinks.sign_flip_p(torch.randn(64, generator=g), 199, s) for s in range(40)]
    assert sum(p < 0.05 for p in ps) <= 8  # under H0 about 2 of 40 fall below 0.05
    assert all(0 < p <= 1 for p in ps)


def test_holm_against_a_hand_computed_example():
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> raised to 0.06 (monotone)
    assert sinks.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert sinks.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert sinks.holm([0.02]) == [0.02] and sinks.holm([]) == []


def test_detection_stats_on_a_known_pattern():
    S, L, B, H, N = 4, 2, 3, 2, 9
    M = torch.full((S, L, B, H, N), 0.5 / (N - 1))
    M[..., 0] = 0.5  # BOS always the sink ...
    M[2:, 1, :, :, 0], M[2:, 1, :, :, 7] = 0.5 / (N - 1), 0.5  # ... except layer 1 from step 2: image token 7
    on_shape = torch.zeros(B, N - N_CTX, dtype=torch.bool)
    on_shape[0, 7 - N_CTX] = True  # sample 0's image token 7 shows the shape, the others' do not
    st = sinks.detection_stats(M, N_CTX, on_shape, layers=[0, 1])
    assert math.isclose(st["image_sink_on_shape"], 1 / 3, rel_tol=1e-6)  # 1 of 3 samples
    assert st["detection_by_layer"][0]["image_sink_on_shape"] is None  # layer 0 has no image sinks
    assert math.isclose(st["bos_overlap"], 0.75) and math.isclose(st["top1_image_share"], 0.25)
    assert math.isclose(st["sink_strength"], 0.5 * N, rel_tol=1e-6)
    assert st["detection_by_layer"][1]["bos_share"] == 0.5 and st["top1_label_share"] == 0.0
    assert math.isclose(st["top1_switch_rate"], (1 / 3) / 2, rel_tol=1e-6)  # 1 change in 3, half the time
    assert st["bos_overlap_all_layers"] == st["bos_overlap"] and st["first_image_token_overlap"] == 0
    M[3, 1, 0, 0, 7], M[3, 1, 0, 0, N_CTX] = 0.5 / (N - 1), 0.5  # one (step, sample, head): the first image token
    st = sinks.detection_stats(M, N_CTX, on_shape, layers=[1])  # read at layer 1 only
    assert math.isclose(st["bos_overlap"], 0.5) and math.isclose(st["bos_overlap_all_layers"], 0.75)
    assert math.isclose(st["first_image_token_overlap"], 1 / (S * B * H), rel_tol=1e-6)
    assert st["detection_by_layer"][1]["first_image_share"] == st["first_image_token_overlap"]


def test_measured_layers_scale_the_papers_6_12_18_of_24():
    assert sinks.measured_layers(24) == [6, 12, 18] and sinks.measured_layers(4) == [1, 2, 3]


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_base_shape_matches_the_model_the_preset_builds(preset):
    from common import pretrain
    cfg = pretrain.Config(**pretrain.PRESETS[preset])
    model = TinyDiT(**pretrain.model_kwargs(cfg, 9, 3))  # shapes data: 9 classes, 3 channels
    n_keys = model.n_ctx + (model.img_size // model.P) ** 2
    assert sinks.base_shape(preset) == (len(model.blocks), model.blocks[0].attn.H, n_keys)


def test_help_prints(capsys):  # argparse formats help texts with %, so a stray percent sign would crash it
    with pytest.raises(SystemExit) as e:
        sinks.main(["--help"])
    assert e.value.code == 0 and "--mask-value" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--ks", "1,x"], ["--layer", "99"], ["--ks", "1,50"], ["--ks", "6"],
                                   ["--selection", "both"], ["--query-rows", "text"]])
@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_bad_flags_exit_2_before_any_work(flags, preset, monkeypatch, capsys):
    monkeypatch.setattr(sinks, "run", lambda cfg: pytest.fail("validation let a bad flag through to the run"))
    with pytest.raises(SystemExit) as e:
        sinks.main(["--preset", preset, *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error" in err


def test_the_largest_valid_bounds_pass():  # cpu: 4 layers, 4 heads, 21 keys: union k = 5 removes 20
    cfg = parse(sinks.Config, sinks.PRESETS, ["--preset", "cpu", "--ks", "1,5", "--layer", "3"])
    assert cfg.ks == "1,5" and cfg.layer == 3


def test_smoke_run_writes_every_key(tmp_path):
    res = sinks.main(["--preset", "smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("bos_overlap", "first_image_token_overlap", "bos_overlap_by_layer", "bos_overlap_layer0",
                "sink_strength", "n_samples", "by_selection", "by_path", "fixed_bos", "by_layer", "multi_layer",
                "query_rows_compare", "claims", "seconds"):
        assert key in saved and key in res
    assert set(saved["by_selection"]) == {"per_head", "union"}
    entries = [*saved["by_layer"], saved["multi_layer"], saved["query_rows_compare"]["entry"],
               *saved["fixed_bos"].values()]
    entries += [e for d in saved["by_selection"].values() for e in d["by_k"].values()]
    entries += [e for d in saved["by_path"].values() for e in d.values()]
    for row in entries:
        for key in ("shift_sink", "shift_random", "shift_ratio", "ddelta", "ddelta_ci", "p_value", "p_holm",
                    "align_delta_sink", "align_delta_sink_ci", "align_p_value", "align_p_holm", "keys_removed_share"):
            assert key in row
        assert row["ddelta_ci"][0] <= row["ddelta"] <= row["ddelta_ci"][1]
        assert 0 < row["p_value"] <= row["p_holm"] <= 1 and 0 < row["align_p_value"] <= row["align_p_holm"] <= 1
    for s, d in saved["by_selection"].items():
        assert set(d["by_k"]) == {"1", "2"}
        for k, e in d["by_k"].items():  # 21 keys and 4 heads in the smoke model
            assert math.isclose(e["keys_removed_share"], int(k) * (4 if s == "union" else 1) / 21)
    assert len(saved["by_layer"]) == 2 and saved["multi_layer"]["layers"] == [0, 1]  # the smoke model: 2 layers
    assert saved["bos_overlap_by_layer"][0] == saved["bos_overlap_layer0"]
    assert 0 <= saved["bos_overlap"] <= 1 and saved["sink_strength"] >= 1  # top-1 mass >= uniform
    for c in saved["claims"]:
        assert set(c) == {"claim", "paper", "ours", "key", "criterion", "reproduced", "note"}
        assert lookup(saved, c["key"]) == c["ours"] and isinstance(c["reproduced"], bool)
    for fig in ("fig_heatmap.png", "fig_triplets.png", "fig_shift_alignment.png"):
        assert (tmp_path / fig).stat().st_size > 1000
    again = sinks.main(["--preset", "smoke", "--out", str(tmp_path / "again")])  # same seed, same numbers
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in res.items() if k != "seconds"}
