"""Stability in latent flow matching: same noise, same picture; coarse-to-fine sampling.
Briq, Kamp, Fried, Cohen, Kesselheim (ICML 2026), arXiv 2605.08398.

Claim reproduced
    Flow-matching models are stable: from the same noise, models trained on disjoint halves of the
    data, on a quarter of it, with another seed or with a much smaller network draw nearly the same
    image. Two uses follow. (1) Pruned data: balanced clustering (k-means in feature space, equal
    samples per cluster) keeps quality with less data. (2) Coarse-to-fine sampling: a small model
    runs the noisy first part of the trajectory and the large model finishes it, at comparable
    quality and more than 2x faster (the paper: DiT-S/2 then DiT-XL/2, 2.15x).

Paper -> code
    models that differ from a reference in one thing ...... `model_specs`, `train`
    same-seed pairs vs permuted pairs (DINOv2 cosine) ..... `stability_metrics`, `shuffle_within_class`
    where two trajectories commit ......................... `trajectory_distance`
    balanced-clustering pruning ........................... `kmeans`, `equal_shares`, `balanced_subset`
    quality vs data fraction (FID) ........................ `run` part 2, fig_fd_vs_fraction.png
    coarse-to-fine sampling at t_split .................... `coarse_to_fine`, `part3`

Conventions (common/flow.py): t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, Euler from 1 to 0.
    The paper puts noise at t = 0: t_ours = 1 - t_theirs, v_ours = -v_theirs. Its default switch
    t_split = 0.7 ("small model until t = 0.7") is `switch_t = 0.3` here: the small model runs while
    t > 0.3, the large one from 0.3 to 0. switch_t = 1 is the large model alone, 0 the small alone.

Deviations from the paper
    Pixel space (16 px shapes), not the latent space of an autoencoder; class-conditional TinyDiTs
    sampled with CFG 5 and 30 Euler steps (the paper: 60). The repository's CNN evaluator stands in
    for DINOv2 / ArcFace (feature cosine) and for Inception (FID -> "evaluator FD"). Every model
    shares one short recipe (TinyDiT-xs, 2,400 steps: a CPU budget), so the reference is small too;
    "narrow" is xs at width 28 (4.8x fewer parameters), trained on the velocity and, a second time,
    on the clean image. The coarse-to-fine pair is the shared base model (TinyDiT-s, patch 4,
    common/pretrain.py) as the large model and xs with patch 8 (4 image tokens, 9x fewer FLOPs) as
    the small one, which predicts the clean image, not the velocity (`XPrediction`).
    The "unrelated" baseline permutes pairs *within a class*: with class-conditional models an
    across-class permutation is a far easier bar (reported too, as unrelated_cos_any_class). Within a
    cluster, balanced pruning keeps random members (the official code's `is_random` branch); shares
    capped by small clusters are spread over the others.

Run
    python lfm_stability.py                    # cpu preset: about 17 min on 2 CPU cores from an empty cache, 2 min warm
    python lfm_stability.py --preset gpu       # GPU (not measured yet)
    python lfm_stability.py --preset smoke     # seconds, what the tests run
"""

# %% imports
import dataclasses
import statistics
import time

import torch
from matplotlib.ticker import FormatStrFormatter
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from common import data as data_mod
from common import dit, pretrain
from common.config import BaseConfig, UserError, cli, field, print_table, resolve_device, run_dir, save_json
from common.dit import SIZES, TinyDiT, count_params
from common.evaluator import get_evaluator, paired_cosine
from common.flow import fm_loss, interpolate, sample_t
from common.plot import grid, plt, save_curves
from common.sampler import autocast, cfg_velocity, euler, sample_labels, seeded_noise
from common.train import EMA, load_or_train, make_optimizer, optimizer_step

# %% config and presets


