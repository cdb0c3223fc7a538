"""Samplers that take a velocity *callable* v(x, t) -> (B, ...), with t a (B,) tensor.

Because they never see a model, a script can swap models mid-trajectory (coarse-to-fine in
lfm_stability.py), wrap guidance (classifier-free guidance below) or ignore t (time_blind_fm.py).
Convention (common/flow.py): integrate dx/dt = v from t = 1 (noise) down to t = 0 (data).
"""

import contextlib
import math
from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def autocast(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on CUDA (tensor cores, half the memory traffic); a no-op elsewhere, so the
    CPU path stays in float32 and bit-reproducible. enabled=False keeps CUDA in float32 too."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_grid(steps: int, t_start: float = 1.0, t_end: float = 0.0, device="cpu") -> torch.Tensor:
    """The S + 1 uniformly spaced times of an S-step sampler, from t_start down to t_end."""
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps}")
    return torch.linspace(t_start, t_end, steps + 1, device=device)


@torch.inference_mode()
def euler(v: Velocity, x: torch.Tensor, steps: int, t_start: float = 1.0, t_end: float = 0.0,
          return_trajectory: bool = False, bf16: bool = True):
    """Euler ODE from t_start to t_end. x: the state at t_start, (B, ...).

    Returns the final state, or (final, trajectory) with the trajectory (S + 1, B, ...) on the
    CPU, including the start. t_start/t_end let a script run one segment of a trajectory;
    bf16=False keeps a CUDA run in float32 (bf16 autocast is never used on the CPU)."""
    grid = time_grid(steps, t_start, t_end, device=x.device)
    traj = [x.cpu()] if return_trajectory else None
    with autocast(x.device, bf16):
        for t, t_next in zip(grid[:-1], grid[1:]):
            tb = t.expand(x.shape[0])
            x = x + (t_next - t) * v(x, tb).float()  # dt < 0: we move towards data
            if traj is not None:
                traj.append(x.cpu())
    return (x, torch.stack(traj)) if return_trajectory else x


def cfg_velocity(model, y: torch.Tensor, scale: float, null_label: int) -> Velocity:
    """Classifier-free guidance: v = v_uncond + scale (v_cond - v_uncond).

    scale = 1 is the plain conditional model (and costs one forward, not two). `model(x, t, y)`
    must accept the null label (the CFG-dropout label) as "no condition"."""
    if scale == 1.0:
        return lambda x, t: model(x, t, y)

    def v(x, t):
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond)

    return v


# --- the SDE step of Flow-GRPO (Liu et al. 2025, arXiv 2505.05470), for RL ------------------


def sde_std(t: torch.Tensor, t_next: torch.Tensor, a: float) -> torch.Tensor:
    """sigma_t = a sqrt(t / (1 - t)); at t = 1 (infinite) the next grid time is used instead."""
    t_eff = torch.where(t >= 1.0, t_next, t)
    return a * torch.sqrt(t_eff / (1 - t_eff))


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I), summed over non-batch dims -> (B,). std: (B,) or broadcastable."""
    std = std.reshape(-1, *([1] * (x.dim() - 1))) if std.dim() == 1 else std
    z = (x - mean) / std
    return (-0.5 * z.pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).reshape(x.shape[0], -1).sum(1)


def sde_mean(x, v, t, t_next, a: float = 0.7):
    """The mean of one step of the marginal-preserving SDE and its std_t (without the step's sqrt|dt|):

        std_t = a sqrt(t / (1 - t))
        mean  = x (1 + std_t^2 / (2 t) dt) + v (1 + std_t^2 (1 - t) / (2 t)) dt

    x, v: (B, ...); t, t_next: (B,). Returns (mean (B, ...), std_t (B,))."""
    t4, dt = t.reshape(-1, *([1] * (x.dim() - 1))), (t_next - t).reshape(-1, *([1] * (x.dim() - 1)))
    std = sde_std(t, t_next, a).reshape_as(t4)
    mean = x * (1 + std**2 / (2 * t4) * dt) + v * (1 + std**2 * (1 - t4) / (2 * t4)) * dt
    return mean, std.flatten()


def sde_step(x, v, t, t_next, a: float = 0.7, generator=None, x_next=None):
    """One step of the marginal-preserving SDE (Flow-GRPO, translated to t = 1 -> 0, dt < 0):
    x' = mean + std_t sqrt(-dt) xi, with mean and std_t from `sde_mean`.

    x, v: (B, ...); t, t_next: (B,). If x_next is given it is scored instead of drawn (for the
    policy-ratio of GRPO). Returns (x_next, logp (B,), mean, step_std (B,))."""
    mean, std = sde_mean(x, v, t, t_next, a)
    step_std = std * torch.sqrt(t - t_next)
    if x_next is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_next = mean + step_std.reshape(-1, *([1] * (x.dim() - 1))) * noise
    return x_next, gaussian_logprob(x_next, mean, step_std), mean, step_std


def seeded_noise(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """The starting noise of `sample_labels`, drawn on the CPU from `seed`: index i gets the same
    noise on every device and for every model. -> (n, channels, size, size)."""
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def sample_labels(model, y: torch.Tensor, steps: int, scale: float = 1.0, seed: int = 0,
                  batch: int = 512, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Class-conditional samples from a TinyDiT-like `model(x, t, y)`, one per label in y, with
    Euler and CFG. The noise is `seeded_noise(..., seed)` unless given, so every device and every
    model compared in a script sees the same noise for the same index. -> (B, C, S, S) on the CPU."""
    device = next(model.parameters()).device
    if noise is None:
        noise = seeded_noise(len(y), model.C, model.img_size, seed)
    out = []
    for i in range(0, len(y), batch):
        yb = y[i:i + batch].to(device)
        v = cfg_velocity(model, yb, scale, model.null_label)
        out.append(euler(v, noise[i:i + batch].to(device), steps).float().cpu())
    return torch.cat(out)
