import copy
import json
import math

import torch

import ram
from common.data import render_shapes
from common.dit import TinyDiT
from common.train import make_optimizer


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    net = TinyDiT(img_size=8, channels=3, patch=4, width=32, depth=1, heads=2, n_classes=9)
    with torch.no_grad():  # adaLN-Zero starts at v = 0; perturb so that the velocity depends on everything
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_zero_advantages_give_the_pretraining_target():
    g = torch.Generator().manual_seed(0)
    v_ref, v_old, x, eps = (torch.randn(6, 3, 8, 8, generator=g) for _ in range(4))
    assert torch.equal(ram.ram_target(v_ref, v_old, x, eps, torch.zeros(6), m=100.0), v_ref)
    A = torch.randn(6, generator=g)  # and otherwise the correction is m A ((eps - x) - v_old), per example
    expected = v_ref + 3.0 * A[:, None, None, None] * (eps - x - v_old)
    assert torch.allclose(ram.ram_target(v_ref, v_old, x, eps, A, m=3.0), expected)


def test_a_constant_reward_leaves_both_methods_in_place():
    """Equal rewards in a group -> zero advantages -> RAM regresses onto v_ref = v_theta and GRPO's
    objective is its KL term at its minimum: no gradient, so the policy does not move."""
    cfg = ram.Config(group=2, renoise=2, ode_steps=3, sde_steps=3)
    y = ram.prompts_for_round(9, cfg.group)
    for method in ("ram", "grpo"):
        base = tiny_dit()
        policy, old = copy.deepcopy(base), copy.deepcopy(base)
        opt = make_optimizer(policy, 1e-2)
        g = torch.Generator().manual_seed(1)
        reward = lambda x, y: torch.full((len(x),), 0.7)  # noqa: E731
        if method == "ram":
            ram.ram_round(policy, base, old, opt, y, reward, cfg, g, 30.0, "cpu")
        else:
            ram.grpo_round(policy, base, opt, y, reward, cfg, g, 1e-3, "cpu")
        for p, q in zip(policy.parameters(), base.parameters()):
            assert torch.equal(p, q), method


def test_a_reward_moves_the_ram_policy():
    cfg = ram.Config(group=2, renoise=2, ode_steps=3)
    y = ram.prompts_for_round(9, cfg.group)
    base = tiny_dit()
    policy, old = copy.deepcopy(base), copy.deepcopy(base)
    opt = make_optimizer(policy, 1e-2)
    ram.ram_round(policy, base, old, opt, y, lambda x, y: x.mean((1, 2, 3)), cfg, torch.Generator(), 30.0, "cpu")
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), base.parameters()))


def test_group_advantages_have_zero_mean_per_prompt():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5 * 8, generator=g)
    r[8:16] = 0.3  # one group with equal rewards: no signal, all zero
    A = ram.group_advantages(r, 8).reshape(5, 8)
    assert torch.allclose(A.mean(1), torch.zeros(5), atol=1e-6)
    assert A[1].abs().max() < 1e-9
    assert torch.allclose(A[[0, 2, 3, 4]].std(1), torch.ones(4), atol=1e-3)
    assert A.abs().max() <= ram.ADV_CLIP


def _shapes(labels, cx, r=3.5, size=16):
    n = len(labels)
    labels = torch.tensor(labels)
    return render_shapes(labels // 3, labels % 3, torch.tensor(cx, dtype=torch.float32),
                         torch.full((n,), 8.0), torch.full((n,), r), size)


def test_composition_reward_needs_the_right_class_in_the_right_place():
    # red circle (label 0, even: left half) and green circle (label 1, odd: right half)
    drawn = torch.tensor([0, 0, 1, 1])
    x = _shapes(drawn.tolist(), [4.5, 11.5, 11.5, 4.5])
    oracle = lambda x: torch.nn.functional.one_hot(drawn, 9).float()  # a perfect classifier of these four  # noqa: E731
    r = ram.composition_reward(x, drawn, oracle)
    assert r[0] > 0.9 and r[2] > 0.9  # right class, right half
    assert r[1] < 0.1 and r[3] < 0.1  # right class, wrong half
    wrong = ram.composition_reward(x, torch.tensor([2, 2, 3, 3]), oracle)  # prompts name another class
    assert wrong.max() < 1e-6


def test_place_check_reads_the_centre_of_the_lit_pixels():
    cx = torch.linspace(4.5, 11.5, 8).tolist()
    x = _shapes([0] * 8, cx)
    got, _, _ = ram.lit_centre_and_size(x)
    assert torch.allclose(got, torch.tensor(cx), atol=0.05)
    left = ram.place_check(x, torch.zeros(8, dtype=torch.long))
    assert torch.all(left[1:] < left[:-1]) and left[0] > 0.95 and left[-1] < 0.05  # tau = 1 px: smooth
    assert torch.allclose(left + ram.place_check(x, torch.ones(8, dtype=torch.long)), torch.ones(8))


