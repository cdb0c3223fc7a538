"""Reinforce Adjoint Matching: RL post-training of flow models as reward-corrected regression.
Bergmeister, Jegelka, Nuesken, Domingo-Enrich, Pidstrigach (2026), arXiv 2605.10759.
Baseline: Flow-GRPO (Liu et al. 2025, arXiv 2505.05470).

Claim reproduced
    KL-regularised reward maximisation of a flow model can be written as a consistency loss that
    corrects the *pretraining* regression target with the reward: no SDE rollouts, no adjoint
    sweep, no reward gradient. It reaches Flow-GRPO's peak reward in far fewer training steps
    (the paper: up to 50x on SD3.5-Medium, GenEval / OCR / PickScore).

Paper -> code
    the RAM loss (PAPERS.md section 1) ........... `ram_loss`, one round in `ram_round`
    group-normalised advantages .................. `group_advantages` (shared by both methods)
    p(t) ~ t, K re-noisings ...................... `ram_loss` (t = sqrt(U))
    exact KL tilt of a Gaussian mixture .......... `tilted_mixture`, Part A `tilt_experiment`
    Flow-GRPO SDE step and log-probability ....... common/sampler.py `sde_step`
    Flow-GRPO clipped objective + KL to ref ...... `grpo_round`
    GenEval-style "class at position" reward ..... `composition_reward`
    PickScore stand-in ........................... `preference_reward`

Conventions (common/flow.py): t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, target u = eps - x.
    RAM and Flow-GRPO are written in this convention already (SD3). Adjoint Matching, which RAM
    derives from, puts noise at t = 0: t_ours = 1 - t_theirs, v_ours = -v_theirs. The reward
    multiplier m plays the role of 1/lambda, the inverse KL weight: p*(x) ~ p_ref(x) exp(r(x)/lambda).

Why it works, and the under-tilt (reconstructed; PAPERS.md section 1). The tilted model keeps the
    pretraining noising law, so its velocity is E*[u | x_t], and along the tilt path
    d/dbeta E_beta[u | x_t] = Cov_beta(u, r | x_t) (beta = 1/lambda). RAM's regression has the fixed
    point  v - v_ref = m * Cov_q(A, u | x_t) = m * E_q[A (u - v) | x_t]  (A: the advantage), i.e. it
    uses the covariance at the END of the tilt path for the whole path. The exact tilt needs its
    average,  int_0^m Cov_beta dbeta.  The two agree when the posterior of x given x_t keeps its
    covariance under the tilt: a linear reward on a Gaussian (Part A: well-separated Gaussian modes). A
    concave quadratic reward narrows the posterior as beta grows, so the end-point covariance is
    the smallest one on the path: the correction is too small and the model is under-tilted (its
    variance stays above the exact one). The path-cost term of the paper's Section 5 restores the
    missing part; the main algorithm, implemented here, drops it.

Two things we found on the toy (ours, not the paper's). (1) The fixed point needs the rollout
    sampler to be accurate: it assumes the endpoints follow the flow of v_old exactly. With 16 Euler
    steps Part A stopped ~20% short of the linear tilt; with 64 it reaches it (Part A uses 64; the
    images keep 16, for time). (2) In v_old the target is a fixed-point iteration with gain
    -m E[A | x_t]: where m E[A | x_t] < -1 the linearised iteration is not a contraction and the EMA
    only slows it. Our reading of why large learning rates (and m = 100) destabilise RAM here.

Deviations. Toy rewards on 16 px procedural shapes: "composition" = evaluator p(class) x a soft
    left/right check (GenEval stand-in), "preference" = a smooth centred-and-large score (PickScore
    stand-in); the CNN evaluator (common/evaluator.py) stands in for the papers' scorers, its FD for
    FID. One 0.7 M-parameter TinyDiT instead of SD3.5-M; 40-120 rounds, not thousands. Part A uses raw
    advantages A = r - mean(r) so that m = 1/lambda holds exactly (normalised advantages change the
    effective lambda as the reward spread changes), clipped at 5 standard deviations against a
    runaway sample. Flow-GRPO log-probabilities are averaged over pixels, as in its official code,
    so the clip range is per pixel. Ours, not the papers': the reward definitions, all sizes, the
    learning rates (swept, see README).

Run
    python ram.py                    # cpu preset: both parts, both rewards, both methods (565 s measured, 2 cores)
    python ram.py --sweep true       # also rerun the learning-rate / m / clip sweep (adds ~17 min)
    python ram.py --preset smoke     # seconds, what the tests run
    python ram.py --preset gpu       # not measured yet
"""

