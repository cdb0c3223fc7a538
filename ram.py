"""Reinforce Adjoint Matching: RL post-training of flow models as reward-corrected regression.
Bergmeister, Jegelka, Nuesken, Domingo-Enrich, Pidstrigach (2026), arXiv 2605.10759. Baseline:
Flow-GRPO (Liu et al. 2025, arXiv 2505.05470), run as its official code runs it. Long-form notes
(why it works, where it under-tilts, the findings, Flow-GRPO's official details, deviations): docs/ram.md.

Claim. KL-regularised reward maximisation of a flow model is a consistency loss that corrects the
    *pretraining* regression target with the reward: no SDE rollouts, no adjoint sweep, no reward
    gradient. It reaches Flow-GRPO's peak reward in far fewer training steps (the paper: up to 50x
    on SD3.5-Medium, GenEval / OCR / PickScore).

Paper -> code
    RAM target  v_ref + m A ((eps - x) - v_old) ........ `ram_target`
    RAM loss, p(t) ~ t, K re-noisings ................... `ram_loss` (loop twin: `ram_loss_reference`)
    a RAM round: ODE endpoints of the lagged EMA policy . `ram_round`, `ema_step`
    advantages: prompt mean, the round's global std .... `group_advantages` (both methods)
    Flow-GRPO: SDE mean, per-pixel log-probability ..... common/sampler.py `sde_mean`, `transition_logprob`
    Flow-GRPO: clipped objective, beta KL to the ref ... `clipped_objective` (PPO-form twin), `grpo_kl`,
                                                          `grpo_loss`, `grpo_round`
    exact KL tilt of a 2-D mixture (Part A) ............ `tilt_experiment`; ram_tasks.py `tilted_mixture`
    the fixed point's own tilt (reconstructed) ......... ram_tasks.py `fixed_point_shift`, `quadratic_fixed_point_var`
    GenEval / PickScore stand-ins ...................... ram_tasks.py `composition_reward`, `preference_reward`
    the race: Flow-GRPO's levelled-off peak, RAM to it . `train_method`, `race_stats`

Convention (common/flow.py): t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, target u = eps - x.
    RAM and Flow-GRPO are written in it already (SD3). Adjoint Matching puts noise at t = 0:
    t_ours = 1 - t_theirs, v_ours = -v_theirs. The multiplier m plays 1/lambda, the inverse KL
    weight: p*(x) ~ p_ref(x) exp(r(x) / lambda).

Run (2 CPU cores, AMD EPYC, base model cached)
    python ram.py                    # cpu preset: Part A, both rewards, both methods (611 s)
    python ram_sweep.py              # the learning-rate sweep behind the defaults (730 s)
    python ram.py --preset smoke     # seconds, what the tests run
    python ram.py --preset gpu       # not measured yet
"""

# %% imports
import copy
import dataclasses
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import ram_tasks as tasks  # the toy tasks and their exact answers: Part A's mixture, Part B's rewards
from common import pretrain
from common.config import BaseConfig, UserError, cli, field, print_table, resolve_device, run_dir, save_json
from common.evaluator import get_evaluator, within_class_diversity
from common.flow import interpolate
from common.plot import plt, save_image_panels
from common.sampler import euler, gaussian_logprob, sample_labels, sde_mean, sde_std
from common.stats import first_at_or_above, levelled_off, trailing_mean
from common.train import EMA, make_optimizer, optimizer_step

# %% config and presets


@dataclasses.dataclass
class Config(BaseConfig):
    base: str = field("cpu", "common.pretrain preset of the base model and evaluators", choices=tuple(pretrain.PRESETS))
    tilt_rounds: int = field(400, "Part A: RAM rounds on the 2-D mixture (seconds on a CPU)")
    rounds: int = field(300, "composition race: Flow-GRPO's rounds, and the cap on RAM's (which stops at its peak)")
    preference_rounds: int = field(40, "preference race: the same, for the preference reward")
    group: int = field(8, "G: samples per prompt (class) per round, >= 2: 9 G reward evaluations a round, both methods")
    renoise: int = field(4, "K: re-noisings of each RAM endpoint (the paper uses about 8)")
    ram_lr: float = field(1e-3, "RAM learning rate (swept)")
    ram_m: float = field(10.0, "RAM reward multiplier m ~ 1/lambda")
    grpo_lr: float = field(3e-4, "Flow-GRPO learning rate (swept)")
    grpo_clip: float = field(1e-3, "Flow-GRPO clip range of the per-pixel ratio, < 1 (the paper: 1e-4)")
    ode_steps: int = field(16, "Euler steps of RAM rollouts and of every evaluation")
    sde_steps: int = field(10, "SDE steps of Flow-GRPO rollouts, >= 2 (the paper trains with 10)")
    n_eval: int = field(144, "held-out noises, >= 18 (the 9 training classes in turn, each with a fixed noise)")
    eval_every: int = field(4, "evaluate on the held-out noises every this many rounds")

    def validate(self):
        """Every bound known before any work starts, each as a one-line error."""
        checks = [(self.group >= 2, "--group must be >= 2 (advantages compare a prompt's samples)"),
                  (self.n_eval >= 18, "--n-eval must be >= 18 (two held-out noises per class)"),
                  (self.sde_steps >= 2, "--sde-steps must be >= 2 (Flow-GRPO trains on S - 1)"),
                  (self.grpo_clip < 1, "--grpo-clip must be < 1 (the ratio is clipped to [1 - clip, 1 + clip])")]
        checks += [(cap >= PLATEAU_WINDOW * self.eval_every, f"{flag} {cap} is too short for the plateau check: "
                    f"at least {PLATEAU_WINDOW} evaluations x --eval-every {self.eval_every}")
                   for flag, cap in (("--rounds", self.rounds), ("--preference-rounds", self.preference_rounds))]
        for message in (message for ok, message in checks if not ok):
            raise UserError(message)