def test_preference_prefers_a_large_centred_shape():
    x = torch.cat([_shapes([0], [8.0], r=4.5), _shapes([0], [5.5], r=4.5), _shapes([0], [8.0], r=2.5)])
    p = ram.preference_reward(x)
    assert p[0] > 0.8 and p[0] > p[1] + 0.3 and p[0] > p[2] + 0.3


def test_tilted_mixture_matches_reweighted_samples():
    """Oracle check of the closed form: importance-reweight reference samples by exp(m w.x)."""
    g = torch.Generator().manual_seed(0)
    x = ram.sample_mixture(400_000, g)
    wts = torch.softmax(x.double() @ ram.LIN_W.double() * ram.TILT_M, 0)
    means, weights = ram.tilted_mixture(ram.LIN_W, ram.TILT_M)
    assert torch.allclose((wts[:, None] * x.double()).sum(0).float(), weights @ means, atol=0.02)


def test_part_a_smoke_moves_the_mean_toward_the_exact_tilt():
    cfg = ram.Config(**{**ram.PRESETS["smoke"], "preset": "smoke"})
    res, _ = ram.tilt_experiment(cfg, progress=False)
    assert res["mean_error"] < 0.7 * res["base_mean_error"]
    assert res["quadratic_var"] < res["base_var"]


def test_peak_stats():
    grpo = dict(steps=[0, 2, 4, 6], seconds=[0, 4, 8, 12], reward=[0.4, 0.5, 0.6, 0.55])
    ram_ = dict(steps=[0, 2, 4, 6], seconds=[0, 1, 2, 3], reward=[0.4, 0.65, 0.7, 0.7])
    s = ram.peak_stats(ram_, grpo)
    assert (s["grpo_peak"], s["grpo_steps_to_peak"], s["ram_steps_to_grpo_peak"]) == (0.6, 4, 2)
    assert s["steps_ratio"] == 2 and s["seconds_ratio"] == 8
    assert ram.peak_stats(dict(ram_, reward=[0.4] * 4), grpo)["steps_ratio"] is None  # never reached


def test_smoke_run_writes_every_key(tmp_path):
    res = ram.main(["--preset", "smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["tilt"]) >= {"mean_error", "weight_error", "quadratic_var", "quadratic_var_exact"}
    assert set(saved["rewards"]) == {"composition", "preference"} and "seconds" in saved
    for res_r in saved["rewards"].values():
        for key in ("base_reward", "grpo_peak", "grpo_steps_to_peak", "ram_steps_to_grpo_peak", "steps_ratio",
                    "seconds_ratio"):
            assert key in res_r
        for method in ("ram", "grpo"):
            curve = res_r[method]
            assert len({len(curve[k]) for k in ("steps", "optimizer_steps", "reward", "seconds")}) == 1
            assert curve["steps"][0] == 0 and curve["reward"][0] == res_r["base_reward"]
            assert all(math.isfinite(v) for v in curve["reward"])
            assert math.isfinite(res_r["fd_to_base"][method]) and math.isfinite(res_r["diversity"][method])
    assert res["rewards"]["composition"]["base_reward"] == saved["rewards"]["composition"]["base_reward"]
    for fig in ("fig_tilt.png", "fig_reward_vs_rounds.png", "fig_reward_vs_seconds.png",
                "fig_samples_composition.png", "fig_samples_preference.png"):
        assert (tmp_path / fig).stat().st_size > 1000


def test_same_seed_same_curves():
    """Reproducibility on CPU: both methods, run twice from the same weights and seed, give the same
    held-out curve (seconds apart)."""
    cfg = ram.Config(group=2, renoise=2, ode_steps=3, sde_steps=3, eval_every=1)
    reward = lambda x, y: -x.mean((1, 2, 3))  # noqa: E731  (darker is better)
    y, noise = torch.arange(18) % 9, torch.randn(18, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    base_r = reward(ram.sample_images(tiny_dit(), y, noise, cfg.ode_steps), y).mean().item()
    for method, lr, hp in (("ram", 1e-3, 10.0), ("grpo", 1e-3, 1e-3)):
        runs = [ram.train_method(method, tiny_dit(), reward, cfg, lr, hp, 2, (y, noise, base_r), "cpu", 5,
                                 progress=False)[0]["reward"] for _ in range(2)]
        assert runs[0] == runs[1] and runs[0][-1] != runs[0][0], method
