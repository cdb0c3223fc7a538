import json
import math

import pytest
import torch

import time_blind_fm as tb
from common.config import lookup
from common.flow import pair_noise, pairing_cost

D = torch.float64


# --- the estimator ---------------------------------------------------------------------------------


def test_estimator_is_exact_without_a_noise_floor():
    """Data exactly inside a k-dim subspace plus an offset outside it (the mean direction must absorb it),
    and noise whose energy outside the fitted subspace is exactly its expectation: then q = t^2, t_hat = t."""
    g = torch.Generator().manual_seed(0)
    n, d, k = 200, 300, 6
    U, _ = torch.linalg.qr(torch.randn(d, k + 1, generator=g, dtype=D))
    x = 3 * torch.randn(n, k, generator=g, dtype=D) @ U[:, :k].T + 2.0 * U[:, k]  # offset outside the subspace
    basis, c = tb.fit_subspace(x, k)
    assert c < 1e-20  # no energy outside the fitted subspace
    eps = torch.randn(n, d, generator=g, dtype=D)
    off = tb.off_subspace(eps, basis)
    eps = (eps - off) + off / off.norm(dim=1, keepdim=True) * math.sqrt(d - basis.shape[1])
    t = torch.linspace(0.0, 1.0, n, dtype=D)
    xt = (1 - t[:, None]) * x + t[:, None] * eps
    assert torch.allclose(tb.estimate_t(xt, basis, c), t, atol=1e-9)


def test_estimator_inverts_its_own_model_for_any_floor():
    """q = t^2 + c (1 - t)^2 is inverted exactly for t above the turning point c / (1 + c)."""
    basis = torch.eye(10, dtype=D)[:, :2]
    for c in (0.0, 0.05, 0.3):
        t = torch.linspace(c / (1 + c) + 1e-3, 1, 50, dtype=D)
        q = t**2 + c * (1 - t) ** 2
        xt = torch.zeros(50, 10, dtype=D)
        xt[:, 2] = torch.sqrt(q * 8)  # all off-subspace energy in one coordinate: ||P x||^2 / (d-k) = q
        assert torch.allclose(tb.estimate_t(xt, basis, c), t, atol=1e-9)


def test_fit_subspace_recovers_the_floor_with_an_offset_outside():
    """Spiked data (floor 0.01) shifted by an offset outside the spike subspace: the fitted subspace takes the
    mean direction, and c is the floor per dimension outside the k + 1 directions, not per dimension of d."""
    g = torch.Generator().manual_seed(3)
    d, k = 60, 10
    x, U = tb.spiked_data(4000, d, k, g, floor=0.01, spike=5.0)
    offset = tb.off_subspace(torch.randn(1, d, generator=g, dtype=D), U)
    x = x + 3 * offset / offset.norm()
    basis, c = tb.fit_subspace(x, k)
    assert basis.shape == (d, k + 1)
    assert abs(c - 0.01) < 0.0003, c


def test_estimator_error_falls_with_d_minus_k():
    g = torch.Generator().manual_seed(0)
    errs = []
    for dmk in (50, 800):
        x, _ = tb.spiked_data(1200, dmk + 5, 4, g)
        basis, c = tb.fit_subspace(x[:400], 4)
        t = 0.1 + 0.9 * torch.rand(800, generator=g, dtype=D)
        xt = tb.interpolate(x[400:], torch.randn(800, dmk + 5, generator=g, dtype=D), t)
        errs.append((tb.estimate_t(xt, basis, c) - t).pow(2).mean().sqrt().item())
    assert errs[1] < errs[0] / 2.5  # 16x the dimensions: theory 4x smaller error


def test_upsampled_images_lie_in_a_fixed_subspace():
    """Drawn at 8 px and upsampled to 16 px: rank at most 3 * 8 * 8 = 192 of 768; native 16 px: full rank."""
    cfg = tb.Config(preset="smoke", sizes="8,16")
    up = tb.load_images(cfg, 16, "train", 400, upsampled=True).flatten(1).double()
    native = tb.load_images(cfg, 16, "train", 400, upsampled=False).flatten(1).double()
    s_up, s_native = torch.linalg.svdvals(up), torch.linalg.svdvals(native)
    assert s_up[192] < 1e-8 * s_up[0]
    assert s_native[192] > 1e-3 * s_native[0]