PRESETS = {
    "smoke": dict(base="smoke", tilt_rounds=40, rounds=10, preference_rounds=10, group=2, renoise=2, ode_steps=4,
                  sde_steps=3, n_eval=18, eval_every=1),
    "cpu": dict(),
    "gpu": dict(base="gpu", tilt_rounds=2000, rounds=600, preference_rounds=200, group=24, renoise=8, n_eval=1152,
                eval_every=5),
}
EMA_OLD = 0.9  # decay of RAM's lagged rollout policy, stepped once per round, no warm-up (the paper: ~0.9)
WEIGHT_DECAY = 1e-4  # AdamW weight decay of both methods (Flow-GRPO's official adam_weight_decay)
SDE_NOISE = 0.7  # Flow-GRPO's noise level a (official noise_level)
GRPO_BETA = dict(composition=0.04, preference=0.01)  # KL weights of the official GenEval and PickScore configs
GRPO_MINIBATCHES = 2  # optimizer steps per Flow-GRPO round (official: "updated twice per epoch")
GRPO_STEP_FRACTION = 0.99  # official timestep_fraction: it trains on int(0.99 S) = S - 1 of the S SDE steps
ADV_CLIP = 5.0  # Flow-GRPO clips advantages to +-5 inside its loss (official adv_clip_max); RAM does not clip
JUDGE_SEEDS = (1, 2)  # the judges: the reward's evaluator retrained with these seeds
SMOOTH = 3  # held-out curves are read through a trailing mean over this many evaluations
PLATEAU_WINDOW, PLATEAU_TOL = 10, 0.01  # levelled off: the mean of the last 10 evaluations <= best before + 0.01

# %% the method: advantages, the RAM target and loss, Flow-GRPO's loss


def group_advantages(r: torch.Tensor, group: int) -> torch.Tensor:
    """r: (P * G,) rewards, prompt-major (G consecutive samples per prompt) -> (P * G,) advantages
    (r - mean of its prompt's group) / (std of ALL rewards of the round + 1e-4), the official
    `global_std`: a prompt whose samples all score alike gets small advantages, not its noise
    blown up to unit size. Used by both methods."""
    r64 = r.double()  # float64, or equal rewards leave rounding noise
    rg = r64.reshape(-1, group)  # (P, G)
    A = (rg - rg.mean(1, keepdim=True)) / (r64.std(unbiased=False) + 1e-4)  # np.std: the population std
    return A.reshape(-1).to(r.dtype)


def ram_target(v_ref, v_old, x, eps, A, m: float):
    """The RAM regression target v_ref + m A ((eps - x) - v_old). x, eps, v_*: (B, ...), A: (B,).
    With A = 0 it is the frozen reference; an endpoint with A > 0 pulls the velocity towards the
    straight line eps - x that produced it, one with A < 0 pushes it away."""
    A = A.reshape(-1, *([1] * (x.dim() - 1)))
    return v_ref + m * A * ((eps - x) - v_old)


def ram_loss(policy, ref, old, x, A, m: float, K: int, g: torch.Generator, y=None):
    """Endpoints x (B, ...) with advantages A (B,), each re-noised K times at t ~ p(t) ~ t; the policy
    regresses on the target. policy / ref / old: velocity nets v(x_t, t, y); only the policy gets
    gradients. -> scalar."""
    x, A = x.repeat(K, *([1] * (x.dim() - 1))), A.repeat(K)  # (K B, ...)
    y = None if y is None else y.repeat(K)
    t = torch.rand(len(x), generator=g).sqrt().to(x.device)  # p(t) ~ t: biased to the noise end
    eps = torch.randn(x.shape, generator=g).to(x.device)
    xt = interpolate(x, eps, t)
    with torch.no_grad():  # the target carries no gradient: the frozen ref and the lagged old make it
        target = ram_target(ref(xt, t, y), old(xt, t, y), x, eps, A, m)
    return (policy(xt, t, y) - target).pow(2).flatten(1).mean(1).mean()


