"""The learning-rate sweep behind ram.py's defaults: each method's learning rate, at the race's horizon.

A companion of ram.py (the method and the race live there; this file only calls them). Every setting
trains on the composition reward and is scored as the race reads it: the peak of the smoothed held-out
curve under the judges within --rounds, on held-out noises of the sweep's own (half as many as the
race's, never the reported ones). A run stops early once its curve has levelled off. The result says,
per method, which learning rate won and whether it is interior to the grid (one grid step beyond it on
each side was tried and lost). Results and their cost: docs/ram.md, "The sweep".

Run (2 CPU cores)
    python ram_sweep.py                   # both methods at the cpu preset (730 s as two 1-thread processes)
    python ram_sweep.py --methods grpo    # one method
    python ram_sweep.py --preset smoke    # seconds
"""

import dataclasses
import time

import torch

import ram
from common.config import cli, field, print_table, resolve_device, run_dir, save_json

SWEEP_LR = dict(ram=(3e-4, 1e-3, 3e-3), grpo=(1e-4, 3e-4, 1e-3))  # the rest fixed: m, EMA; clip, official beta


@dataclasses.dataclass
class Config(ram.Config):
    methods: str = field("both", "the method whose learning rate is swept, or both", choices=("ram", "grpo", "both"))


def sweep_run(cfg, base, reward, judge, held_out, device, method: str, lr: float, progress=True) -> dict:
    """One setting on the composition reward for the race's horizon (--rounds), stopped early once its
    curve has levelled off (its peak is then behind it). -> the row: score, its round, the curve."""
    fixed = dict(ram=dict(m=cfg.ram_m, ema=ram.EMA_OLD),
                 grpo=dict(clip=cfg.grpo_clip, beta=ram.GRPO_BETA["composition"]))
    t0 = time.perf_counter()
    curve, _ = ram.train_method(method, base, reward, cfg, dict(lr=lr, **fixed[method]), cfg.rounds, held_out,
                                device, cfg.seed + 1, progress=progress, judge=judge, stop_at_plateau=True)
    peak = max(curve["smoothed"])
    return dict(method=method, lr=lr, **fixed[method], score=peak,
                round_of_peak=curve["rounds"][curve["smoothed"].index(peak)], rounds_run=curve["rounds"][-1],
                levelled_off=ram.plateaued(curve["reward"]),
                proxy_peak=max(ram.trailing_mean(curve["proxy"], ram.SMOOTH)),
                wall_seconds=round(time.perf_counter() - t0, 1), rounds=curve["rounds"], reward=curve["reward"])


def sweep_summary(cfg, base_reward: float, rows: list) -> dict:
    """Per method: the learning rates tried, the best-scoring one, and whether it is interior."""
    out = dict(base=base_reward, rounds=cfg.rounds, eval_every=cfg.eval_every, n_eval=max(18, cfg.n_eval // 2),
               rows=rows)
    for method in sorted({row["method"] for row in rows}):
        mine = sorted((row for row in rows if row["method"] == method), key=lambda row: row["lr"])
        grid, best = [row["lr"] for row in mine], max(mine, key=lambda row: row["score"])
        out[method] = dict(lr_grid=grid, chosen_lr=best["lr"], rounds=cfg.rounds,
                           interior=0 < grid.index(best["lr"]) < len(grid) - 1)
    return out


def sweep(cfg, base, reward, judge, device, methods=("ram", "grpo"), progress=True) -> dict:
    """SWEEP_LR of each method, one setting after the other, on the sweep's own held-out noises."""
    y, noise = ram.held_out_set(dataclasses.replace(cfg, n_eval=max(18, cfg.n_eval // 2)), base, cfg.seed + 555)
    held_out = (y, noise, judge(ram.sample_images(base, y, noise, cfg.ode_steps), y).mean().item())
    rows = [sweep_run(cfg, base, reward, judge, held_out, device, method, lr, progress)
            for method in methods for lr in SWEEP_LR[method]]
    return sweep_summary(cfg, held_out[2], rows)


def run(cfg: Config) -> dict:
    t_start = time.perf_counter()
    device, out = resolve_device(cfg.device), run_dir(cfg, "ram_sweep")
    torch.manual_seed(cfg.seed)  # as ram.py's run: the same global state before the same calls
    base, rewards, judges, _, _ = ram.models_and_scorers(cfg, device)
    methods = ("ram", "grpo") if cfg.methods == "both" else (cfg.methods,)
    res = sweep(cfg, base, rewards["composition"], judges["composition"], device, methods)
    save_json(out / "sweep.json", {**res, "seconds": round(time.perf_counter() - t_start, 1)})
    print_table([(r["method"], r["lr"], r["score"], r["round_of_peak"], r["rounds_run"]) for r in res["rows"]],
                ("method", "learning rate", "peak (judges, smoothed)", "its round", "rounds run"))
    return res


def main(argv=None):
    return cli(run, Config, ram.PRESETS, argv, prog="python ram_sweep.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
