import math

import pytest
import torch

from common.sampler import cfg_velocity, euler, gaussian_logprob, sample_labels, sde_mean, sde_std, sde_step, time_grid


def gaussian_velocity(m, s):
    """Exact v(x_t, t) = E[eps - x | x_t] for data N(m, s^2) on our path x_t = (1 - t) x + t eps."""
    def v(x, t):
        t = t.reshape(-1, *([1] * (x.dim() - 1)))  # (B,) -> broadcast over x
        a = 1 - t
        var = a * a * s * s + t * t
        return (t - a * s * s) * (x - a * m) / var - m
    return v


def test_euler_exact_for_constant_velocity():
    x1 = torch.randn(7, 2)
    c = torch.tensor([0.5, -2.0])
    for steps in (1, 3, 10):
        assert torch.allclose(euler(lambda x, t: c.expand_as(x), x1, steps), x1 - c, atol=1e-6)


def test_euler_recovers_gaussian_data():
    m, s = 0.7, 0.3
    x = euler(gaussian_velocity(m, s), torch.randn(100_000, 1, generator=torch.Generator().manual_seed(0)), 200)
    assert x.mean().item() == pytest.approx(m, rel=0.02)
    assert x.std().item() == pytest.approx(s, rel=0.02)


def test_sde_step_keeps_the_marginals():
    """Flow-GRPO's SDE has the ODE's marginals: with the exact velocity it also ends at the data."""
    m, s, g = 0.7, 0.3, torch.Generator().manual_seed(0)
    v, x, grid = gaussian_velocity(m, s), torch.randn(50_000, 1, generator=g), time_grid(100)
    for t, tn in zip(grid[:-1], grid[1:]):
        tb, tnb = t.expand(len(x)), tn.expand(len(x))
        x, logp, mean, std = sde_step(x, v(x, tb), tb, tnb, a=0.7, generator=g)
        assert torch.isfinite(logp).all() and (std > 0).all()
    assert x.mean().item() == pytest.approx(m, rel=0.03)
    assert x.std().item() == pytest.approx(s, rel=0.03)


def test_sde_logprob_is_the_gaussian_density():
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t, tn = torch.full((4,), 0.6), torch.full((4,), 0.5)
    x_next, logp, mean, std = sde_step(x, v, t, tn, generator=g)
    ref = torch.distributions.Normal(mean, std.reshape(-1, 1, 1, 1)).log_prob(x_next).flatten(1).sum(1)
    assert torch.allclose(logp, ref, atol=1e-4)
    _, logp_again, _, _ = sde_step(x, v, t, tn, x_next=x_next)  # scoring a given transition
    assert torch.allclose(logp, logp_again)
    mean_alone, std_t = sde_mean(x, v, t, tn)  # the step's mean and its std without sqrt|dt|
    assert torch.equal(mean_alone, mean) and torch.allclose(std_t * 0.1**0.5, std)
    assert torch.allclose(std_t, sde_std(t, tn, 0.7)) and torch.allclose(std_t, torch.full((4,), 0.7 * 1.5**0.5))
    assert torch.allclose(gaussian_logprob(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1)),
                          torch.tensor([-0.5 * math.log(2 * math.pi)]))


class Toy(torch.nn.Module):
    """A 'model' whose velocity depends on the label, for the CFG wrapper."""
    C, img_size, null_label = 1, 2, 3

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 0.5]))  # index 3: the null label

    def forward(self, x, t, y):
        return x * 0 + self.w[y].reshape(-1, 1, 1, 1)


def test_cfg_velocity_formula():
    model, x, t, y = Toy(), torch.zeros(2, 1, 2, 2), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(cfg_velocity(model, y, 1.0, 3)(x, t), model(x, t, y))
        assert torch.equal(cfg_velocity(model, y, 0.0, 3)(x, t), model(x, t, torch.full_like(y, 3)))
        uncond = model(x, t, torch.full_like(y, 3))
        expect = uncond + 2.5 * (model(x, t, y) - uncond)
        assert torch.allclose(cfg_velocity(model, y, 2.5, 3)(x, t), expect)


def test_sample_labels_same_seed_same_samples():
    model, y = Toy(), torch.tensor([0, 1, 2, 0])
    a, b = sample_labels(model, y, 4, 2.0, seed=5), sample_labels(model, y, 4, 2.0, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, sample_labels(model, y, 4, 2.0, seed=6))
