"""The toy tasks of ram.py: what RAM is asked to learn, and the exact answers to check it against.

A companion of ram.py, which holds the method, the training rounds, the race and the claims; this file
holds no part of the method. Part A is a 2-D Gaussian mixture whose KL-tilted distribution
p_ref(x) exp(m r(x)) has a closed form for a linear reward, with what RAM's own fixed point implies
(a reconstruction: docs/ram.md, "Why it works"). Part B is the image rewards: programmatic stand-ins
for GenEval ("the prompted class in the prompted place") and PickScore ("a prominent, centred subject
of the prompted class"), scored through a classifier of the shapes images.
"""

import math

import torch
import torch.nn as nn

# %% Part A: the 2-D mixture, its exact tilt and RAM's fixed point

MIX_MEANS = torch.tensor([[-2.5, 0.0], [0.0, 0.0], [2.5, 0.0]])  # three well-separated isotropic modes
MIX_WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
MIX_STD = 0.5  # s
LIN_W = torch.tensor([0.3, 1.5])  # r(x) = w.x: moves mass across modes (x) and every mode up (y)
QUAD_A = 4.0  # r(x) = -a y^2 / 2: every mode keeps its weight, its y-variance s^2 becomes s^2 / (1 + m a s^2)


class MLPVelocity(nn.Module):
    """v(x, t) for 2-D points: x and sin/cos features of t -> three 128-wide SiLU layers -> 2."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, 9).float() * math.pi)
        self.net = nn.Sequential(nn.Linear(2 + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, y=None):  # x (B, 2), t (B,) -> (B, 2); y is ignored (one "prompt")
        angle = t[:, None] * self.freqs
        return self.net(torch.cat([x, angle.sin(), angle.cos()], 1))


def sample_mixture(n, g, means=MIX_MEANS, weights=MIX_WEIGHTS, std=MIX_STD):
    mode = torch.multinomial(weights, n, replacement=True, generator=g)
    return means[mode] + std * torch.randn(n, 2, generator=g)


def tilted_mixture(w: torch.Tensor, m: float):
    """Closed form of p_ref(x) exp(m w.x) for the isotropic mixture: each N(mu, s^2 I) moves to
    mu + s^2 m w, and its weight scales by exp(m w.mu + s^2 m^2 |w|^2 / 2). -> (means, weights)."""
    s2 = MIX_STD**2
    log_weights = MIX_WEIGHTS.log() + m * MIX_MEANS @ w + s2 * m**2 * w.pow(2).sum() / 2
    return MIX_MEANS + s2 * m * w, torch.softmax(log_weights, 0)


def fixed_point_shift(w: torch.Tensor, m: float) -> torch.Tensor:
    """The mean shift RAM's fixed point itself implies at t = 1 (reconstructed, docs/ram.md): m Sigma_q w,
    Sigma_q the tuned model's covariance, taken as the exact tilt's. The exact tilt moves the mean by
    the integral of Sigma_beta w over beta in [0, m]. -> (2,)."""
    means, weights = tilted_mixture(w, m)
    d = means - weights @ means
    cov = MIX_STD**2 * torch.eye(2) + (weights[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)
    return m * cov @ w


def quadratic_tilt_var(m: float, a: float = QUAD_A, s2: float = MIX_STD**2) -> float:
    """The exact tilt under r = -a y^2 / 2: each mode's y-variance s^2 becomes s^2 / (1 + m a s^2)."""
    return s2 / (1 + m * a * s2)


def mode_share_error(x: torch.Tensor, means: torch.Tensor, weights: torch.Tensor) -> float:
    """Total variation between the shares of the samples x (N, 2) nearest each mode and the weights."""
    share = torch.bincount(torch.cdist(x, means).argmin(1), minlength=len(means)).float() / len(x)
    return float((share - weights).abs().sum() / 2)


def quadratic_fixed_point_var(m: float, a: float = QUAD_A, s2: float = MIX_STD**2) -> float:
    """The y-variance RAM's fixed point asks for near t = 1 under r = -a y^2 / 2 (reconstructed):
    with a Gaussian q = N(0, sig2) the condition reads s2 - sig2 = m a sig2^2. Near t = 0 it asks for
    the exact s2 / (1 + m a s2); this is larger, so the noise end under-tilts."""
    return (math.sqrt(1 + 4 * m * a * s2) - 1) / (2 * m * a)


# %% Part B: the rewards (programmatic stand-ins for GenEval and PickScore)


def lit_centre_and_size(x: torch.Tensor):
    """x: (B, 3, S, S) in [-1, 1] -> centre (cx, cy) (B,) in pixels and equal-area radius (B,) of the lit
    pixels (brightest channel; the faintest quarter is background, so sampler noise does not pull)."""
    S = x.shape[-1]
    lit = (((x.amax(1) + 1) / 2 - 0.25) / 0.75).clamp(0, 1)  # (B, S, S)
    mass = lit.sum((1, 2)) + 1e-6
    coords = torch.arange(S, dtype=x.dtype, device=x.device) + 0.5  # pixel centres
    cx = (lit.sum(1) * coords).sum(1) / mass
    cy = (lit.sum(2) * coords).sum(1) / mass
    return cx, cy, (mass / math.pi).sqrt()


def place_check(x: torch.Tensor, y: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Soft "is the shape in the half its prompt names" (even labels left, odd right): sigmoid of the
    lit centre's signed distance (px) from the midline over tau. -> (B,)."""
    cx, _, _ = lit_centre_and_size(x)
    side = torch.where(y % 2 == 0, -1.0, 1.0).to(x.device)  # -1: left half, +1: right half
    return torch.sigmoid(side * (cx - x.shape[-1] / 2) / tau)


def composition_reward(x, y, class_probs) -> torch.Tensor:
    """GenEval-style "class at position": p(prompted class | x) x place_check -> (B,). class_probs(x) ->
    (B, n_classes): the evaluator's, or a test's stub."""
    return class_probs(x).gather(1, y.reshape(-1, 1).to(x.device)).squeeze(1) * place_check(x, y)


def centred_and_prominent(x: torch.Tensor) -> torch.Tensor:
    """"A prominent, centred subject": exp(-d^2 / (2 1.5^2)) exp(-(r_eq - 4.5)^2 / 2), d the lit centre's
    distance (px) from the image centre, r_eq the lit pixels' equal-area radius (px at 16 px). -> (B,)."""
    cx, cy, r_eq = lit_centre_and_size(x)
    S = x.shape[-1]
    d2 = (cx - S / 2) ** 2 + (cy - S / 2) ** 2
    return torch.exp(-d2 / (2 * (1.5 * S / 16) ** 2)) * torch.exp(-((r_eq - 4.5 * S / 16) ** 2) / 2)


def preference_reward(x, y, class_probs) -> torch.Tensor:
    """Our PickScore stand-in: centred_and_prominent x p(prompted class | x) (without the class factor
    both methods learned to draw every class as a square blob: more lit area for its extent)."""
    return class_probs(x).gather(1, y.reshape(-1, 1).to(x.device)).squeeze(1) * centred_and_prominent(x)


def rewards_of(evaluators: list) -> dict:
    """Both rewards, their class probabilities averaged over `evaluators`' scores: [the training scorer],
    or the judges (evaluators of other seeds, which the policy never trains against)."""
    class_probs = [lambda x, ev=ev: ev.logits(x).softmax(1).to(x.device) for ev in evaluators]

    def mean_over(reward):
        return lambda x, y: torch.stack([reward(x, y, probs) for probs in class_probs]).mean(0)

    return dict(composition=mean_over(composition_reward), preference=mean_over(preference_reward))