def ram_loss_reference(policy, ref, old, x, A, m: float, K: int, g: torch.Generator, y=None):
    """`ram_loss` one re-noised endpoint at a time, from the same draws: the slow, plain twin."""
    B = len(x)
    t = torch.rand(K * B, generator=g).sqrt()
    eps = torch.randn(K * B, *x.shape[1:], generator=g)
    total = 0.0
    for n in range(K * B):
        i = n % B  # re-noising k = n // B of endpoint i
        xt = ((1 - t[n]) * x[i] + t[n] * eps[n])[None]
        tn, yn = t[n:n + 1], None if y is None else y[i:i + 1]
        with torch.no_grad():
            target = ref(xt, tn, yn) + m * A[i] * ((eps[n] - x[i]) - old(xt, tn, yn))
        total = total + (policy(xt, tn, yn) - target).pow(2).mean()
    return total / (K * B)


@torch.no_grad()
def ema_step(old: nn.Module, policy: nn.Module, decay: float = EMA_OLD) -> None:
    """old <- decay old + (1 - decay) policy: the lagged policy RAM draws its endpoints from."""
    for po, pp in zip(old.parameters(), policy.parameters()):
        po.lerp_(pp, 1 - decay)


def transition_logprob(policy, x, x_next, t, t_next, y):
    """Flow-GRPO's log-probability of one SDE step x -> x_next (B, ...) under the policy, averaged over
    pixels as the official code does (so the clip range is per pixel). -> (logp (B,), mean)."""
    mean, std_t = sde_mean(x, policy(x, t, y).float(), t, t_next, SDE_NOISE)
    return gaussian_logprob(x_next, mean, std_t * (t - t_next).sqrt()) / x[0].numel(), mean


def clipped_objective(ratio, A, clip: float):
    """PPO's clipped surrogate, as a loss: mean of max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip))."""
    return torch.maximum(-A * ratio, -A * ratio.clamp(1 - clip, 1 + clip)).mean()


def clipped_objective_reference(ratio, A, clip: float) -> float:
    """The same in PPO's own words, one sample at a time: -mean of min(A r, A clip(r))."""
    terms = [min(a * r, a * min(max(r, 1 - clip), 1 + clip)) for r, a in zip(ratio.tolist(), A.tolist())]
    return -sum(terms) / len(terms)


def grpo_kl(mean, mean_ref, t, t_next):
    """Flow-GRPO's KL penalty of one SDE step in the official form: the pixel mean of
    (mean - mean_ref)^2 / (2 std_t^2), std_t = a sqrt(t / (1 - t)) WITHOUT the step's sqrt|dt| (the
    exact Gaussian KL divides by std_t^2 |dt|, S times more at S steps). -> (B,)."""
    std_t = sde_std(t, t_next, SDE_NOISE)
    return (mean - mean_ref).pow(2).flatten(1).mean(1) / (2 * std_t**2)


def grpo_loss(policy, ref, xs, logp_old, y, A, hp, n_train: int):
    """One Flow-GRPO minibatch: over the first n_train SDE steps, the clipped objective on the ratio of
    the policy's and the rollout's log-probabilities plus beta x the KL to the reference, averaged
    over steps. xs: the S + 1 states (B, ...), logp_old: S (B,). -> (loss, ratios (n_train, B))."""
    grid = torch.linspace(1, 0, len(xs))
    loss, ratios = 0.0, []
    for j in range(n_train):  # the transition xs[j] -> xs[j + 1]
        t, t_next = (s.expand(len(y)).to(y.device) for s in (grid[j], grid[j + 1]))
        logp, mean = transition_logprob(policy, xs[j], xs[j + 1], t, t_next, y)
        ratio = torch.exp(logp - logp_old[j])
        kl = 0.0
        if hp["beta"] > 0:  # as the official code: no reference forward when beta = 0
            with torch.no_grad():
                mean_ref, _ = sde_mean(xs[j], ref(xs[j], t, y).float(), t, t_next, SDE_NOISE)
            kl = grpo_kl(mean, mean_ref, t, t_next).mean()
        loss = loss + (clipped_objective(ratio, A, hp["clip"]) + hp["beta"] * kl) / n_train
        ratios.append(ratio.detach())
    return loss, torch.stack(ratios)


# %% one training round of each method


def prompts_for_round(n_classes: int, group: int) -> torch.Tensor:
    """Every class once, G times in a row (prompt-major): (n_classes * G,)."""
    return torch.arange(n_classes).repeat_interleave(group)


def ram_round(policy, ref, old, opt, y, reward, cfg, g, hp, device):
    """RAM: ODE endpoints from the lagged old policy, advantages, one regression step, one EMA step.
    hp: dict(m=..., ema=...). -> (mean training reward, optimizer steps)."""
    noise = torch.randn(len(y), policy.C, policy.img_size, policy.img_size, generator=g).to(device)
    x = euler(lambda x, t: old(x, t, y), noise, cfg.ode_steps, bf16=False).clone()  # float32, as Flow-GRPO
    r = reward(x, y)
    A = group_advantages(r, cfg.group).to(device)
    optimizer_step(ram_loss(policy, ref, old, x, A, hp["m"], cfg.renoise, g, y), policy, opt)
    ema_step(old, policy, hp["ema"])
    return r.mean().item(), 1