# %% imports
import copy
import dataclasses
import math
import time

import torch
import torch.nn as nn
from tqdm import tqdm

from common import pretrain
from common.config import BaseConfig, UserError, cli, field, print_table, resolve_device, run_dir, save_json
from common.evaluator import get_evaluator, paired_distance
from common.flow import interpolate
from common.plot import plt, save_image_panels
from common.sampler import euler, gaussian_logprob, sample_labels, sde_step
from common.train import EMA, make_optimizer, optimizer_step

# %% config and presets


@dataclasses.dataclass
class Config(BaseConfig):
    base: str = field("cpu", "common.pretrain preset of the shared base model and evaluator (cached in "
                             "CHECKPOINT_DIR)", choices=("smoke", "cpu", "gpu"))
    tilt_rounds: int = field(400, "Part A: RAM rounds on the 2-D mixture (seconds on a CPU)")
    tilt_batch: int = field(512, "Part A: endpoints per round (one prompt)")
    rounds: int = field(120, "Part B: composition rounds per method (one batch of G samples per prompt); "
                             "Flow-GRPO is still rising at 120, the most the 15-minute budget allows")
    preference_rounds: int = field(40, "Part B: preference rounds per method (both saturate within ~30)")
    group: int = field(8, "G: samples per prompt (class) per round; 9 prompts, so 9 G reward evaluations a round")
    renoise: int = field(4, "K: re-noisings of each RAM endpoint (the paper uses about 8)")
    ram_lr: float = field(3e-4, "RAM learning rate (swept: see README)")
    ram_m: float = field(10.0, "RAM reward multiplier m ~ 1/lambda (swept)")
    grpo_lr: float = field(1e-3, "Flow-GRPO learning rate (swept)")
    grpo_clip: float = field(1e-2, "Flow-GRPO clip range epsilon of the per-pixel ratio (swept; the paper: 1e-4)")
    ode_steps: int = field(16, "Euler steps of RAM rollouts and of every evaluation")
    sde_steps: int = field(10, "SDE steps of Flow-GRPO rollouts (the paper trains with 10)")
    n_eval: int = field(144, "held-out prompts (classes in turn), each with its own fixed noise")
    eval_every: int = field(4, "evaluate on the held-out set every this many rounds")
    sweep: bool = field(False, "also rerun the learning-rate / m / clip sweep on the composition reward")

    def validate(self):
        if self.eval_every > min(self.rounds, self.preference_rounds):
            raise UserError(f"--eval-every {self.eval_every} must not exceed --rounds or --preference-rounds")
        if self.n_eval < 18:
            raise UserError(f"--n-eval must be >= 18 (two held-out samples per class), got {self.n_eval}")


PRESETS = {
    "smoke": dict(base="smoke", tilt_rounds=40, tilt_batch=128, rounds=2, preference_rounds=2, group=2, renoise=2,
                  ode_steps=4, sde_steps=3, n_eval=18, eval_every=1),
    "cpu": dict(),
    "gpu": dict(base="gpu", tilt_rounds=2000, rounds=300, preference_rounds=100, group=24, renoise=8, n_eval=1152,
                eval_every=5),
}
EMA_OLD = 0.9  # decay of RAM's lagged rollout policy, stepped once per round (PAPERS.md)
SDE_NOISE = 0.7  # Flow-GRPO's noise level a
KL_BETA = 0.04  # Flow-GRPO's KL weight (reference setting, not tuned)
GRPO_MINIBATCHES = 2  # optimizer steps per Flow-GRPO round: with one the ratio is always 1 and the clip idle
ADV_CLIP = 5.0  # advantages are clipped to +-5 (Flow-GRPO); with G <= 24 it almost never binds

# %% the method: advantages and the RAM loss


def group_advantages(r: torch.Tensor, group: int) -> torch.Tensor:
    """r: (P * G,) rewards, prompt-major (G consecutive samples per prompt) -> (P * G,) advantages
    normalised within each prompt's group: (r - mean) / (std + 1e-4), clipped to +-ADV_CLIP."""
    rg = r.double().reshape(-1, group)  # (P, G); float64, or equal rewards leave rounding noise / 1e-4
    A = (rg - rg.mean(1, keepdim=True)) / (rg.std(1, keepdim=True) + 1e-4)
    return A.clamp(-ADV_CLIP, ADV_CLIP).reshape(-1).to(r.dtype)