@dataclasses.dataclass
class Config(BaseConfig):
    model: str = field("xs", "TinyDiT size of the reference and of every perturbed model", choices=tuple(SIZES))
    small_width: int = field(28, "width D of the 'smaller network' perturbation, same depth and heads "
                                 "(28 vs xs' 64: 4.8x fewer parameters)")
    c2f_patch: int = field(8, "patch of the coarse-to-fine small model: 4 tokens at 16 px, cheap per step")
    large: str = field("cpu", "common.pretrain preset of the coarse-to-fine large model (the cached base model)",
                       choices=tuple(pretrain.PRESETS))
    steps: int = field(2400, "optimizer steps of every trained model (the shared recipe; about 75 s for xs)")
    batch: int = field(64, "batch size of the shared recipe")
    lr: float = field(2e-3, "AdamW learning rate (the base model's)")
    n_train: int = field(20000, "the full training set; subsets are drawn from it")
    clusters: int = field(36, "k-means clusters for balanced pruning (about 4 per class)")
    n_samples: int = field(576, "samples per model, balanced over classes (the same noise for every model)")
    sample_steps: int = field(30, "Euler steps (a multiple of 10 puts switch times 0.1, 0.2, ... on the grid)")
    cfg_scale: float = field(5.0, "guidance scale of every sample (the short recipe's reference reaches class "
                                  "accuracy 0.81 / 0.87 / 0.90 at 3 / 4 / 5)", min=0)
    switches: str = field("1,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0", "coarse-to-fine switch times (1: large model alone)")
    time_batch: int = field(192, "images per timed sampling call: the FD samples are drawn in such chunks, "
                                 "each one timed after a warm-up call (576 / 192: 3 repeats)")
    eval_steps: int = field(300, "evaluator training steps (shared with common.pretrain's cache)")

    def validate(self):
        switches = switch_list(self.switches)
        if not all(0 <= s <= 1 for s in switches) or 1.0 not in switches:
            raise UserError(f"--switches must lie in [0, 1] and include 1 (the large model alone, the baseline of "
                            f"FD and speed-up), got {self.switches!r}")
        if self.small_width % 4 or self.small_width % SIZES[self.model]["heads"]:
            raise UserError(f"--small-width {self.small_width} must be divisible by 4 and by the heads")
        if 16 % self.c2f_patch:
            raise UserError(f"--c2f-patch {self.c2f_patch} must divide the image size 16")


PRESETS = {
    "smoke": dict(steps=10, batch=16, n_train=720, clusters=6, n_samples=36, sample_steps=4,
                  switches="1,0.5,0", large="smoke", time_batch=12, eval_steps=20),
    "cpu": dict(),
    "gpu": dict(model="s", small_width=44, large="gpu", steps=4000, batch=256, n_samples=2304,
                sample_steps=60, time_batch=576, eval_steps=600),
}
FRACTIONS = (1.0, 0.5, 0.25, 0.1)  # Part 2: the share of the training data kept
P_UNCOND = 0.1  # CFG dropout of the shared recipe (common/pretrain.py's)
PART1 = ("reference", "half A", "half B", "random 25%", "balanced 25%", "seed + 1", "narrow", "narrow x-pred")


def switch_list(text: str) -> list:
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--switches takes comma-separated numbers, got {text!r}") from None


# %% balanced-clustering pruning