def grpo_rollout(policy, y, cfg, g, device):
    """SDE rollouts that keep every state and each step's per-pixel log-probability (no gradient).
    -> (xs: S + 1 states (B, C, S, S), logp_old: S tensors (B,))."""
    grid = torch.linspace(1, 0, cfg.sde_steps + 1)
    x = torch.randn(len(y), policy.C, policy.img_size, policy.img_size, generator=g).to(device)
    xs, logp_old = [x], []
    with torch.no_grad():  # float32 on every device, as RAM's rollouts
        for t, t_next in zip(grid[:-1], grid[1:]):
            t, t_next = t.expand(len(y)).to(device), t_next.expand(len(y)).to(device)
            noise = torch.randn(x.shape, generator=g).to(device)  # drawn on the CPU: the same on every device
            mean, std_t = sde_mean(x, policy(x, t, y).float(), t, t_next, SDE_NOISE)
            step_std = std_t * (t - t_next).sqrt()
            x = mean + step_std.reshape(-1, 1, 1, 1) * noise
            logp_old.append(gaussian_logprob(x, mean, step_std) / x[0].numel())
            xs.append(x)
    return xs, logp_old


def grpo_round(policy, ref, opt, y, reward, cfg, g, hp, device):
    """Flow-GRPO: rollouts, advantages clipped to +-ADV_CLIP, then GRPO_MINIBATCHES optimizer steps on
    shuffled halves of the round. hp: dict(clip=..., beta=...). -> (mean training reward, steps)."""
    xs, logp_old = grpo_rollout(policy, y, cfg, g, device)
    r = reward(xs[-1], y)
    A = group_advantages(r, cfg.group).clamp(-ADV_CLIP, ADV_CLIP).to(device)
    n_train = int(GRPO_STEP_FRACTION * cfg.sde_steps)  # the last step is not trained
    for mb in torch.randperm(len(y), generator=g).chunk(GRPO_MINIBATCHES):
        loss, _ = grpo_loss(policy, ref, [x[mb] for x in xs], [lp[mb] for lp in logp_old], y[mb], A[mb], hp,
                            n_train)
        optimizer_step(loss, policy, opt)
    return r.mean().item(), GRPO_MINIBATCHES


# %% Part A: RAM on a 2-D Gaussian mixture whose exact tilt is known (ram_tasks.py; seconds)

TILT_M = 1.0  # m = 1 / lambda
TILT_LR = 1e-3  # Adam learning rate of Part A's fine-tuning, decayed linearly to 0 (a stochastic fixed point)
TILT_BATCH = 512  # endpoints per round (one prompt)
TILT_SAMPLER_STEPS = 64  # Euler steps of Part A's rollouts: with 16 the fixed point lands ~20% short (docs/ram.md)


def target_field(base, x, w, m: float, t: float, g, width: float = 0.35):
    """What the RAM regression asks of the velocity at one t, from the models' own state at the first
    round (v_old = v_ref = the pretrained MLP): endpoints x (N, 2) re-noised to x_t, each with its
    `ram_target`; the loss's minimiser is their conditional mean given x_t, here a Gaussian-kernel
    average on a grid. -> (x_t, A, grid (n, 2), mean v_ref (n, 2), mean target (n, 2), density (n,))."""
    A = x @ w - (x @ w).mean()
    eps, tt = torch.randn(x.shape, generator=g), torch.full((len(x),), t)
    xt = interpolate(x, eps, tt)
    with torch.no_grad():
        v_ref = base(xt, tt)
    side = torch.linspace(-3, 3, 7)
    grid = torch.stack(torch.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)
    kernel = torch.exp(-torch.cdist(grid, xt).pow(2) / (2 * width**2))  # (n, N)
    density = kernel.sum(1)
    kernel = kernel / density[:, None].clamp(min=1e-12)
    return xt, A, grid, kernel @ v_ref, kernel @ ram_target(v_ref, v_ref, x, eps, A, m), density