def ram_target(v_ref, v_old, x, eps, A, m: float):
    """The RAM regression target v_ref + m A ((eps - x) - v_old): the pretraining target when every
    advantage is zero. x, eps, v_*: (B, ...), A: (B,)."""
    A = A.reshape(-1, *([1] * (x.dim() - 1)))
    return v_ref + m * A * ((eps - x) - v_old)


def ram_loss(policy, ref, old, x, A, m: float, K: int, g: torch.Generator, y=None):
    """One RAM loss on endpoints x (B, ...) with advantages A (B,), each re-noised K times.
    policy/ref/old: velocity nets v(x_t, t, y). Only the policy gets gradients."""
    x, A = x.repeat(K, *([1] * (x.dim() - 1))), A.repeat(K)  # (K B, ...)
    y = None if y is None else y.repeat(K)
    t = torch.rand(len(x), generator=g).sqrt().to(x.device)  # p(t) ~ t: biased to the noise end
    eps = torch.randn(x.shape, generator=g).to(x.device)
    xt = interpolate(x, eps, t)
    with torch.no_grad():  # the target carries no gradient (it uses the frozen ref and the lagged old)
        target = ram_target(ref(xt, t, y), old(xt, t, y), x, eps, A, m)
    return (policy(xt, t, y) - target).pow(2).flatten(1).mean(1).mean()


@torch.no_grad()
def ema_step(old: nn.Module, policy: nn.Module, decay: float = EMA_OLD) -> None:
    """old <- decay old + (1 - decay) policy: the lagged policy RAM draws its endpoints from."""
    for po, pp in zip(old.parameters(), policy.parameters()):
        po.lerp_(pp, 1 - decay)


# %% Part A: the exact tilt of a 2-D Gaussian mixture (seconds)

MIX_MEANS = torch.tensor([[-2.5, 0.0], [0.0, 0.0], [2.5, 0.0]])  # three well-separated isotropic modes
MIX_WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
MIX_STD = 0.5  # s
LIN_W = torch.tensor([0.3, 1.5])  # r(x) = w.x: moves mass across modes (x) and every mode up (y)
QUAD_A = 4.0  # r(x) = -a y^2 / 2: every mode keeps its weight, its y-variance s^2 becomes s^2 / (1 + m a s^2)
TILT_M = 1.0  # m = 1 / lambda
TILT_LR = 1e-3  # Adam learning rate of Part A's fine-tuning, decayed linearly to 0 (a stochastic fixed point)
TILT_SAMPLER_STEPS = 64  # Euler steps of Part A's rollouts: with 16 the fixed point lands ~20% short (README)