def kmeans(f: torch.Tensor, k: int, seed: int, iters: int = 30) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding. f: (N, F) -> cluster of each row (N,)."""
    g = torch.Generator().manual_seed(seed)
    centres = f[torch.randint(len(f), (1,), generator=g)]
    for _ in range(k - 1):  # k-means++: a new centre with probability ~ squared distance to the nearest
        d2 = torch.cdist(f, centres).pow(2).amin(1)
        centres = torch.cat([centres, f[torch.multinomial(d2, 1, generator=g)]])
    for _ in range(iters):
        labels = torch.cdist(f, centres).argmin(1)  # (N,)
        sums = torch.zeros_like(centres).index_add_(0, labels, f)
        counts = torch.bincount(labels, minlength=k)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty cluster keeps its centre
    return torch.cdist(f, centres).argmin(1)


def equal_shares(sizes: torch.Tensor, n: int) -> torch.Tensor:
    """How many to keep per cluster: n in total, as equal as possible, never more than a cluster
    holds (water filling: a small cluster is kept whole, its deficit spread over the others)."""
    if n > int(sizes.sum()):
        raise UserError(f"cannot keep {n} of {int(sizes.sum())} images")
    quota = torch.zeros_like(sizes)
    while n > 0:
        open_ = (quota < sizes).nonzero().flatten()
        share = n // len(open_)
        if share == 0:  # fewer left than open clusters: one more each for the first n
            quota[open_[:n]] += 1
            break
        add = torch.minimum(sizes[open_] - quota[open_], torch.tensor(share))
        quota[open_] += add
        n -= int(add.sum())
    return quota


def balanced_subset(cluster: torch.Tensor, k: int, n: int, seed: int) -> torch.Tensor:
    """n indices with equal shares per cluster, random members within each. Every cluster keeps
    a prefix of one fixed random order, so a smaller fraction is a subset of a larger one."""
    quota = equal_shares(torch.bincount(cluster, minlength=k), n)
    order = torch.randperm(len(cluster), generator=torch.Generator().manual_seed(seed))
    keep = [order[cluster[order] == c][:quota[c]] for c in range(k)]
    return torch.cat(keep).sort().values


def random_subset(n_total: int, frac: float, seed: int) -> torch.Tensor:
    """The first frac of one fixed random order: nested, and the 50% subset is half A."""
    order = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return order[:round(frac * n_total)].sort().values


# %% training: one recipe for every model, cached by what trained it


class XPrediction(torch.nn.Module):
    """A net that predicts the clean image x_hat, used as a velocity: x_t = (1 - t) x + t eps gives
    v = eps - x = (x_t - x) / t. Why: with patch 8 a token must emit 8 * 8 * 3 = 192 values from a
    64-wide feature; a velocity (mostly the full-rank noise) does not fit through that (v-loss
    stalls near 0.76), a blurry clean image does. Safe while t >= 1 / steps (never 0 in Euler)."""

    def __init__(self, net: TinyDiT):
        super().__init__()
        self.net, self.C, self.img_size, self.null_label = net, net.C, net.img_size, net.null_label

    def forward(self, x, t, y=None):
        return (x - self.net(x, t, y)) / t.clamp(min=1e-3).reshape(-1, 1, 1, 1)


def train(cfg, device, name: str, data, data_key: str, width: int | None = None, patch: int = 4,
          seed: int | None = None, model: str | None = None, predict: str = "v") -> tuple[TinyDiT, dict]:
    """A class-conditional TinyDiT trained on `data` with the shared recipe (common/pretrain.py's:
    flow matching, 10% CFG dropout, logit-normal t, EMA). Only the arguments given differ from the
    reference; `data_key` names the data in the checkpoint key. predict="x" trains the net on the
    clean image (loss ||x_hat - x||^2 = t^2 ||v - (eps - x)||^2) and returns it as an `XPrediction`
    velocity. -> (model in eval mode, info)."""
    seed = cfg.seed if seed is None else seed
    arch = dict(SIZES[model or cfg.model], patch=patch)
    arch["width"] = width or arch["width"]
    torch.manual_seed(seed)  # the weight init
    net = TinyDiT(img_size=data.size, channels=data.channels, n_classes=data.n_classes, **arch)
    key = dict(kind="lfm_stability", data_version=data_mod.VERSION, model_version=dit.VERSION, data_key=data_key,
               n=len(data.images), steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, seed=seed, **arch)
    if predict != "v":
        key["predict"] = predict  # only then: the v-models keep their cache keys

    def fit(net):
        net.to(device).train()
        g = torch.Generator().manual_seed(seed)  # batches, dropout, noise and times
        opt, ema = make_optimizer(net, cfg.lr), EMA(net, 0.999)
        bar = tqdm(range(cfg.steps), desc=f"train {name}", mininterval=1.0, leave=False)
        for _ in bar:
            i = torch.randint(0, len(data.images), (cfg.batch,), generator=g)
            x, y = data.images[i], data.labels[i]
            y = torch.where(torch.rand(cfg.batch, generator=g) < P_UNCOND, net.null_label, y)  # CFG dropout
            eps, t = torch.randn(x.shape, generator=g), sample_t(cfg.batch, "logit_normal", g)
            x, y, eps, t = x.to(device), y.to(device), eps.to(device), t.to(device)
            with autocast(device):
                out = net(interpolate(x, eps, t), t, y)
                loss = (fm_loss(out, x, eps) if predict == "v" else (out - x).pow(2).flatten(1).mean(1)).mean()
            optimizer_step(loss, net, opt, ema)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        ema.copy_to(net)
        return dict(final_loss=loss.item())

    info = load_or_train("lfm_stability", key, net, fit)
    net = net.to(device).eval()
    return (net if predict == "v" else XPrediction(net)), dict(info, params=count_params(net))


def model_specs(cfg, cluster: torch.Tensor) -> dict:
    """name -> (training indices, data key, what else differs from the reference). Part 1's
    perturbations, then Part 2's extra fractions; random 50% is half A, 100% is the reference."""
    n, k = len(cluster), cfg.clusters
    order, pick = cfg.seed + 101, cfg.seed + 202  # seeds of the random order and of the within-cluster picks
    half_a = random_subset(n, 0.5, order)
    half_b = torch.ones(n, dtype=torch.bool).index_fill_(0, half_a, False).nonzero().flatten()

    def rnd(f):
        return random_subset(n, f, order), f"random{f:g}/of{n}/order{order}"

    def bal(f):  # the clustering depends on the evaluator, so its recipe is part of the key
        key = f"balanced{f:g}/of{n}/k{k}/pick{pick}/ev{cfg.eval_steps}"
        return balanced_subset(cluster, k, round(f * n), pick), key

    full = (torch.arange(n), f"full{n}", {})
    return {
        "reference": full,
        "half A": (*rnd(0.5), {}),
        "half B": (half_b, f"halfB/of{n}/order{order}", {}),
        "random 25%": (*rnd(0.25), {}),
        "balanced 25%": (*bal(0.25), {}),
        "seed + 1": (*full[:2], dict(seed=cfg.seed + 1)),
        "narrow": (*full[:2], dict(width=cfg.small_width)),
        # Width 28 < the 4 * 4 * 3 = 48 values of a patch: a velocity (mostly noise, full rank) cannot
        # pass; a clean image can. The same net predicting x (see `XPrediction`) tests that reading.
        "narrow x-pred": (*full[:2], dict(width=cfg.small_width, predict="x")),
        "random 10%": (*rnd(0.1), {}),
        "balanced 50%": (*bal(0.5), {}),
        "balanced 10%": (*bal(0.1), {}),
    }