def tilt_experiment(cfg, progress=True):
    """Pretrain an MLP flow on the mixture, then RAM-fine-tune it for a linear and a quadratic reward,
    with the pretrained MLP as the reference. Everything is seeded. -> (numbers, what the figures draw)."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    base = tasks.MLPVelocity()
    opt, ema = make_optimizer(base, 2e-3), EMA(base, 0.995)
    steps = max(200, 8 * cfg.tilt_rounds)  # 3,200 at the cpu preset: mode variances within 3% of s^2
    for _ in tqdm(range(steps), desc="Part A: pretrain the 2-D flow", leave=False, disable=not progress):
        x, eps, t = tasks.sample_mixture(512, g), torch.randn(512, 2, generator=g), torch.rand(512, generator=g)
        optimizer_step((base(interpolate(x, eps, t), t) - (eps - x)).pow(2).sum(1).mean(), base, opt, ema)
    ema.copy_to(base)
    noise = torch.randn(8192, 2, generator=g)  # one fixed noise for every evaluation

    def sample(model):
        return euler(lambda x, t: model(x, t), noise, TILT_SAMPLER_STEPS)

    def finetune(reward):
        policy, old = copy.deepcopy(base), copy.deepcopy(base)
        opt = make_optimizer(policy, TILT_LR)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / cfg.tilt_rounds)
        for _ in tqdm(range(cfg.tilt_rounds), desc="Part A: RAM", leave=False, disable=not progress):
            x = euler(lambda x, t: old(x, t), torch.randn(TILT_BATCH, 2, generator=g), TILT_SAMPLER_STEPS).clone()
            r = reward(x)
            A = r - r.mean()  # raw advantages, unclipped: keeps m = 1 / lambda exact
            optimizer_step(ram_loss(policy, base, old, x, A, TILT_M, 4, g), policy, opt)
            ema_step(old, policy)
            sched.step()
        return sample(policy)

    x_base, x_lin = sample(base), finetune(lambda x: x @ tasks.LIN_W)
    x_quad = finetune(lambda x: -tasks.QUAD_A * x[:, 1].pow(2) / 2)  # the modes sit at y = 0: it only narrows them
    means_exact, weights_exact = tasks.tilted_mixture(tasks.LIN_W, TILT_M)
    mean_ref, mean_exact = tasks.MIX_WEIGHTS @ tasks.MIX_MEANS, weights_exact @ means_exact
    shift = (mean_exact - mean_ref).norm()
    mean_fixed_point = mean_ref + tasks.fixed_point_shift(tasks.LIN_W, TILT_M)

    def errors(x, prefix=""):  # relative mean error, total variation of the mode shares against the exact tilt
        return {prefix + "mean_error": float((x.mean(0) - mean_exact).norm() / shift),
                prefix + "weight_error": tasks.mode_share_error(x, means_exact, weights_exact)}

    numbers = dict(**errors(x_lin), **errors(x_base, "base_"), exact_shift=float(shift),
                   fixed_point_mean_error=float((mean_fixed_point - mean_exact).norm() / shift),
                   quadratic_var=float(x_quad[:, 1].var()), base_var=float(x_base[:, 1].var()),
                   quadratic_var_exact=tasks.quadratic_tilt_var(TILT_M),
                   quadratic_var_fixed_point_t1=tasks.quadratic_fixed_point_var(TILT_M))
    field = target_field(base, x_base, tasks.LIN_W, TILT_M, 0.5, g)
    return numbers, dict(x_base=x_base, x_lin=x_lin, x_quad=x_quad, means_exact=means_exact, field=field)


# %% the race: training runs, evaluation and the comparison


def held_out_set(cfg, base, seed: int):
    """Held-out noises: the training classes in turn, each with its own fixed noise (never used in
    training), the same for every model and round."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(cfg.n_eval) % base.n_classes
    return y, torch.randn(cfg.n_eval, base.C, base.img_size, base.img_size, generator=g)


def sample_images(model, y, noise, steps: int, batch: int = 288) -> torch.Tensor:
    """Plain conditional ODE samples (no CFG: scale 1) from fixed noise -> (B, C, S, S) on the CPU."""
    return sample_labels(model, y, steps, 1.0, batch=batch, noise=noise)


def plateaued(rewards: list) -> bool:
    """The race's plateau rule on held-out evaluations (the base model's first)."""
    return levelled_off(rewards, PLATEAU_WINDOW, PLATEAU_TOL, SMOOTH)


def train_method(method, base, reward, cfg, hp, rounds, held_out, device, seed, progress=True, target=None,
                 judge=None, stop_at_plateau=False):
    """One method from the base weights for `rounds` rounds, or until its smoothed held-out curve
    reaches `target` (or levels off, with stop_at_plateau). hp: lr plus m and ema (RAM) or clip and
    beta (Flow-GRPO). held_out = (labels, noise, base_reward). The curve "reward" is scored by
    `judge` (the training scorer if None), "proxy" by the training scorer on the same samples.
    `seconds` counts training only (rollouts, rewards, updates). -> (curve, final held-out samples)."""
    judge = reward if judge is None else judge
    policy, ref = copy.deepcopy(base).train().requires_grad_(True), base.eval().requires_grad_(False)
    old = copy.deepcopy(base) if method == "ram" else None  # never trained: it follows the policy by EMA
    opt = make_optimizer(policy, hp["lr"], WEIGHT_DECAY)
    g = torch.Generator().manual_seed(seed)  # the same seed for both methods: the same draws where they match
    y = prompts_for_round(base.n_classes, cfg.group).to(device)
    y_eval, noise_eval, base_reward = held_out
    x = sample_images(base, y_eval, noise_eval, cfg.ode_steps)  # held-out samples of the policy, updated below
    curve = dict(rounds=[0], optimizer_steps=[0], reward=[base_reward], seconds=[0.0], reached_target=False,
                 proxy=[reward(x, y_eval).mean().item()])
    n_steps, seconds = 0, 0.0
    bar = tqdm(range(1, rounds + 1), desc=method, leave=False, disable=not progress, mininterval=1.0)
    for rnd in bar:
        t0 = time.perf_counter()
        if method == "ram":
            r_train, n = ram_round(policy, ref, old, opt, y, reward, cfg, g, hp, device)
        else:
            r_train, n = grpo_round(policy, ref, opt, y, reward, cfg, g, hp, device)
        seconds, n_steps = seconds + time.perf_counter() - t0, n_steps + n
        if rnd % cfg.eval_every == 0 or rnd == rounds:
            x = sample_images(policy, y_eval, noise_eval, cfg.ode_steps)
            for key, value in (("rounds", rnd), ("optimizer_steps", n_steps), ("seconds", round(seconds, 2)),
                               ("reward", judge(x, y_eval).mean().item()), ("proxy", reward(x, y_eval).mean().item())):
                curve[key].append(value)
            bar.set_postfix(train=f"{r_train:.3f}", held_out=f"{curve['reward'][-1]:.3f}", refresh=False)
            if target is not None and trailing_mean(curve["reward"], SMOOTH)[-1] >= target:
                curve["reached_target"] = True
                break
            if stop_at_plateau and plateaued(curve["reward"]):
                break
    curve["smoothed"] = trailing_mean(curve["reward"], SMOOTH)
    return curve, x  # the last round is always evaluated, so x is the final policy's


