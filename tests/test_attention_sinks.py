import json
import math

import pytest
import torch

import attention_sinks as sinks
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
def test_k0_intervention_is_the_identity_bit_for_bit(path, control):
    q, k, v = qkv()
    out, *_ = sinks.sink_attention(q, k, v, N_CTX, 0, path, control, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, attention_ref(q, k, v))
    # ... and through the model's hook, over a whole sampling trajectory
    model = trained_like_model()
    y = torch.arange(4) % 9
    with attention_hook(model, lambda q, k, v, layer: attention_ref(q, k, v)):
        ref = sample_labels(model, y, 3)
    with attention_hook(model, sinks.SinkHook(model.n_ctx, (0, 1), 0, path, control, seed=3)):
        assert torch.equal(sample_labels(model, y, 3), ref)


def test_nonzero_k_changes_the_samples():  # the identity test above must not pass by doing nothing
    model = trained_like_model()
    y = torch.arange(4) % 9
    with attention_hook(model, sinks.SinkHook(model.n_ctx, (0, 1), 0)):
        ref = sample_labels(model, y, 3)
    with attention_hook(model, sinks.SinkHook(model.n_ctx, (0, 1), 1)):
        assert not torch.equal(sample_labels(model, y, 3), ref)


@pytest.mark.parametrize("k", [1, 3])
def test_score_path_removes_the_chosen_keys_and_rows_still_sum_to_one(k):
    q, k_, v = qkv(N=13)
    q = 3 * q  # peaked attention, so the sinks carry real mass before the edit
    _, before = attention_ref(q, k_, v, return_probs=True)
    out, probs, sel, mass = sinks.sink_attention(q, k_, v, N_CTX, k, "score", "sink")
    assert torch.equal(sel.sum(-1), torch.full(sel.shape[:2], k))
    assert torch.equal(sel, torch.zeros_like(sel).scatter_(-1, mass.topk(k, -1).indices, True))  # the top-k
    img = probs[:, :, N_CTX:]  # (B, H, N_img, Nk)
    assert img.masked_select(sel[:, :, None, :].expand_as(img)).abs().max() < 1e-6
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:3]), atol=1e-6)
    assert torch.equal(probs[:, :, :N_CTX], before[:, :, :N_CTX])  # context queries untouched
    # the unmasked keys keep their relative weights: the edit is a renormalisation
    ref = before[:, :, N_CTX:].masked_fill(sel[:, :, None, :], 0)
    assert torch.allclose(img, ref / ref.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(out, probs @ v, atol=1e-6)


def test_value_paths_replace_the_sinks_values_for_every_query():
    q, k, v = qkv()
    _, probs0 = attention_ref(q, k, v, return_probs=True)
    for path, repl in (("value_zero", torch.zeros_like(v)), ("value_mean", v.mean(2, keepdim=True).expand_as(v))):
        out, probs, sel, _ = sinks.sink_attention(q, k, v, N_CTX, 2, path, "sink")
        assert torch.equal(probs, probs0)  # scores untouched
        v_ref = torch.where(sel[..., None], repl, v)
        assert torch.allclose(out, probs0 @ v_ref, atol=1e-6)


def test_random_control_respects_the_budget_and_redraws():
    g = torch.Generator().manual_seed(0)
    mass = torch.rand(4, 3, 21)
    draws = [sinks.choose_keys(mass, k, "random", g) for k in (0, 1, 2, 8) for _ in range(20)]
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


def test_detection_stats_on_a_known_pattern():
    S, L, B, H, N = 4, 2, 3, 2, 9
    M = torch.full((S, L, B, H, N), 0.5 / (N - 1))
    M[..., 0] = 0.5  # BOS always the sink ...
    M[2:, 1, :, :, 0], M[2:, 1, :, :, 7] = 0.5 / (N - 1), 0.5  # ... except layer 1 from step 2: image token 7
    on_shape = torch.zeros(B, N - N_CTX, dtype=torch.bool)
    on_shape[0, 7 - N_CTX] = True  # sample 0's image token 7 shows the shape, the others' do not
    st = sinks.detection_stats(M, N_CTX, on_shape)
    assert math.isclose(st["image_sink_on_shape"], 1 / 3, rel_tol=1e-6)  # 1 of 3 samples
    assert st["detection_by_layer"][0]["image_sink_on_shape"] is None  # layer 0 has no image sinks
    assert math.isclose(st["bos_overlap"], 0.75) and math.isclose(st["top1_image_share"], 0.25)
    assert math.isclose(st["sink_strength"], 0.5 * N, rel_tol=1e-6)
    assert st["detection_by_layer"][1]["bos_share"] == 0.5 and st["top1_label_share"] == 0.0
    assert math.isclose(st["top1_switch_rate"], (1 / 3) / 2, rel_tol=1e-6)  # 1 change in 3, half the time


def test_help_prints(capsys):  # argparse formats help texts with %, so a stray percent sign would crash it
    with pytest.raises(SystemExit) as e:
        sinks.main(["--help"])
    assert e.value.code == 0 and "--mask-value" in capsys.readouterr().out


def test_bad_flags_exit_2():
    with pytest.raises(SystemExit) as e:
        sinks.main(["--preset", "smoke", "--ks", "1,x"])
    assert e.value.code == 2


def test_smoke_run_writes_every_key(tmp_path):
    res = sinks.main(["--preset", "smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("bos_overlap", "sink_strength", "n_samples", "by_k", "by_layer", "seconds"):
        assert key in saved and key in res
    assert set(saved["by_k"]) == {"1", "2"}
    for row in [*saved["by_k"].values(), *saved["by_layer"], saved["whole_model"]]:
        for key in ("shift_sink", "shift_random", "shift_ratio", "ddelta", "ddelta_ci", "p_value",
                    "align_delta_sink", "align_delta_sink_ci", "align_delta_random"):
            assert key in row
        assert row["ddelta_ci"][0] <= row["ddelta"] <= row["ddelta_ci"][1]
        assert 0 < row["p_value"] <= 1
    assert len(saved["by_layer"]) == 2  # the smoke base model has 2 layers
    assert 0 <= saved["bos_overlap"] <= 1 and saved["sink_strength"] >= 1  # top-1 mass >= uniform
    for fig in ("fig_heatmap.png", "fig_triplets.png", "fig_shift_alignment.png"):
        assert (tmp_path / fig).stat().st_size > 1000
    again = sinks.main(["--preset", "smoke", "--out", str(tmp_path / "again")])  # same seed, same numbers
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in res.items() if k != "seconds"}
    with pytest.raises(SystemExit) as e:  # a layer the base model does not have: one line, exit 2
        sinks.main(["--preset", "smoke", "--out", str(tmp_path / "bad"), "--layer", "7"])
    assert e.value.code == 2