# --- the decomposition -----------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.01, 1.0, 40.0])
def test_cond_mean_is_the_regression_of_u_on_x_t(lam):
    """Independent oracle: least squares of u = eps - x on x_t at fixed t gives the slope a(t) and the
    residual variance lam / s(t)."""
    g = torch.Generator().manual_seed(1)
    n = 400_000
    x, eps = math.sqrt(lam) * torch.randn(n, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)
    for t in (0.05, 0.3, 0.8):
        xt, u = (1 - t) * x + t * eps, eps - x
        slope = (u * xt).mean() / xt.pow(2).mean()
        resid = (u - slope * xt).pow(2).mean()
        a, s = tb.cond_mean_coef(torch.tensor(t, dtype=D), lam), tb.path_var(torch.tensor(t, dtype=D), lam)
        assert abs(slope - a) < 0.01 * (1 + abs(a))
        assert abs(resid - lam / s) < 0.01 * lam / s


def test_coupling_variance_is_the_integral_of_the_residual_variance():
    """(pi / 2) sum sqrt(lam) against a plain trapezoid of sum lam / s(t) over t (per dimension)."""
    d, k, spike, floor = 100, 4, 9.0, 0.04
    t = torch.linspace(0, 1, 200_001, dtype=D)
    integrand = k * (spike + floor) / tb.path_var(t, spike + floor) + (d - k) * floor / tb.path_var(t, floor)
    assert tb.decomposition(d, k, spike, floor)["coupling_variance"] == pytest.approx(
        torch.trapezoid(integrand, t).item() / d, rel=1e-6)


def test_chi2_nodes_integrate_its_moments():
    for m in (3, 40, 5000):
        G, w = tb.chi2_nodes(m, 8)
        assert w.sum().item() == pytest.approx(1, rel=1e-12)
        assert (w * G).sum().item() == pytest.approx(m, rel=1e-10)
        assert (w * G**2).sum().item() == pytest.approx(m * m + 2 * m, rel=1e-10)


def test_blind_coef_is_the_posterior_mean_of_a_brute_force_gaussian():
    """E[u | x_t] from the group statistics against the full-covariance oracle: on a fine uniform grid of t,
    weights N(x_t; 0, (1-t)^2 S + t^2 I) and E[u | x_t, t] = (t I - (1-t) S) ((1-t)^2 S + t^2 I)^-1 x_t."""
    g = torch.Generator().manual_seed(2)
    d, k, spike, floor = 12, 2, 6.0, 0.05
    x, U = tb.spiked_data(5, d, k, g, floor, spike)
    t_true = torch.tensor([0.03, 0.2, 0.5, 0.8, 0.97], dtype=D)
    xt = tb.interpolate(x, torch.randn(5, d, generator=g, dtype=D), t_true)
    S = spike * U @ U.T + floor * torch.eye(d, dtype=D)
    grid = torch.linspace(1e-6, 1, 20001, dtype=D)
    C = (1 - grid)[:, None, None] ** 2 * S + grid[:, None, None] ** 2 * torch.eye(d, dtype=D)  # (P, d, d)
    logp = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=D), C).log_prob(xt[:, None])  # (5, P)
    mean_t = ((grid[:, None, None] * torch.eye(d, dtype=D) - (1 - grid)[:, None, None] * S)
              @ torch.linalg.solve(C, xt.T[None]))  # (P, d, 5)
    oracle = torch.einsum("np,pdn->nd", torch.softmax(logp, 1), mean_t)
    lam, mult = torch.tensor([spike + floor, floor], dtype=D), torch.tensor([k, d - k], dtype=D)
    inside = xt @ U @ U.T
    parts = torch.stack([inside, xt - inside], 1)
    coef = tb.blind_coef(parts.pow(2).sum(2), lam, mult, tb.posterior_nodes(lam, mult))
    assert torch.allclose((coef[..., None] * parts).sum(1), oracle, rtol=0, atol=5e-4)  # the oracle grid: ~1e-4