def reading(curve: dict, k):
    """Where a curve stands at its evaluation k: rounds, optimizer steps, training seconds (None if k is)."""
    return None if k is None else {key: curve[key][k] for key in ("rounds", "optimizer_steps", "seconds")}


def race_stats(ram, grpo) -> dict:
    """Flow-GRPO's peak (the maximum of its smoothed curve) and where it got there; where RAM's smoothed
    curve first reaches it; the ratios Flow-GRPO / RAM of rounds, optimizer steps and seconds there
    (None when RAM never gets there). The same at half of Flow-GRPO's gain over the base."""
    grpo_s, ram_s = trailing_mean(grpo["reward"], SMOOTH), trailing_mean(ram["reward"], SMOOTH)
    peak = max(grpo_s)
    grpo_at_peak = reading(grpo, grpo_s.index(peak))
    ram_at_peak = reading(ram, first_at_or_above(ram_s, peak))
    half = grpo["reward"][0] + (peak - grpo["reward"][0]) / 2
    grpo_at_half = reading(grpo, first_at_or_above(grpo_s, half))
    ram_at_half = reading(ram, first_at_or_above(ram_s, half))

    def ratio(at_grpo, at_ram, key):
        ok = at_ram is not None and at_ram[key] > 0 and at_grpo[key] > 0
        return at_grpo[key] / at_ram[key] if ok else None

    return dict(grpo_peak=peak, grpo_plateaued=plateaued(grpo["reward"]), ram_peak=max(ram_s),
                grpo_rounds_run=grpo["rounds"][-1], ram_rounds_run=ram["rounds"][-1],
                grpo_at_peak=grpo_at_peak, ram_at_grpo_peak=ram_at_peak,
                rounds_ratio=ratio(grpo_at_peak, ram_at_peak, "rounds"),
                opt_steps_ratio=ratio(grpo_at_peak, ram_at_peak, "optimizer_steps"),
                seconds_ratio=ratio(grpo_at_peak, ram_at_peak, "seconds"),
                half_gain=half, grpo_at_half_gain=grpo_at_half, ram_at_half_gain=ram_at_half,
                half_gain_rounds_ratio=ratio(grpo_at_half, ram_at_half, "rounds"))


# %% figures (drawn from the saved numbers and the models' own state)


def figure_method(out, points):
    """What the RAM loss does, on Part A's mixture: the target field at its first round, and the result."""
    xt, A, grid, v_ref, target, density = points["field"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.9), sharex=True, sharey=True)
    lim, n = float(A.abs().quantile(0.98)), 3000
    x_base = points["x_base"]
    dots = axes[0].scatter(x_base[:n, 0], x_base[:n, 1], c=A[:n], cmap="coolwarm", vmin=-lim, vmax=lim, s=4)
    fig.colorbar(dots, ax=axes[0], label="advantage A = r - mean r", shrink=0.8)
    axes[0].set_title("1. samples of the pretrained flow,\ncoloured by advantage (reward r = w . x)")
    axes[1].scatter(xt[:n, 0], xt[:n, 1], c=A[:n], cmap="coolwarm", vmin=-lim, vmax=lim, s=2, alpha=0.4)
    seen = density > 20  # grid points with enough noised samples near them for a mean
    for velocity, colour, label in ((v_ref, "0.3", "pretrained velocity (the target when A = 0)"),
                                    (target, "C3", "RAM target v_ref + m A ((eps - x) - v_old)")):
        axes[1].quiver(grid[seen, 0], grid[seen, 1], -velocity[seen, 0], -velocity[seen, 1], color=colour, angles="xy",
                       scale_units="xy", scale=3.0, width=0.007, label=label)
    axes[1].set_title("2. the same samples noised to t = 0.5; arrows: where the\nvelocity sends them (-v), local mean")
    axes[1].legend(fontsize=9, loc="lower left")
    for ax, key, name in ((axes[2], "x_lin", "3. linear reward: the density moves\ntowards the KL-tilted model"),
                          (axes[3], "x_quad", "4. quadratic reward r = -2 x2^2:\nthe modes narrow in x2")):
        ax.scatter(x_base[:n, 0], x_base[:n, 1], s=2, alpha=0.25, color="0.5", label="pretrained flow")
        ax.scatter(points[key][:n, 0], points[key][:n, 1], s=2, alpha=0.25, color="C3", label="after RAM")
        ax.set_title(name)
    exact = points["means_exact"]
    axes[2].plot(exact[:, 0], exact[:, 1], "k+", ms=14, mew=2, ls="none", label="exact tilted mode means")
    for ax in axes:
        ax.set(xlim=(-4, 4), ylim=(-4, 4), xlabel="x1", ylabel="x2", aspect="equal")
    axes[2].legend(fontsize=9, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "fig_method.png", dpi=100)
    plt.close(fig)