class MLPVelocity(nn.Module):
    """v(x, t) for 2-D points: x and sin/cos features of t -> three 128-wide SiLU layers -> 2."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, 9).float() * math.pi)
        self.net = nn.Sequential(nn.Linear(2 + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, y=None):  # x (B, 2), t (B,) -> (B, 2); y is ignored (one "prompt")
        ang = t[:, None] * self.freqs
        return self.net(torch.cat([x, ang.sin(), ang.cos()], 1))


def sample_mixture(n, g, means=MIX_MEANS, weights=MIX_WEIGHTS, std=MIX_STD):
    k = torch.multinomial(weights, n, replacement=True, generator=g)
    return means[k] + std * torch.randn(n, 2, generator=g)


def tilted_mixture(w: torch.Tensor, m: float):
    """Closed form of p_ref(x) exp(m w.x) for the isotropic mixture: each N(mu, s^2 I) moves to
    mu + s^2 m w, and its weight scales by exp(m w.mu + s^2 m^2 |w|^2 / 2). -> (means, weights)."""
    s2 = MIX_STD**2
    logw = MIX_WEIGHTS.log() + m * MIX_MEANS @ w + s2 * m**2 * w.pow(2).sum() / 2
    return MIX_MEANS + s2 * m * w, torch.softmax(logw, 0)


def mode_weights(x, means):
    """Share of samples nearest to each mode mean -> (n_modes,)."""
    return torch.bincount(torch.cdist(x, means).argmin(1), minlength=len(means)).float() / len(x)


def tilt_experiment(cfg, progress=True):
    """Pretrain an MLP flow on the mixture, then RAM-fine-tune it for a linear and a quadratic reward.
    The reference is the pretrained MLP itself; everything is seeded."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    base = MLPVelocity()
    opt, ema = make_optimizer(base, 2e-3), EMA(base, 0.995)
    steps = max(200, 8 * cfg.tilt_rounds)  # 3,200 at the cpu preset: mode variances within 3% of s^2
    for _ in tqdm(range(steps), desc="Part A: pretrain the 2-D flow", leave=False, disable=not progress):
        x, eps, t = sample_mixture(512, g), torch.randn(512, 2, generator=g), torch.rand(512, generator=g)
        optimizer_step((base(interpolate(x, eps, t), t) - (eps - x)).pow(2).sum(1).mean(), base, opt, ema)
    ema.copy_to(base)
    noise = torch.randn(8192, 2, generator=g)  # one fixed noise for every evaluation
    sample = lambda model: euler(lambda x, t: model(x, t), noise, TILT_SAMPLER_STEPS)  # noqa: E731
    x_base = sample(base)

    def finetune(reward):
        policy, old = copy.deepcopy(base), copy.deepcopy(base)
        opt = make_optimizer(policy, TILT_LR)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / cfg.tilt_rounds)
        for _ in tqdm(range(cfg.tilt_rounds), desc="Part A: RAM", leave=False, disable=not progress):
            noise = torch.randn(cfg.tilt_batch, 2, generator=g)
            x = euler(lambda x, t: old(x, t), noise, TILT_SAMPLER_STEPS).clone()  # endpoints from the lagged policy
            r = reward(x)
            A = r - r.mean()  # raw advantages: keeps m = 1 / lambda exact (see the paper card)
            A = A.clamp(-5 * A.std(), 5 * A.std())  # guard against a runaway sample (binds ~1 in 10^6)
            optimizer_step(ram_loss(policy, base, old, x, A, TILT_M, 4, g), policy, opt)
            ema_step(old, policy)
            sched.step()
        return sample(policy)

    x_lin = finetune(lambda x: x @ LIN_W)
    means_exact, weights_exact = tilted_mixture(LIN_W, TILT_M)
    mean_ref, mean_exact = MIX_WEIGHTS @ MIX_MEANS, weights_exact @ means_exact
    shift = (mean_exact - mean_ref).norm()
    # quadratic reward in y: the modes all sit at y = 0, so the tilt only narrows them in y
    x_quad = finetune(lambda x: -QUAD_A * x[:, 1].pow(2) / 2)
    return dict(
        mean_error=float((x_lin.mean(0) - mean_exact).norm() / shift),
        weight_error=float((mode_weights(x_lin, means_exact) - weights_exact).abs().sum() / 2),  # total variation
        quadratic_var=float(x_quad[:, 1].var()),
        quadratic_var_exact=MIX_STD**2 / (1 + TILT_M * QUAD_A * MIX_STD**2),
        base_mean_error=float((x_base.mean(0) - mean_exact).norm() / shift),
        base_weight_error=float((mode_weights(x_base, means_exact) - weights_exact).abs().sum() / 2),
        base_var=float(x_base[:, 1].var()),
        exact_shift=float(shift), mean_reached=x_lin.mean(0).tolist(), mean_exact=mean_exact.tolist(),
        weights_reached=mode_weights(x_lin, means_exact).tolist(), weights_exact=weights_exact.tolist(),
    ), (x_base, x_lin, x_quad, means_exact)


# %% Part B: the rewards (programmatic stand-ins for GenEval and PickScore)


def lit_centre_and_size(x: torch.Tensor):
    """x: (B, 3, S, S) in [-1, 1] -> centre (cx, cy) (B,) in pixels and the equal-area radius (B,) of
    the lit pixels. Brightness = the brightest channel in [0, 1]; the faintest quarter is treated
    as background, so sampler noise on the black background does not pull the centre."""
    S = x.shape[-1]
    lit = (((x.amax(1) + 1) / 2 - 0.25) / 0.75).clamp(0, 1)  # (B, S, S)
    mass = lit.sum((1, 2)) + 1e-6
    coords = torch.arange(S, dtype=x.dtype, device=x.device) + 0.5  # pixel centres
    cx = (lit.sum(1) * coords).sum(1) / mass
    cy = (lit.sum(2) * coords).sum(1) / mass
    return cx, cy, (mass / math.pi).sqrt()


