"""Training pieces and the checkpoint cache. No callbacks: each script writes its own short
loop (so the line its paper changes stands out) from these parts:

    opt, ema = make_optimizer(model, lr), EMA(model, decay)
    for step in tqdm(...):
        loss = ...                                  # the paper's loss
        optimizer_step(loss, model, opt, ema, clip)
    ema.copy_to(model)

Checkpoints: `checkpoints/` at the repository root (found from this file, not the working
directory; CHECKPOINT_DIR overrides it), one file per (name, config hash), written atomically
(temp file + rename) with the config and the training seconds beside the weights. A matching
checkpoint is reused; a corrupt or mismatched one is reported in one line and retrained.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from common.config import REPO


class EMA:
    """Exponential moving average of a model's float tensors (the weights we sample with)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # Warm-up: early on the average must forget the random init quickly, or a short run's
        # EMA would still hold a large share of untrained weights.
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = model.state_dict()
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [live[k].detach() for k in keys], 1 - decay)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow, strict=False)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0):
    """AdamW with beta2 = 0.99: short runs want the second moment to adapt quickly."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)


def optimizer_step(loss, model, opt, ema: EMA | None = None, clip: float = 1.0) -> float:
    """backward, clip the global gradient norm (one bad batch cannot wreck a tiny model), step,
    update the EMA. Returns the pre-clip gradient norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    if ema is not None:
        ema.update(model)
    return float(norm)


# --- checkpoint cache ----------------------------------------------------------------------------


def checkpoint_dir() -> Path:
    return Path(os.environ.get("CHECKPOINT_DIR", REPO / "checkpoints"))


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def checkpoint_path(name: str, cfg: dict) -> Path:
    return checkpoint_dir() / f"{name}-{config_hash(cfg)}.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: dict) -> dict | None:
    """The stored state if it is readable and was trained with exactly `cfg`, else None
    (with a one-line reason when a file was there but unusable)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(state, dict) and {"model", "config", "train_seconds"} <= set(state)
    except Exception as e:  # truncated, not a torch file, ...
        print(f"checkpoint {path.name} is unreadable ({type(e).__name__}); retraining")
        return None
    if not ok:
        print(f"checkpoint {path.name} lacks model/config/train_seconds; retraining")
        return None
    if json.dumps(state["config"], sort_keys=True, default=str) != json.dumps(cfg, sort_keys=True, default=str):
        print(f"checkpoint {path.name} was trained with another config; retraining")
        return None
    return state


def load_or_train(name: str, cfg: dict, model: torch.nn.Module, train_fn) -> dict:
    """Load `model` from the cache, or run `train_fn(model) -> dict of extras` and cache it.
    Returns {'train_seconds', 'cached', **extras}; train_seconds is the original training's."""
    path = checkpoint_path(name, cfg)
    state = load_checkpoint(path, cfg)
    if state is not None:
        init = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            model.load_state_dict(state["model"])
            return dict(train_seconds=state["train_seconds"], cached=True, **state.get("extra", {}))
        except RuntimeError:  # load_state_dict may have copied some tensors before failing
            model.load_state_dict(init)
            print(f"checkpoint {path.name} does not fit the model; retraining")
    t0 = time.perf_counter()
    extra = train_fn(model) or {}
    seconds = time.perf_counter() - t0
    state = dict(model=model.state_dict(), config=cfg, train_seconds=seconds, extra=extra)
    save_checkpoint(path, state)
    return dict(train_seconds=seconds, cached=False, **extra)