def figures(out, rewards_out, samples):
    for xkey, label in (("rounds", "training round"), ("seconds", "training seconds")):
        fig, axes = plt.subplots(1, len(rewards_out), figsize=(5.5 * len(rewards_out), 4))
        for ax, (rname, res) in zip(axes, rewards_out.items()):
            for method, name, colour in (("ram", "RAM", "C0"), ("grpo", "Flow-GRPO", "C1")):
                curve = res[method]
                ax.plot(curve[xkey], curve["reward"], "o", ms=2, alpha=0.35, color=colour)
                ax.plot(curve[xkey], curve["smoothed"], color=colour,
                        label=name + (" (stops at the peak)" if curve["reached_target"] else ""))
                ax.plot(curve[xkey], trailing_mean(curve["proxy"], SMOOTH), color=colour, ls="--", lw=1,
                        label=f"{name}, its training scorer")
            ax.axhline(res["base_reward"], color="gray", ls="--", lw=1, label="base model")
            ax.axhline(res["grpo_peak"], color="C1", ls=":", lw=1, label="Flow-GRPO's peak (smoothed)")
            ax.set(xlabel=label, ylabel=f"held-out reward, judges (line: mean of {SMOOTH})", title=f"{rname} reward")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"fig_reward_vs_{xkey}.png", dpi=120)
        plt.close(fig)
    for rname, (xb, xr, xg) in samples.items():
        save_image_panels([("base", xb[:36]), ("RAM", xr[:36]), ("Flow-GRPO", xg[:36])],
                          out / f"fig_samples_{rname}.png", nrow=9,
                          title=f"{rname} reward: same prompts and noise, one column per class (even: left)")


# %% run


def claims_of(results: dict) -> list:
    """The paper's headline claims that this run tests, each with its criterion evaluated here."""
    tilt, claims = results["tilt"], []
    for rname, paper in (("composition", "up to 50x fewer steps (GenEval)"), ("preference", "up to 50x (PickScore)")):
        res = results["rewards"][rname]
        ok = res["grpo_plateaued"] and res["rounds_ratio"] is not None and res["rounds_ratio"] >= 2
        ram_at = res["ram_at_grpo_peak"]
        claims.append(dict(
            claim=f"RAM reaches Flow-GRPO's peak reward in fewer training rounds ({rname} reward)", paper=paper,
            ours=res["rounds_ratio"], key=f"rewards.{rname}.rounds_ratio", reproduced=bool(ok),
            criterion="grpo_plateaued and rounds_ratio >= 2",
            note=f"Flow-GRPO ran {res['grpo_rounds_run']} rounds, levelled off: {res['grpo_plateaued']}; " +
                 (f"RAM got there at round {ram_at['rounds']}" if ram_at else
                  f"RAM peaked at {res['ram_peak']:.3f} in {res['ram_rounds_run']} rounds")))
    claims.append(dict(
        claim="RAM reaches the KL-tilted model within 10% of its mean shift (linear reward, 2-D mixture)",
        paper="its fixed point is the tilted model", ours=tilt["mean_error"], key="tilt.mean_error",
        criterion="mean_error <= 0.1", reproduced=bool(tilt["mean_error"] <= 0.1),
        note=f"the fixed point itself falls {tilt['fixed_point_mean_error']:.3f} of the shift short; quadratic reward: "
             f"variance {tilt['quadratic_var']:.3f} reached, {tilt['quadratic_var_exact']:.3f} exact, "
             f"{tilt['quadratic_var_fixed_point_t1']:.3f} asked for near t = 1 (under-tilted)"))
    return claims


def models_and_scorers(cfg, device):
    """The shared base model, the training scorer's rewards and the judges' (all cached)."""
    pcfg = pretrain.Config(**{**pretrain.PRESETS[cfg.base], "preset": cfg.base, "seed": 0})
    base, _ = pretrain.base_model(pcfg, device)
    evaluators = [get_evaluator(pcfg.dataset, pcfg.size, device, pcfg.eval_steps, pcfg.seed + s)[0]
                  for s in (0, *JUDGE_SEEDS)]
    return base, tasks.rewards_of(evaluators[:1]), tasks.rewards_of(evaluators[1:]), evaluators[0], evaluators[1:]