def place_check(x: torch.Tensor, y: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Soft "is the shape in the half its prompt names": even labels left, odd labels right.
    sigmoid of the signed distance (pixels) of the lit centre from the midline, over tau. -> (B,)."""
    cx, _, _ = lit_centre_and_size(x)
    side = torch.where(y % 2 == 0, -1.0, 1.0).to(x.device)  # -1: left half, +1: right half
    return torch.sigmoid(side * (cx - x.shape[-1] / 2) / tau)


def composition_reward(x, y, class_probs) -> torch.Tensor:
    """GenEval-style "class at position": p(prompted class | x) x place_check. class_probs(x) ->
    (B, n_classes) probabilities (the evaluator, or a stub in tests)."""
    p = class_probs(x).gather(1, y.reshape(-1, 1).to(x.device)).squeeze(1)
    return p * place_check(x, y)


def preference_reward(x, y=None) -> torch.Tensor:
    """Our PickScore stand-in, a smooth score of "a prominent, centred subject" (two classic
    composition cues): exp(-d^2 / (2 * 1.5^2)) * exp(-(r_eq - 4.5)^2 / 2), with d the distance (px) of
    the lit centre from the image centre and r_eq the equal-area radius (px) of the lit pixels.
    Training shapes have radii of 2.9-4.8 px at 16 px and sit up to about 3 px off centre, so the
    best score is inside the data but the base model is far from it. Prompt-free, like an aesthetic score."""
    cx, cy, r_eq = lit_centre_and_size(x)
    S = x.shape[-1]
    d2 = (cx - S / 2) ** 2 + (cy - S / 2) ** 2
    return torch.exp(-d2 / (2 * 1.5**2)) * torch.exp(-((r_eq - 4.5 * S / 16) ** 2) / 2)


# %% Part B: one training round of each method


def prompts_for_round(n_classes: int, group: int) -> torch.Tensor:
    """Every class once, G times in a row (prompt-major): (n_classes * G,)."""
    return torch.arange(n_classes).repeat_interleave(group)


def ram_round(policy, ref, old, opt, y, reward, cfg, g, m, device):
    """RAM: ODE endpoints from the lagged old policy, advantages, one regression step, EMA step."""
    noise = torch.randn(len(y), policy.C, policy.img_size, policy.img_size, generator=g).to(device)
    x = euler(lambda x, t: old(x, t, y), noise, cfg.ode_steps).clone()  # (B, C, S, S), no gradient
    r = reward(x, y)
    A = group_advantages(r, cfg.group).to(device)
    optimizer_step(ram_loss(policy, ref, old, x, A, m, cfg.renoise, g, y), policy, opt)
    ema_step(old, policy)
    return r.mean().item(), 1  # mean training reward, optimizer steps


def grpo_round(policy, ref, opt, y, reward, cfg, g, clip, device):
    """Flow-GRPO: SDE rollouts that store every step's log-probability, then GRPO_MINIBATCHES
    optimizer steps of the clipped objective plus a KL penalty to the reference on every step."""
    grid = torch.linspace(1, 0, cfg.sde_steps + 1)
    x = torch.randn(len(y), policy.C, policy.img_size, policy.img_size, generator=g).to(device)
    d = x[0].numel()  # log-probs are averaged over pixels (Flow-GRPO's code), so the clip is per pixel
    xs, logp_old = [x], []
    with torch.no_grad():
        for t, t_next in zip(grid[:-1], grid[1:]):
            tb, tnb = t.expand(len(y)).to(device), t_next.expand(len(y)).to(device)
            noise = torch.randn(x.shape, generator=g).to(device)  # drawn on the CPU: the same on every device
            _, _, mean, std = sde_step(x, policy(x, tb, y), tb, tnb, SDE_NOISE, x_next=x)  # the step's Gaussian
            x = mean + std.reshape(-1, 1, 1, 1) * noise
            logp_old.append(gaussian_logprob(x, mean, std) / d)
            xs.append(x)
    r = reward(x, y)
    A = group_advantages(r, cfg.group).to(device)
    order = torch.randperm(len(y), generator=g)
    for mb in order.chunk(GRPO_MINIBATCHES):
        loss = 0.0
        for j, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            tb, tnb = t.expand(len(mb)).to(device), t_next.expand(len(mb)).to(device)
            x_j, y_j = xs[j][mb], y[mb]
            _, logp, mean, std = sde_step(x_j, policy(x_j, tb, y_j), tb, tnb, SDE_NOISE, x_next=xs[j + 1][mb])
            ratio = torch.exp(logp / d - logp_old[j][mb])
            pg = torch.maximum(-A[mb] * ratio, -A[mb] * ratio.clamp(1 - clip, 1 + clip)).mean()
            with torch.no_grad():
                _, _, mean_ref, _ = sde_step(x_j, ref(x_j, tb, y_j), tb, tnb, SDE_NOISE, x_next=xs[j + 1][mb])
            # KL between the two Gaussian steps (same std): |mean - mean_ref|^2 / (2 std^2), per pixel
            kl = ((mean - mean_ref).pow(2).flatten(1).mean(1) / (2 * std**2)).mean()
            loss = loss + (pg + KL_BETA * kl) / cfg.sde_steps
        optimizer_step(loss, policy, opt)
    return r.mean().item(), GRPO_MINIBATCHES



# %% Part B: training runs, evaluation and the comparison


def sample_images(model, y, noise, steps: int, batch: int = 288) -> torch.Tensor:
    """Plain conditional ODE samples (no CFG: scale 1) from fixed noise -> (B, C, S, S) on the CPU."""
    return sample_labels(model, y, steps, 1.0, batch=batch, noise=noise)


def train_method(method, base, reward, cfg, lr, hp, rounds, held_out, device, seed, progress=True):
    """One method from the base weights for `rounds` rounds. hp: m (RAM) or the clip range (GRPO).
    held_out = (labels, noise, base_reward). -> (curve, final held-out samples).
    `seconds` counts training only (rollouts, rewards, updates), not the held-out evaluations."""
    policy, ref = copy.deepcopy(base).train().requires_grad_(True), base.eval().requires_grad_(False)
    old = copy.deepcopy(base) if method == "ram" else None  # never trained: it follows the policy by EMA
    opt = make_optimizer(policy, lr)
    g = torch.Generator().manual_seed(seed)  # the same seed for both methods: the same draws where they match
    y = prompts_for_round(base.n_classes, cfg.group).to(device)
    y_eval, noise_eval, base_reward = held_out
    curve = dict(steps=[0], optimizer_steps=[0], reward=[base_reward], seconds=[0.0])
    n_steps, seconds = 0, 0.0
    bar = tqdm(range(1, rounds + 1), desc=f"{method}", leave=False, disable=not progress, mininterval=1.0)
    for rnd in bar:
        t0 = time.perf_counter()
        if method == "ram":
            r_train, n = ram_round(policy, ref, old, opt, y, reward, cfg, g, hp, device)
        else:
            r_train, n = grpo_round(policy, ref, opt, y, reward, cfg, g, hp, device)
        seconds += time.perf_counter() - t0
        n_steps += n
        if rnd % cfg.eval_every == 0 or rnd == rounds:
            x = sample_images(policy, y_eval, noise_eval, cfg.ode_steps)
            curve["steps"].append(rnd)
            curve["optimizer_steps"].append(n_steps)
            curve["reward"].append(reward(x, y_eval).mean().item())
            curve["seconds"].append(round(seconds, 2))
            bar.set_postfix(train=f"{r_train:.3f}", held_out=f"{curve['reward'][-1]:.3f}", refresh=False)
    return curve, sample_images(policy, y_eval, noise_eval, cfg.ode_steps)


def peak_stats(ram, grpo) -> dict:
    """Flow-GRPO's peak held-out reward and its round; the first round at which RAM reaches it."""
    i = max(range(len(grpo["reward"])), key=lambda k: grpo["reward"][k])
    peak = grpo["reward"][i]
    j = next((k for k, r in enumerate(ram["reward"]) if r >= peak), None)
    ram_steps = ram["steps"][j] if j is not None else None
    ok = j is not None and ram_steps > 0 and grpo["steps"][i] > 0
    return dict(grpo_peak=peak, grpo_steps_to_peak=grpo["steps"][i], ram_steps_to_grpo_peak=ram_steps,
                steps_ratio=grpo["steps"][i] / ram_steps if ok else None,
                seconds_ratio=grpo["seconds"][i] / ram["seconds"][j] if ok else None)


def diversity(features: torch.Tensor, y: torch.Tensor) -> float:
    """Mean pairwise distance of unit-normalised evaluator features within a class, over classes."""
    per_class = []
    for c in y.unique():
        f = features[y == c]
        i, j = torch.triu_indices(len(f), len(f), 1)
        per_class.append(paired_distance(f[i], f[j]).mean())
    return float(torch.stack(per_class).mean())


def make_rewards(evaluator):
    class_probs = lambda x: evaluator.logits(x).softmax(1).to(x.device)  # noqa: E731
    return dict(composition=lambda x, y: composition_reward(x, y, class_probs), preference=preference_reward)


def held_out_set(cfg, base, seed: int):
    """Fixed prompts (classes in turn) and fixed noises, the same for every model and round."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(cfg.n_eval) % base.n_classes
    return y, torch.randn(cfg.n_eval, base.C, base.img_size, base.img_size, generator=g)


# The sweep behind the defaults (README): each method's learning rate, then m (RAM) or the clip range
# (Flow-GRPO) at a good learning rate; the same prompts, G and reward evaluations per round as the main run.
SWEEP_GRID = ([("ram", lr, 30.0) for lr in (1e-4, 3e-4, 1e-3)] + [("ram", 3e-4, m) for m in (10.0, 100.0)]
              + [("grpo", lr, 1e-3) for lr in (1e-4, 3e-4, 1e-3, 3e-3)] + [("grpo", 1e-3, c) for c in (1e-4, 1e-2)])


def sweep(cfg, base, rewards, device) -> list:
    """SWEEP_GRID on the composition reward: a quarter of the rounds, half the held-out prompts,
    evaluated every 5 rounds, on noises of their own (not the reported ones). Score: the mean of the
    last two evaluations (a run that peaks and then collapses should not win)."""
    cfg = dataclasses.replace(cfg, n_eval=max(18, cfg.n_eval // 2), eval_every=5)
    y, noise = held_out_set(cfg, base, cfg.seed + 555)
    reward = rewards["composition"]
    base_r = reward(sample_images(base, y, noise, cfg.ode_steps), y).mean().item()
    rows = []
    for method, lr, hp in tqdm(SWEEP_GRID, desc="sweep"):
        curve, _ = train_method(method, base, reward, cfg, lr, hp, max(2, cfg.rounds // 4), (y, noise, base_r),
                                device, cfg.seed + 1, progress=False)
        rows.append(dict(method=method, lr=lr, **{"m" if method == "ram" else "clip": hp},
                         final=sum(curve["reward"][-2:]) / 2, peak=max(curve["reward"]), seconds=curve["seconds"][-1]))
        print(rows[-1])
    return rows


# %% figures


def figures(out, tilt_points, rewards_out, samples):
    x_base, x_lin, x_quad, means_exact = tilt_points
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharex=True, sharey=True)
    for ax, (title, pts) in zip(axes, [("pretrained flow", x_base), ("RAM, linear reward", x_lin),
                                       ("RAM, quadratic reward", x_quad)]):
        ax.scatter(pts[:2000, 0], pts[:2000, 1], s=2, alpha=0.3)
        ax.scatter(MIX_MEANS[:, 0], MIX_MEANS[:, 1], marker="x", c="k", label="reference means")
        if "linear" in title:
            ax.scatter(means_exact[:, 0], means_exact[:, 1], marker="+", s=80, c="r", label="exact tilted means")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "fig_tilt.png", dpi=120)
    plt.close(fig)
    for xkey, name, label in (("steps", "rounds", "training round"), ("seconds", "seconds", "training seconds")):
        fig, axes = plt.subplots(1, len(rewards_out), figsize=(5 * len(rewards_out), 3.6))
        for ax, (rname, res) in zip(axes, rewards_out.items()):
            for method, lab in (("ram", "RAM"), ("grpo", "Flow-GRPO")):
                ax.plot(res[method][xkey], res[method]["reward"], marker="o", ms=2, label=lab)
            ax.axhline(res["base_reward"], color="gray", ls="--", lw=1, label="base model")
            ax.axhline(res["grpo_peak"], color="C1", ls=":", lw=1, label="Flow-GRPO peak")
            ax.set(xlabel=label, ylabel="held-out reward", title=f"{rname} reward")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"fig_reward_vs_{name}.png", dpi=120)
        plt.close(fig)
    for rname, (xb, xr, xg) in samples.items():
        save_image_panels([("base", xb[:36]), ("RAM", xr[:36]), ("Flow-GRPO", xg[:36])],
                          out / f"fig_samples_{rname}.png", nrow=9,
                          title=f"{rname} reward: same prompts and noise, one column per class (even: left)")


# %% run


def run(cfg: Config) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    out = run_dir(cfg, "ram")
    torch.manual_seed(cfg.seed)

    tilt, tilt_points = tilt_experiment(cfg)
    print(f"Part A: mean error {tilt['mean_error']:.3f}, weight error (TV) {tilt['weight_error']:.3f}, "
          f"quadratic variance {tilt['quadratic_var']:.4f} vs exact {tilt['quadratic_var_exact']:.4f}")

    pcfg = pretrain.Config(**{**pretrain.PRESETS[cfg.base], "preset": cfg.base, "seed": 0})
    base, _ = pretrain.base_model(pcfg, device)
    evaluator, _ = get_evaluator(pcfg.dataset, pcfg.size, device, pcfg.eval_steps, pcfg.seed)
    rewards = make_rewards(evaluator)
    y_eval, noise_eval = held_out_set(cfg, base, cfg.seed + 1000)
    x_base = sample_images(base, y_eval, noise_eval, cfg.ode_steps)
    feats_base = evaluator.features(x_base)

    results_rewards, samples = {}, {}
    for rname, reward in rewards.items():
        base_r = reward(x_base, y_eval).mean().item()
        held_out = (y_eval, noise_eval, base_r)
        rounds = cfg.rounds if rname == "composition" else cfg.preference_rounds
        ram, x_ram = train_method("ram", base, reward, cfg, cfg.ram_lr, cfg.ram_m, rounds, held_out, device,
                                  cfg.seed + 1)
        grpo, x_grpo = train_method("grpo", base, reward, cfg, cfg.grpo_lr, cfg.grpo_clip, rounds, held_out,
                                    device, cfg.seed + 1)
        results_rewards[rname] = dict(
            ram=ram, grpo=grpo, base_reward=base_r, **peak_stats(ram, grpo),
            ram_final=ram["reward"][-1], grpo_final=grpo["reward"][-1],
            fd_to_base=dict(ram=evaluator.fd(x_ram, x_base), grpo=evaluator.fd(x_grpo, x_base)),
            diversity=dict(ram=diversity(evaluator.features(x_ram), y_eval),
                           grpo=diversity(evaluator.features(x_grpo), y_eval),
                           base=diversity(feats_base, y_eval)),
            class_accuracy=dict(ram=evaluator.accuracy(x_ram, y_eval), grpo=evaluator.accuracy(x_grpo, y_eval),
                                base=evaluator.accuracy(x_base, y_eval)))
        samples[rname] = (x_base, x_ram, x_grpo)

    results = dict(tilt=tilt, rewards=results_rewards)
    if cfg.sweep:
        results["sweep"] = sweep(cfg, base, rewards, device)
    results.update(
        settings=dict(ram_lr=cfg.ram_lr, ram_m=cfg.ram_m, grpo_lr=cfg.grpo_lr, grpo_clip=cfg.grpo_clip,
                      kl_beta=KL_BETA, ema_old=EMA_OLD, sde_noise=SDE_NOISE, grpo_minibatches=GRPO_MINIBATCHES),
        metric_note="rewards are toy stand-ins (composition ~ GenEval position, preference ~ PickScore); "
                    "fd_to_base: evaluator Frechet distance to the base model's samples (FID stand-in); diversity: "
                    "mean within-class pairwise evaluator-feature distance; class_accuracy: evaluator accuracy of the "
                    "held-out samples (is the prompted class still drawn?); seconds count training, not evaluation",
        device=str(device), seconds=round(time.perf_counter() - t_start, 1))
    save_json(out / "results.json", results)
    figures(out, tilt_points, results_rewards, samples)

    print_table([(k, v) for k, v in tilt.items() if isinstance(v, float)])
    print()
    rows = []
    for rname, res in results_rewards.items():
        rows += [(rname, "base", res["base_reward"], "", "", res["diversity"]["base"], res["class_accuracy"]["base"]),
                 *[(rname, mth, res[f"{mth}_final"], max(res[mth]["reward"]), res["fd_to_base"][mth],
                    res["diversity"][mth], res["class_accuracy"][mth]) for mth in ("ram", "grpo")]]
    print_table(rows, ("reward", "model", "final", "best", "FD to base", "diversity", "class accuracy"))
    print()
    print_table([(f"{rname}: {k}", res[k]) for rname, res in results_rewards.items()
                 for k in ("grpo_peak", "grpo_steps_to_peak", "ram_steps_to_grpo_peak", "steps_ratio", "seconds_ratio")]
                + [("seconds", results["seconds"])])
    print(f"wrote {out}/results.json and figures")
    return results


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python ram.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