# %% part 1: same noise, same picture


def shuffle_within_class(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A permutation that sends every index to another index of the same label (a cyclic shift of
    a shuffled class): the "unrelated" partner shares the label but not the noise."""
    perm = torch.arange(len(y))
    for c in y.unique():
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        perm[members] = members.roll(1)
    return perm


def stability_metrics(ev, x_a: torch.Tensor, x_b: torch.Tensor, y: torch.Tensor, seed: int) -> dict:
    """Same-noise pairs (x_a[i], x_b[i]) against unrelated pairs (x_a[i], x_b[perm[i]]).
    x_a, x_b: (B, C, S, S) samples of two models from the same noise and labels y (B,)."""
    g = torch.Generator().manual_seed(seed)
    same_class, any_class = shuffle_within_class(y, g), torch.randperm(len(y), generator=g)
    f_a, f_b = ev.features(x_a), ev.features(x_b)  # (B, F): the DINOv2 stand-in

    def mse(a, b):
        return (a - b).pow(2).mean().item()

    return dict(
        paired_cos=paired_cosine(f_a, f_b).mean().item(),
        unrelated_cos=paired_cosine(f_a, f_b[same_class]).mean().item(),
        unrelated_cos_any_class=paired_cosine(f_a, f_b[any_class]).mean().item(),
        label_agreement=(ev.logits(x_a).argmax(1) == ev.logits(x_b).argmax(1)).float().mean().item(),
        paired_mse=mse(x_a, x_b),
        unrelated_mse=mse(x_a, x_b[same_class]),
    )


def noise_for(n: int, seed: int, size: int = 16, channels: int = 3) -> torch.Tensor:
    """The noise `sample_labels` draws for seed (on the CPU): index i gets the same noise everywhere."""
    return seeded_noise(n, channels, size, seed)


def trajectory_distance(models: dict, noise: torch.Tensor, y: torch.Tensor, cfg) -> dict:
    """The paper's trajectory view: RMS pixel distance between the reference's state x_t and each
    other model's, from the same noise, at every Euler time. 0 at t = 1 by construction; where it
    stops growing, the two trajectories have committed to the same image."""
    device = next(models["reference"].parameters()).device
    noise, y = noise.to(device), y.to(device)
    paths = {name: euler(cfg_velocity(m, y, cfg.cfg_scale, m.null_label), noise, cfg.sample_steps,
                         return_trajectory=True)[1] for name, m in models.items()}  # (S + 1, B, C, H, W)
    ref = paths.pop("reference")
    return {name: (p - ref).pow(2).flatten(2).mean(2).sqrt().mean(1).tolist() for name, p in paths.items()}


# %% part 3: coarse-to-fine sampling


def coarse_to_fine(small, large, noise: torch.Tensor, y: torch.Tensor, steps: int, switch_t: float,
                   scale: float) -> torch.Tensor:
    """Euler with CFG on one time grid of `steps` steps: the small model from t = 1 down to switch_t
    (snapped to the grid), the large model from there to t = 0 (the paper's t_split = 1 - switch_t).
    switch_t = 1 is the large model alone, 0 the small one alone. noise: (B, C, S, S) at t = 1."""
    n_small = round(steps * (1 - switch_t))  # the first n_small steps go to the small model
    t_mid = 1 - n_small / steps
    x = noise
    if n_small > 0:
        x = euler(cfg_velocity(small, y, scale, small.null_label), x, n_small, 1.0, t_mid)
    if n_small < steps:
        x = euler(cfg_velocity(large, y, scale, large.null_label), x, steps - n_small, t_mid, 0.0)
    return x


def timed_chunks(sample, noise: torch.Tensor, y: torch.Tensor, chunk: int, device) -> tuple[torch.Tensor, float]:
    """sample(noise, y) over chunks of `chunk` images, each timed, after one warm-up call on a few
    images (first-call allocations). -> (all samples on the CPU, median seconds per chunk)."""
    sample(noise[:4].to(device), y[:4].to(device))
    out, times = [], []
    for i in range(0, len(y), chunk):
        nb, yb = noise[i:i + chunk].to(device), y[i:i + chunk].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        x = sample(nb, yb)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        out.append(x.float().cpu())
    return torch.cat(out), statistics.median(times)


def forward_flops(model) -> int:
    """FLOPs of one forward pass for one image (torch's FLOP counter: matmuls and attention)."""
    p = next(model.parameters())
    x = torch.zeros(1, model.C, model.img_size, model.img_size, device=p.device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x, torch.ones(1, device=p.device), torch.zeros(1, dtype=torch.long, device=p.device))
    return counter.get_total_flops()


def part3(cfg, small, large, ev, y, real, device) -> tuple[list, dict, dict]:
    """Sweep the switch: FD to real images, paired cosine to the large model alone (same noise),
    and the median wall-clock of sampling cfg.time_batch images (the FD samples, timed chunk by chunk)."""
    noise = noise_for(len(y), cfg.seed + 1)  # the noise of Part 1's samples
    rows, samples = [], {}
    for s in tqdm(sorted(switch_list(cfg.switches), reverse=True), desc="coarse-to-fine", leave=False):
        x, sec = timed_chunks(lambda nb, yb: coarse_to_fine(small, large, nb, yb, cfg.sample_steps, s,  # noqa: B023
                                                             cfg.cfg_scale), noise, y, cfg.time_batch, device)
        samples[s] = x
        rows.append(dict(switch_t=round(1 - round(cfg.sample_steps * (1 - s)) / cfg.sample_steps, 6), fd=ev.fd(x, real),
                         seconds=sec))
    base = rows[0]  # switch 1: the large model alone (validate() insists on it)
    f_large = ev.features(samples[max(samples)])
    for r, x in zip(rows, samples.values()):
        r["paired_cos"] = paired_cosine(ev.features(x), f_large).mean().item()
        r["speedup"] = base["seconds"] / r["seconds"]
    pair = dict(flops_small=forward_flops(small), flops_large=forward_flops(large),
                params_small=count_params(small), params_large=count_params(large))
    pair["flops_ratio"] = pair["flops_large"] / pair["flops_small"]
    small_only = [r for r in rows if r["switch_t"] == 0]
    if small_only:
        pair["measured_cost_ratio"] = base["seconds"] / small_only[0]["seconds"]
    return rows, pair, samples


# %% figures


def image_rows(rows: list, path, title: str) -> None:
    """One row of images per model, labelled: rows = [(label, images (K, C, S, S)), ...]."""
    k, S = len(rows[0][1]), rows[0][1].shape[-1]
    canvas = grid(torch.cat([x for _, x in rows]), nrow=k)  # (H, W, 3), 1 px of padding between images
    fig, ax = plt.subplots(figsize=(0.42 * k + 1.3, 0.42 * len(rows) + 0.45))
    ax.imshow(canvas.numpy(), interpolation="nearest")
    ax.set_yticks([1 + r * (S + 1) + S / 2 for r in range(len(rows))], [label for label, _ in rows], fontsize=8)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_c2f(c2f: list, fd_large: float, path) -> None:
    """FD (log scale) and speed-up against the switch time, from the saved `c2f` rows."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ts = [r["switch_t"] for r in c2f]
    ax.plot(ts, [r["fd"] for r in c2f], "o-", color="C0", label="evaluator FD")
    ax.axhline(1.1 * fd_large, color="C0", ls=":", lw=1, label="large alone + 10%")
    ax.set(xlabel="switch time (small model while t > switch)", ylabel="evaluator FD (log scale)",
           xlim=(1.05, -0.05), yscale="log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax2 = ax.twinx()
    ax2.plot(ts, [r["speedup"] for r in c2f], "s--", color="C1", label="speed-up")
    ax2.set_ylabel("speed-up over the large model alone", color="C1")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper center")
    ax.set_title("coarse-to-fine: small model first, large model last", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figures(out, cfg, samples, stability, traj, t_grid, fd_frac, c2f, c2f_samples, fd_large):
    cols = min(12, len(next(iter(samples.values()))))
    image_rows([(name, x[:cols]) for name, x in samples.items() if name in PART1],
               out / "fig_stability_grid.png", "same noise (one column each), different models (one row each)")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, d in traj.items():
        ax.plot(t_grid, d, marker="o", ms=2, label=name)
    unrelated = statistics.median(v["unrelated_mse"] for v in stability.values()) ** 0.5
    ax.axhline(unrelated, color="k", ls=":", lw=1, label="unrelated pairs at t = 0 (same class)")
    ax.set(xlabel="t (sampling runs from 1, noise, to 0, data)", ylabel="RMS distance to the reference's x_t",
           title="where same-noise trajectories part", xlim=(1.02, -0.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fig_trajectory.png", dpi=120)
    plt.close(fig)
    save_curves({k: ([float(f) for f in v], list(v.values())) for k, v in fd_frac.items()},
                out / "fig_fd_vs_fraction.png", "share of the training data kept", "evaluator FD to held-out images",
                "less data, equal training steps", logx=True)
    plot_c2f(c2f, fd_large, out / "fig_c2f.png")
    image_rows([(f"switch {s:g}", x[:cols]) for s, x in c2f_samples.items()], out / "fig_c2f_samples.png",
               "coarse-to-fine samples, same noise (1: large model alone, 0: small alone)")


# %% run


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = run_dir(cfg, "lfm_stability")
    data = data_mod.load("shapes", cfg.n_train, 16, cfg.seed, "train")
    real = data_mod.load("shapes", cfg.n_samples, 16, cfg.seed, "test").images  # held out, for the FD
    ev, _ = get_evaluator("shapes", 16, device, cfg.eval_steps, cfg.seed)
    cluster = kmeans(ev.features(data.images), cfg.clusters, cfg.seed)  # balanced pruning's clusters

    models, info, specs = {}, {}, model_specs(cfg, cluster)
    for name, (idx, key, kw) in tqdm(specs.items(), desc="models"):
        subset = data_mod.Dataset(data.images[idx], data.labels[idx], data.class_names)
        models[name], info[name] = train(cfg, device, name, subset, key, **kw)
    small, info["c2f small"] = train(cfg, device, "c2f small", data, f"full{len(data.images)}", patch=cfg.c2f_patch,
                                     predict="x")
    large, _ = pretrain.base_model(pretrain.Config(**pretrain.PRESETS[cfg.large], seed=cfg.seed), device)

    # Part 1: the same noise and labels through every model (sample_labels draws the noise from
    # the seed on the CPU), then same-noise pairs against unrelated pairs.
    y = torch.arange(cfg.n_samples) % data.n_classes  # balanced labels
    samples = {name: sample_labels(m, y, cfg.sample_steps, cfg.cfg_scale, cfg.seed + 1)
               for name, m in tqdm(models.items(), desc="sampling", leave=False)}
    stability = {name: stability_metrics(ev, samples["reference"], samples[name], y, cfg.seed) for name in PART1[1:]}
    n_traj = min(64, cfg.n_samples)
    traj = trajectory_distance({name: models[name] for name in PART1}, noise_for(cfg.n_samples, cfg.seed + 1)[:n_traj],
                               y[:n_traj], cfg)
    t_grid = torch.linspace(1, 0, cfg.sample_steps + 1).tolist()

    # Part 2: quality against the share of data kept, random vs balanced pruning, equal steps.
    fd = {name: ev.fd(x, real) for name, x in samples.items()}
    names = {"random": ("reference", "half A", "random 25%", "random 10%"),
             "balanced": ("reference", "balanced 50%", "balanced 25%", "balanced 10%")}
    fd_by_fraction = {kind: {f"{f:g}": fd[m] for f, m in zip(FRACTIONS, ms)} for kind, ms in names.items()}

    # Part 3: coarse-to-fine.
    c2f, pair, c2f_samples = part3(cfg, small, large, ev, y, real, device)
    fd_large = c2f[0]["fd"]
    best = max(r["speedup"] for r in c2f if r["fd"] <= 1.1 * fd_large)

    results = dict(
        stability=stability,
        stability_targets_hold=all(v["label_agreement"] >= 0.8 and v["paired_mse"] <= v["unrelated_mse"] / 2
                                   for v in stability.values()),
        trajectory=dict(t=t_grid, distance=traj),
        fd_by_fraction=fd_by_fraction,
        fd=fd,
        sample_accuracy={name: ev.accuracy(x, y) for name, x in samples.items()},
        # Clusters of equal size need not hold equal shares of each class: the class mix of a subset.
        class_counts={name: torch.bincount(data.labels[idx], minlength=data.n_classes).tolist()
                      for name, (idx, _, _) in specs.items() if name.startswith(("balanced", "random"))},
        params={name: i["params"] for name, i in info.items()},
        train_seconds={name: round(i["train_seconds"], 1) for name, i in info.items()},
        c2f=c2f,
        c2f_pair=pair,
        fd_large_only=fd_large,
        c2f_best_speedup=best,
        metric_note="cos: evaluator-feature cosine (DINOv2 stand-in); FD: evaluator Frechet distance (FID "
                    "stand-in); unrelated: same-class pairs from different noise",
        device=str(device),
        seconds=round(time.perf_counter() - t0, 1),
    )
    save_json(out / "results.json", results)
    figures(out, cfg, samples, stability, traj, t_grid, fd_by_fraction, c2f, c2f_samples, fd_large)
    print_table([(n, v["paired_cos"], v["unrelated_cos"], v["label_agreement"], v["paired_mse"], v["unrelated_mse"])
                 for n, v in stability.items()],
                ("vs reference", "paired cos", "unrelated cos", "label agr.", "paired MSE", "unrelated MSE"))
    print()
    print_table([(n, results["sample_accuracy"][n], fd[n], results["params"][n], results["train_seconds"][n])
                 for n in samples], ("model", "accuracy (CFG)", "eval FD", "params", "train s"))
    print()
    print_table([(r["switch_t"], r["fd"], r["paired_cos"], r["seconds"], r["speedup"]) for r in c2f],
                ("switch t", "eval FD", "cos to large", "seconds", "speed-up"))
    print()
    print_table([("c2f_best_speedup (FD within 10%)", best), ("FLOPs ratio large / small", pair["flops_ratio"]),
                 ("stability targets hold", results["stability_targets_hold"]), ("seconds", results["seconds"])])
    print(f"wrote {out}/results.json and figures")
    return results


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python lfm_stability.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