@pytest.mark.parametrize("d, k, spike, floor", [(48, 4, 12.0, 0.01), (200, 8, 25.0, 0.05)])
def test_exact_decomposition_inside_its_monte_carlo_interval(d, k, spike, floor):
    exact = tb.decomposition(d, k, spike, floor)
    mc = tb.decomposition_mc(d, k, spike, 40_000, seed=5, floor=floor)
    for key in ("coupling_variance", "gap"):
        lo, hi = mc[key + "_ci"]
        assert lo <= exact[key] <= hi, (key, exact[key], mc[key + "_ci"])
    assert exact["gap_plugin"] > exact["gap"]  # E[u | x_t] is the best time-blind target: t_hat does worse
    lo, hi = mc["gap_ci"]
    assert hi < exact["gap_plugin"]  # the interval is tight enough to tell the two apart


def test_gap_ratio_falls_with_d():
    ratio = [tb.decomposition(d, 8, d / 8)["ratio"] for d in (64, 1024)]
    assert ratio[1] < ratio[0]


# --- the nets and their losses ---------------------------------------------------------------------


def test_share_is_the_gap_over_the_worse_loss():
    assert tb.share(0.2, 0.15) == pytest.approx(0.25)
    assert tb.share(0.15, 0.2) < 0


def test_ot_coupling_lowers_the_pairing_cost_on_a_batch():
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(32, 3, 8, 8, generator=g), torch.randn(32, 3, 8, 8, generator=g)
    ot = pair_noise(x, eps, "ot")
    assert sorted(ot.flatten(1).sum(1).tolist()) == sorted(eps.flatten(1).sum(1).tolist())  # a permutation
    assert pairing_cost(x, ot) < pairing_cost(x, pair_noise(x, eps, "independent"))


def test_time_blind_net_ignores_t():
    net = tb.make_net(tb.Config(model="xs"), 8, 3, time_cond=False).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(4, 3, 8, 8)
        assert torch.equal(net(x, torch.zeros(4)), net(x, torch.ones(4)))


def test_train_fm_and_bank_loss_ask_for_the_cells_coupling(tmp_path, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path))
    asked = []

    def recording(x, eps, coupling="independent"):
        asked.append(coupling)
        return pair_noise(x, eps, coupling)

    monkeypatch.setattr(tb, "pair_noise", recording)
    cfg = tb.Config(preset="smoke", steps=2, batch=8)
    x = torch.rand(32, 3, 8, 8) * 2 - 1
    model = tb.train_fm(cfg, x, False, "ot", "cpu")
    assert asked == ["ot", "ot"]
    tb.bank_loss(model, tb.make_bank(x, 16, 0), "ot", 8, "cpu")
    assert asked[2:] == ["ot", "ot"]


def test_bank_loss_tells_the_net_t_model_but_builds_x_t_from_the_true_t():
    torch.manual_seed(0)
    cfg = tb.Config(model="xs")
    bank = tb.make_bank(torch.rand(16, 3, 8, 8) * 2 - 1, 16, 0)
    nets = {cond: tb.make_net(cfg, 8, 3, time_cond=cond).eval() for cond in (True, False)}
    with torch.no_grad():
        for net in nets.values():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    loss = {cond: tb.bank_loss(net, bank, "independent", 8, "cpu") for cond, net in nets.items()}
    assert torch.equal(tb.bank_loss(nets[True], bank, "independent", 8, "cpu", t_model=bank[2]), loss[True])
    assert not torch.allclose(tb.bank_loss(nets[True], bank, "independent", 8, "cpu", t_model=1 - bank[2]), loss[True])
    assert torch.equal(tb.bank_loss(nets[False], bank, "independent", 8, "cpu", t_model=1 - bank[2]), loss[False])