def race(cfg, rname, base, rewards, judges, evaluator, judge_evs, held_out, x_base, device) -> tuple:
    """Flow-GRPO runs every round, then its curve is checked for a plateau; RAM, from the same seed,
    runs until its smoothed curve reaches Flow-GRPO's smoothed peak, or as many rounds."""
    rounds = cfg.rounds if rname == "composition" else cfg.preference_rounds
    hps = dict(grpo=dict(lr=cfg.grpo_lr, clip=cfg.grpo_clip, beta=GRPO_BETA[rname]),
               ram=dict(lr=cfg.ram_lr, m=cfg.ram_m, ema=EMA_OLD))
    grpo, x_grpo = train_method("grpo", base, rewards[rname], cfg, hps["grpo"], rounds, held_out, device, cfg.seed + 1,
                                judge=judges[rname])
    ram, x_ram = train_method("ram", base, rewards[rname], cfg, hps["ram"], rounds, held_out, device, cfg.seed + 1,
                              target=max(grpo["smoothed"]), judge=judges[rname])
    y, finals = held_out[0], dict(base=x_base, ram=x_ram, grpo=x_grpo)
    res = dict(ram=ram, grpo=grpo, base_reward=held_out[2], settings=hps, **race_stats(ram, grpo),
               ram_final=ram["reward"][-1], grpo_final=grpo["reward"][-1],
               proxy_final=dict(ram=ram["proxy"][-1], grpo=grpo["proxy"][-1]),
               fd_to_base={m: evaluator.fd(finals[m], x_base) for m in ("ram", "grpo")},
               diversity={m: within_class_diversity(evaluator.features(x), y) for m, x in finals.items()},
               class_accuracy={m: evaluator.accuracy(x, y) for m, x in finals.items()},
               class_accuracy_judges={m: sum(ev.accuracy(x, y) for ev in judge_evs) / len(judge_evs)
                                      for m, x in finals.items()})
    return res, (x_base, x_ram, x_grpo)


def run(cfg: Config) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    out = run_dir(cfg, "ram")
    torch.manual_seed(cfg.seed)
    tilt, points = tilt_experiment(cfg)
    figure_method(out, points)
    phase_seconds = dict(part_a=round(time.perf_counter() - t_start, 1))
    base, rewards, judges, evaluator, judge_evs = models_and_scorers(cfg, device)
    y_eval, noise_eval = held_out_set(cfg, base, cfg.seed + 1000)
    x_base = sample_images(base, y_eval, noise_eval, cfg.ode_steps)
    results_rewards, samples = {}, {}
    for rname in rewards:
        t0 = time.perf_counter()
        held_out = (y_eval, noise_eval, judges[rname](x_base, y_eval).mean().item())
        results_rewards[rname], samples[rname] = race(cfg, rname, base, rewards, judges, evaluator, judge_evs,
                                                      held_out, x_base, device)
        phase_seconds[rname] = round(time.perf_counter() - t0, 1)
    results = dict(tilt=tilt, rewards=results_rewards)
    results.update(
        claims=claims_of(results), device=str(device), phase_seconds=phase_seconds,
        constants=dict(weight_decay=WEIGHT_DECAY, sde_noise=SDE_NOISE, grpo_minibatches=GRPO_MINIBATCHES,
                       grpo_step_fraction=GRPO_STEP_FRACTION, adv_clip_grpo=ADV_CLIP, smooth=SMOOTH,
                       plateau_window=PLATEAU_WINDOW, plateau_tol=PLATEAU_TOL, judge_seeds=JUDGE_SEEDS),
        metric_note="reward: the judges' score of held-out samples; proxy: the training scorer's; seconds: "
                    "training only; the rest: docs/ram.md, Numbers", seconds=round(time.perf_counter() - t_start, 1))
    figures(out, results_rewards, samples)
    save_json(out / "results.json", results)  # last: a folder holds results.json only when its run finished

    print_table([(rname, m, res[f"{m}_final"], res["proxy_final"][m], max(res[m]["smoothed"]), res[m]["rounds"][-1],
                  res["fd_to_base"][m], res["diversity"][m], res["class_accuracy_judges"][m])
                 for rname, res in results_rewards.items() for m in ("ram", "grpo")],
                ("reward", "method", "final (judges)", "final (training scorer)", "best (smoothed)", "rounds run",
                 "FD to base", "diversity", "class accuracy (judges)"))
    race_keys = ("base_reward", "grpo_peak", "grpo_plateaued", "ram_peak", "rounds_ratio", "opt_steps_ratio",
                 "seconds_ratio", "half_gain_rounds_ratio")
    print_table([(f"Part A: {k}", v) for k, v in tilt.items()] + [("seconds", results["seconds"])] +
                [(f"{rname}: {k}", res[k]) for rname, res in results_rewards.items() for k in race_keys])
    print_table([(c["claim"], c["paper"], c["ours"], c["reproduced"]) for c in results["claims"]],
                ("claim", "paper", "ours", "reproduced"))
    print(f"wrote {out}/results.json and figures")
    return results


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python ram.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
