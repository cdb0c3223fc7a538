import itertools

import numpy as np
import pytest
import torch

from common.flow import (
    fm_loss,
    hungarian,
    interpolate,
    loss_per_time_bin,
    pair_noise,
    pairing_cost,
    sample_t,
    velocity_target,
)


def test_path_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    assert torch.allclose(interpolate(x, eps, torch.zeros(5)), x)  # t = 0 is data
    assert torch.allclose(interpolate(x, eps, torch.ones(5)), eps)  # t = 1 is noise
    t, h = torch.full((5,), 0.3), 1e-3
    finite_diff = (interpolate(x, eps, t + h) - interpolate(x, eps, t)) / h
    assert torch.allclose(finite_diff, velocity_target(x, eps), atol=1e-2)
    assert torch.allclose(fm_loss(eps - x, x, eps), torch.zeros(5))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_hungarian_matches_brute_force(n):
    rng = np.random.default_rng(n)
    for _ in range(30):
        cost = rng.normal(size=(n, n))
        col = hungarian(cost)
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert sorted(col) == list(range(n))
        assert cost[np.arange(n), col].sum() == pytest.approx(best, abs=1e-9)


def test_ot_pairing_is_a_permutation_with_lower_cost():
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(64, 3, 8, 8, generator=g), torch.randn(64, 3, 8, 8, generator=g)
    paired = pair_noise(x, eps, "ot")
    assert torch.equal(paired.flatten(1).sort(0).values, eps.flatten(1).sort(0).values)
    assert pairing_cost(x, paired) < pairing_cost(x, pair_noise(x, eps, "independent"))
    with pytest.raises(ValueError):
        pair_noise(x, eps, "sinkhorn")


def test_time_samplers_in_unit_interval():
    for kind in ("uniform", "logit_normal"):
        t = sample_t(1000, kind, torch.Generator().manual_seed(0))
        assert t.min() > 0 and t.max() < 1
    with pytest.raises(ValueError):
        sample_t(3, "beta")


def test_time_samplers_have_their_distributions():
    """logit_normal is sigmoid(N(0, 1)): its logit has mean 0 and std 1 (a uniform t's logit has std
    pi / sqrt(3) = 1.81), and it puts 31% of the times in (0.4, 0.6) against the uniform's 20%."""
    n = 20000
    ln = sample_t(n, "logit_normal", torch.Generator().manual_seed(0))
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean().item()) < 0.03 and logit.std().item() == pytest.approx(1.0, abs=0.03)
    assert ((ln > 0.4) & (ln < 0.6)).float().mean().item() == pytest.approx(0.315, abs=0.02)
    un = sample_t(n, "uniform", torch.Generator().manual_seed(0))
    assert un.mean().item() == pytest.approx(0.5, abs=0.01) and un.std().item() == pytest.approx(12 ** -0.5, abs=0.01)
    assert ((un > 0.4) & (un < 0.6)).float().mean().item() == pytest.approx(0.2, abs=0.02)


def test_loss_per_time_bin_matches_loop():
    g = torch.Generator().manual_seed(2)
    t, loss = torch.rand(500, generator=g), torch.rand(500, generator=g)
    centres, means = loss_per_time_bin(t, loss, bins=5)
    for i, (c, m) in enumerate(zip(centres, means)):
        sel = (t >= i / 5) & (t < (i + 1) / 5)
        assert c == pytest.approx((i + 0.5) / 5)
        assert m == pytest.approx(loss[sel].mean().item(), rel=1e-5)
