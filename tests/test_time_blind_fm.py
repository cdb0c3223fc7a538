import json
import math

import pytest
import torch

import time_blind_fm as tb
from common.flow import pair_noise, pairing_cost


def test_estimator_is_exact_without_a_noise_floor():
    """Data exactly inside a k-dim subspace (zero off-subspace floor), and noise whose energy
    outside the fitted subspace is exactly its expectation d - k: then q = t^2 and t_hat = t."""
    g = torch.Generator().manual_seed(0)
    n, d, k = 200, 300, 6
    U, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    x = 3 * torch.randn(n, k, generator=g, dtype=torch.float64) @ U.T + 0.5 * U[:, 0]  # not centred
    basis, c = tb.fit_subspace(x, k)
    assert c < 1e-20  # no energy outside the fitted subspace
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    off = eps - (eps @ basis) @ basis.T
    eps = (eps - off) + off / off.norm(dim=1, keepdim=True) * math.sqrt(d - basis.shape[1])
    t = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    xt = (1 - t[:, None]) * x + t[:, None] * eps
    assert torch.allclose(tb.estimate_t(xt, basis, c), t, atol=1e-9)


def test_estimator_inverts_its_own_model_for_any_floor():
    """q = t^2 + c (1 - t)^2 is inverted exactly for t above the turning point c / (1 + c)."""
    basis = torch.eye(10, dtype=torch.float64)[:, :2]
    for c in (0.0, 0.05, 0.3):
        t = torch.linspace(c / (1 + c) + 1e-3, 1, 50, dtype=torch.float64)
        q = t**2 + c * (1 - t) ** 2
        xt = torch.zeros(50, 10, dtype=torch.float64)
        xt[:, 2] = torch.sqrt(q * 8)  # all off-subspace energy in one coordinate: ||P x||^2 / (d-k) = q
        assert torch.allclose(tb.estimate_t(xt, basis, c), t, atol=1e-9)


def test_estimator_error_falls_with_d_minus_k():
    g = torch.Generator().manual_seed(0)
    errs = []
    for dmk in (50, 800):
        x = tb.spiked_data(1200, dmk + 4, 4, g)
        errs.append(tb.estimator_rmse(x[:400], x[400:], 4, g)[0])
    assert errs[1] < errs[0] / 2.5  # 16x the dimensions: theory 4x smaller error


def test_ot_coupling_lowers_the_pairing_cost_on_a_batch():
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(32, 3, 8, 8, generator=g), torch.randn(32, 3, 8, 8, generator=g)
    assert pairing_cost(x, pair_noise(x, eps, "ot")) <= pairing_cost(x, pair_noise(x, eps, "independent"))


def test_time_blind_net_ignores_t():
    cfg = tb.Config(model="xs")
    net = tb.make_net(cfg, 8, 3, time_cond=False).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(4, 3, 8, 8)
        assert torch.equal(net(x, torch.zeros(4)), net(x, torch.ones(4)))


def test_slope_of_a_power_law():
    xs = [10, 100, 1000]
    assert abs(tb.loglog_slope(xs, [x**-0.5 for x in xs]) + 0.5) < 1e-9


def test_smoke_run_writes_the_keys(tmp_path):
    res = tb.main(["--preset", "smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("estimator_slope", "estimator_rmse_sqrt_dmk", "estimator_slope_images", "loss", "fd",
                "coupling_effect", "time_effect", "gap_fraction_by_resolution", "plugin_fraction_by_resolution",
                "seconds"):
        assert key in saved and key in res
    assert set(saved["loss"]) == set(saved["fd"]) == {"cond_indep", "blind_indep", "cond_ot", "blind_ot"}
    assert set(saved["gap_fraction_by_resolution"]) == {"8", "16"}
    assert all(math.isfinite(v) for v in saved["loss"].values())
    for fig in ("fig_estimator_rmse.png", "fig_t_hat_vs_t.png", "fig_samples_grid.png", "fig_loss_per_time.png",
                "fig_gap_by_resolution.png"):
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
def test_cpu_preset_reproduces_the_claims(tmp_path):
    """The README's claims on the real cpu preset (minutes; run with `pytest -m slow`)."""
    res = tb.main(["--preset", "cpu", "--out", str(tmp_path)])
    assert -0.6 <= res["estimator_slope"] <= -0.4
    assert res["coupling_effect"] >= 2 * res["time_effect"]
    # The learned gap share is flat here (13% / 11% / 13%, see README), so a test of "32 px below
    # 8 px" would pass or fail on noise; we check the mechanism instead: reading t off x_t costs
    # less at 32 px than at 8 px (measured 3.3% vs 6.3%).
    plug = res["plugin_fraction_by_resolution"]
    assert plug["32"] < plug["8"]