# --- claims, the smoke run, reproducibility --------------------------------------------------------


def hand_made_results(good: bool) -> dict:
    """Results that pass every claim (good) or fail every one, each on its own criterion."""
    return dict(
        estimator_slope_upsampled=-0.5 if good else -0.3,
        decomposition=dict(d=[256, 1024, 4096], k=[8, 8, 8],
                           ratio=[0.02, 0.012, 0.009] if good else [0.02, 0.021, 0.009]),
        upsampled={"8": dict(gap_share_learned=0.1), "32": dict(gap_share_learned=0.04 if good else 0.06)},
        coupling_over_time=1.5 if good else 0.9, grid_size=16,
        fd_coupling_effect=2.0 if good else 1.0, fd_time_effect=1.0 if good else 2.0)


def test_claims_decide_on_their_criteria():
    for good in (True, False):
        r = hand_made_results(good)
        for c in tb.claims(r):
            assert c["reproduced"] is good, c["claim"]
            assert c["ours"] == lookup(r, c["key"])
    r = hand_made_results(True)
    r["decomposition"]["ratio"] = [0.02, 0.015, 0.011]  # falls at every d, but not to half
    assert tb.claims(r)[1]["reproduced"] is False
    r = hand_made_results(True)
    r["estimator_slope_upsampled"] = -0.65
    assert tb.claims(r)[0]["reproduced"] is False
    r["upsampled"]["8"]["gap_share_learned"] = -0.01  # no gap to shrink at the smallest size
    assert tb.claims(r)[2]["reproduced"] is None


def test_smoke_run_writes_the_keys(tmp_path):
    res = tb.main(["--preset", "smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    dec = saved["decomposition"]
    assert dec["d"] == [64, 256, 1024] and len(dec["coupling_variance"]) == len(dec["gap"]) == 3
    assert dec["mc"]["inside"] is True and dec["mc"]["d"] == 64
    for fam in ("upsampled", "native"):
        assert set(saved[fam]) == {"8", "16"}
        rows = saved[fam].values()
        assert len({row["images_seen"] for row in rows}) == 1  # the same images seen at every size
        for row in rows:
            for key in ("gap_share_learned", "gap_share_plugin", "gap_share_exact", "rmse", "noise_floor_c"):
                assert math.isfinite(row[key])
    assert saved["upsampled"]["8"] == saved["native"]["8"]  # the smallest size is the same data either way
    assert set(saved["loss"]) == set(saved["fd"]) == set(tb.SETTINGS)
    assert len(saved["claims"]) == 5
    for c in saved["claims"]:
        assert c["criterion"] and (c["reproduced"] is None or isinstance(c["reproduced"], bool))
        assert c["ours"] == lookup(saved, c["key"])
    for fig in ("fig_method.png", "fig_decomposition.png", "fig_gap_by_resolution.png", "fig_estimator_rmse.png",
                "fig_samples_grid.png", "fig_loss_per_time.png"):
        assert (tmp_path / fig).stat().st_size > 1000


def test_same_seed_same_results_when_retrained(tmp_path, monkeypatch):
    """Reproducibility on CPU: two runs from empty checkpoint caches give the same results.json."""
    runs = []
    for name in ("a", "b"):
        monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / f"ckpt_{name}"))
        tb.main(["--preset", "smoke", "--out", str(tmp_path / name)])
        saved = json.loads((tmp_path / name / "results.json").read_text())
        saved.pop("seconds")
        runs.append(saved)
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_cpu_preset_decides_the_claims(tmp_path):
    """The page's claims on the real cpu preset (minutes; run with `pytest -m slow`)."""
    res = tb.main(["--preset", "cpu", "--out", str(tmp_path)])
    dec = res["decomposition"]
    assert len(dec["d"]) >= 4 and max(dec["d"]) >= 100 * min(dec["d"])
    assert dec["mc"]["inside"]
    assert all(b < a for a, b in zip(dec["ratio"], dec["ratio"][1:]))
    for c in res["claims"]:
        assert isinstance(c["reproduced"], bool)
