"""Stability in latent flow matching: same noise, same picture; coarse-to-fine sampling.
Briq, Kamp, Fried, Cohen, Kesselheim (ICML 2026), arXiv 2605.08398.
Official code: github.com/briqr/explo-r-it-ing_lfm_stability.

Claim reproduced
    Flow-matching models are stable: from the same noise, models trained on disjoint halves of the
    data, on a quarter of it, with another seed or with a much smaller network draw nearly the same
    image. Two uses follow. (1) Pruned data: balanced clustering (spherical k-means on normalised
    features, equal samples per cluster, the members nearest to or furthest from the centroid)
    keeps quality with less data. (2) Coarse-to-fine sampling: a small model runs the noisy first
    part of the trajectory and the large model finishes it, at comparable quality and more than 2x
    faster (the paper: DiT-S/2 then DiT-XL/2, 2.15x at t_split = 0.7).

Paper -> code
    models that differ from a reference in one thing ...... `model_specs`, `train`
    same-seed pairs vs permuted pairs (DINOv2 cosine) ..... `stability_metrics`, `shuffle_within_class`
    what the noise decides inside a class ................. `shape_attributes` (position, size from pixels)
    where two trajectories commit ......................... `trajectory_distance`
    balanced clustering (cluster_features.py) ............. `spherical_kmeans`
    equal_cluster (nearest / furthest members) ............ `equal_shares`, `balanced_subset`
    quality vs data fraction (FID) ........................ `run` part 2, fig_fd_vs_fraction.png
    coarse-to-fine (CoarseFineModel, t_split) ............. `step_split`, `coarse_to_fine`, `part3`
    its wall-clock and its cost model ..................... `time_round_robin`, `cost_model_speedup`

Conventions (common/flow.py): t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, Euler from 1 to 0.
    The paper puts noise at t = 0: t_ours = 1 - t_theirs, v_ours = -v_theirs. Its default switch
    t_split = 0.7 (the official wrapper runs the coarse model while t_theirs < 0.7) is
    `switch_t = 0.3` here: the small model runs while t > 0.3, the large one from 0.3 to 0.
    switch_t = 1 is the large model alone, 0 the small one alone.

Deviations from the paper
    Pixel space (16 px shapes), not the latent space of an autoencoder; class-conditional TinyDiTs
    sampled with CFG 5 and 30 Euler steps (the paper: CFG 4, 60 steps); stability is also measured
    without guidance (CFG 1). The repository's CNN evaluator stands in for DINOv2 / ArcFace
    (feature cosine) and for Inception (FID -> "evaluator FD"). Every data / seed perturbation
    shares one short recipe (TinyDiT-xs, 2,400 steps: a CPU budget), so that reference is small
    and undertrained. The smaller network and the large one are the paper's pair in miniature:
    the large model is the shared base model (TinyDiT-s: width 96, 4 blocks, common/pretrain.py),
    the small one keeps a width that fits a patch (64 for the 4 * 4 * 3 = 48 values; at width 48
    the loss stalls near 0.15) with one block, 7x fewer parameters (DiT-S/2 vs XL/2: 20x), trained
    until its loss levels off. It is compared with the large model, and it is the coarse model.
    The "unrelated" baseline permutes pairs *within a class* (the official code permutes across
    all samples, reported as unrelated_cos_any_class): with class-conditional models that is a
    far easier bar. CLIP features for clustering are replaced by a second evaluator classifier
    trained with another seed on other draws of the data, so pruning is never chosen in the space
    where the FD is measured. Spherical k-means starts from k-means++ seeds (the official code:
    k random samples); quotas per cluster are water-filled exactly (the official equal_cluster
    spreads the deficit of small clusters once).

Run
    python lfm_stability.py                    # cpu preset: 1,121 s on 2 CPU cores (16 models), 122 s cached
    python lfm_stability.py --preset gpu       # GPU (not measured yet)
    python lfm_stability.py --preset smoke     # seconds, what the tests run
"""

# %% imports
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from common import config, dit, pretrain
from common import data as data_mod
from common.config import BaseConfig, UserError, cli, field, print_table, resolve_device, run_dir, save_json
from common.dit import SIZES, TinyDiT, count_params
from common.evaluator import frechet_distance, get_evaluator, paired_cosine
from common.flow import fm_loss, interpolate, sample_t
from common.plot import grid, plt
from common.sampler import autocast, cfg_velocity, euler, sample_labels, seeded_noise
from common.train import EMA, load_or_train, make_optimizer, optimizer_step

# %% config and presets


@dataclasses.dataclass
class Config(BaseConfig):
    model: str = field("xs", "TinyDiT size of the reference and of every data / seed perturbation",
                       choices=tuple(SIZES))
    small_depth: int = field(1, "blocks of the smaller network (the reference's width 64 and patch 4; the base "
                                "model has 4 blocks of width 96)")
    small_steps: int = field(14400, "optimizer steps of the smaller network: cheap per step, trained until its "
                                    "loss levels off (6x the shared recipe)")
    large: str = field("cpu", "common.pretrain preset of the coarse-to-fine large model (the cached base model)",
                       choices=tuple(pretrain.PRESETS))
    steps: int = field(2400, "optimizer steps of every other trained model (the shared recipe; about 55 s for xs on "
                             "2 CPU cores)")
    batch: int = field(64, "batch size of the shared recipe")
    lr: float = field(2e-3, "AdamW learning rate (the base model's)")
    n_train: int = field(20000, "the full training set; subsets are drawn from it")
    clusters: int = field(9, "spherical k-means clusters for balanced pruning: one per class, as the paper's "
                             "k = 1000 on ImageNet")
    n_samples: int = field(576, "samples per model, balanced over classes (the same noise for every model)")
    sample_steps: int = field(30, "Euler steps (a multiple of 10 puts switch times 0.1, 0.2, ... on the grid)")
    cfg_scale: float = field(5.0, "guidance scale of every sample (the short recipe's reference reaches class "
                                  "accuracy 0.81 / 0.87 / 0.90 at 3 / 4 / 5)", min=0)
    switches: str = field("1,0.7,0.5,0.4,0.3,0.2,0", "coarse-to-fine switch times; 1 (large alone), 0 (small "
                                                       "alone) and the paper's 0.3 are always added")
    time_batch: int = field(96, "images per timed sampling call: the coarse-to-fine samples are drawn in "
                                "n_samples / time_batch rounds, every switch once per round (576 / 96: 6 repeats)")
    eval_steps: int = field(300, "training steps of the evaluator and of the clustering encoder")

    def validate(self):
        switch_list(self.switches)  # one-line error for bad text or values outside [0, 1]
        if self.n_train < 1 / min(FRACTIONS) or self.n_train < 2:
            raise UserError(f"--n-train {self.n_train} must be >= {round(1 / min(FRACTIONS))}, so that the "
                            f"{min(FRACTIONS):g} subset holds an image")
        if self.clusters > self.n_train:
            raise UserError(f"--clusters {self.clusters} cannot exceed the {self.n_train} training images")
        if self.n_samples < 2 * N_CLASSES:
            raise UserError(f"--n-samples {self.n_samples} must be >= {2 * N_CLASSES}: unrelated pairs need two "
                            f"samples of each of the {N_CLASSES} classes")
        if self.time_batch > self.n_samples or self.n_samples % self.time_batch:
            raise UserError(f"--time-batch {self.time_batch} must divide --n-samples {self.n_samples} (the timed "
                            "calls draw the coarse-to-fine samples, one chunk per round)")


PRESETS = {
    "smoke": dict(steps=10, small_steps=10, batch=16, n_train=720, clusters=6, n_samples=36, sample_steps=4,
                  switches="1,0.5,0", large="smoke", time_batch=6, eval_steps=20),
    "cpu": dict(),
    "gpu": dict(model="s", small_depth=2, large="gpu", steps=4000, small_steps=12000, batch=256, n_samples=2304,
                sample_steps=60, time_batch=384, eval_steps=600),
}
N_CLASSES = len(data_mod.SHAPES) * len(data_mod.COLOURS)  # 9 shapes classes
FRACTIONS = (1.0, 0.5, 0.25, 0.1)  # Part 2: the share of the training data kept
PAPER_SWITCH = 0.3  # the official t_split = 0.7 with noise at 0 (see the paper card)
P_UNCOND = 0.1  # CFG dropout of the shared recipe (common/pretrain.py's)
PART1 = ("half_A", "half_B", "random_25", "nearest_25", "furthest_25", "other_seed", "small")
PARTNER = {name: "reference" for name in PART1} | {"small": "large"}  # whom each model is compared with
SNAPSHOTS = (1 / 8, 1 / 4, 1 / 2, 3 / 4)  # checkpoints of the smaller network: the same size, worse
N_BOOT = 200  # bootstrap resamples of the FD


def switch_list(text: str) -> list:
    """'1,0.5' -> [1.0, 0.5, 0.3, 0.0]: the given switches plus the two ends and the paper's."""
    try:
        values = [float(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--switches takes comma-separated numbers, got {text!r}") from None
    if not all(0 <= s <= 1 for s in values):
        raise UserError(f"--switches must lie in [0, 1], got {text!r}")
    return sorted(set(values) | {1.0, PAPER_SWITCH, 0.0}, reverse=True)


# %% part 1: what the noise decides, measured from pixels


def shape_attributes(x: torch.Tensor) -> torch.Tensor:
    """Position and size of the shape in each image, from pixels alone. The lit weight of a pixel
    is its brightest channel mapped from [-1, 1] to [0, 1] (a rendered edge pixel: its coverage),
    and 0 below 0.1, so that a sampler's dim background does not pull the centroid to the middle.
    x: (B, C, S, S) -> (B, 3): centroid column, centroid row (pixels, pixel centres at i + 0.5),
    and the lit area (pixels)."""
    lit = ((x.float().amax(1) + 1) / 2).clamp(0, 1)  # (B, S, S)
    lit = torch.where(lit > 0.1, lit, 0.0)
    centres = torch.arange(x.shape[-1], dtype=torch.float32) + 0.5
    area = lit.sum((1, 2))
    denom = area.clamp(min=1e-6)  # an image with nothing lit has its centroid at 0
    cx = (lit * centres[None, None, :]).sum((1, 2)) / denom
    cy = (lit * centres[None, :, None]).sum((1, 2)) / denom
    return torch.stack([cx, cy, area], 1)


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
    """Same-noise pairs (x_a[i], x_b[i]) against unrelated pairs (x_a[i], x_b[perm[i]]), where the
    partner has the same label and other noise. Every statistic is computed for both, so each one
    has its own chance level. x_a, x_b: (B, C, S, S) samples of two models from the same noise and
    labels y (B,)."""
    g = torch.Generator().manual_seed(seed)
    same_class, any_class = shuffle_within_class(y, g), torch.randperm(len(y), generator=g)
    f_a, f_b = ev.features(x_a), ev.features(x_b)  # (B, F): the DINOv2 stand-in
    lab_a, lab_b = ev.logits(x_a).argmax(1), ev.logits(x_b).argmax(1)
    at_a, at_b = shape_attributes(x_a), shape_attributes(x_b)  # (B, 3)

    def stats(p):  # p: the partner of each i in x_b
        return dict(cos=paired_cosine(f_a, f_b[p]).mean().item(),
                    label=(lab_a == lab_b[p]).float().mean().item(),
                    mse=(x_a - x_b[p]).pow(2).mean().item(),
                    position=(at_a[:, :2] - at_b[p, :2]).norm(dim=1).mean().item(),  # pixels
                    size=(at_a[:, 2] - at_b[p, 2]).abs().mean().item())  # pixels of area

    paired, unrelated = stats(torch.arange(len(y))), stats(same_class)
    m = dict(
        paired_cos=paired["cos"], unrelated_cos=unrelated["cos"],
        unrelated_cos_any_class=paired_cosine(f_a, f_b[any_class]).mean().item(),
        label_agreement=paired["label"], unrelated_label_agreement=unrelated["label"],
        label_agreement_gap=paired["label"] - unrelated["label"],
        paired_mse=paired["mse"], unrelated_mse=unrelated["mse"],
        position_err=paired["position"], unrelated_position_err=unrelated["position"],
        size_err=paired["size"], unrelated_size_err=unrelated["size"],
    )
    for k in ("mse", "position", "size"):  # paired / unrelated: 1 is chance, 0 the same image
        paired_k = m["paired_mse" if k == "mse" else f"{k}_err"]
        unrelated_k = m["unrelated_mse" if k == "mse" else f"unrelated_{k}_err"]
        m[f"{k}_ratio"] = paired_k / max(unrelated_k, 1e-12)
    m["passes"] = m["mse_ratio"] <= 0.5 and m["position_ratio"] <= 0.5  # the stability gate
    return m


def real_spread(held_out, seed: int) -> float:
    """The unrelated position error of real images: how far apart two shapes of one class sit
    in the data itself (pixels), the spread that a sampler's samples should keep."""
    attrs = shape_attributes(held_out.images)
    perm = shuffle_within_class(held_out.labels, torch.Generator().manual_seed(seed))
    return (attrs[:, :2] - attrs[perm, :2]).norm(dim=1).mean().item()


def trajectory_distance(pairs: dict, noise: torch.Tensor, y: torch.Tensor, cfg, seed: int = 0) -> dict:
    """The paper's trajectory view: per-image RMS pixel distance between the states x_t of two
    models from the same noise, at every Euler time, averaged over images. 0 at t = 1 by
    construction; where it stops growing, the two trajectories have committed to the same image.
    "unrelated" is the same statistic at t = 0 for same-class partners with other noise.
    pairs: name -> (model_a, model_b). -> {"distance": {name: [S + 1 values]}, "unrelated": {name: value}}."""
    paths = {}

    def path(m):  # (S + 1, B, C, H, W) on the CPU, once per model
        if id(m) not in paths:
            device = next(m.parameters()).device
            v = cfg_velocity(m, y.to(device), cfg.cfg_scale, m.null_label)
            paths[id(m)] = euler(v, noise.to(device), cfg.sample_steps, return_trajectory=True)[1]
        return paths[id(m)]

    perm = shuffle_within_class(y, torch.Generator().manual_seed(seed))

    def rms(a, b):  # (..., B, C, H, W) -> mean over images of the per-image RMS distance
        return (a - b).pow(2).flatten(-3).mean(-1).sqrt().mean(-1)

    out = dict(distance={}, unrelated={})
    for name, (a, b) in pairs.items():
        out["distance"][name] = rms(path(b), path(a)).tolist()
        out["unrelated"][name] = rms(path(b)[-1][perm], path(a)[-1]).item()
    return out


# %% part 2: balanced-clustering pruning


def spherical_kmeans(f: torch.Tensor, k: int, seed: int, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the unit sphere (cosine similarity), as the official cluster_features.py: rows
    are L2-normalised, each is assigned to the centre of highest cosine, each centre is the
    normalised mean of its members. Seeded by k-means++ (on the sphere 1 - cos is half the squared
    distance, so the D^2 rule draws with probability ~ 1 - cos to the nearest centre).
    f: (N, F) -> (cluster of each row (N,), unit centres (k, F))."""
    f = F.normalize(f.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centres = f[torch.randint(len(f), (1,), generator=g)]
    for _ in range(k - 1):
        d = (1 - f @ centres.T).amin(1).clamp(min=0)
        pick = torch.multinomial(d, 1, generator=g) if d.sum() > 0 else torch.randint(len(f), (1,), generator=g)
        centres = torch.cat([centres, f[pick]])
    cluster = None
    for _ in range(iters):
        new = (f @ centres.T).argmax(1)  # (N,)
        if cluster is not None and torch.equal(new, cluster):
            break
        cluster = new
        sums = torch.zeros_like(centres).index_add_(0, cluster, f)
        counts = torch.bincount(cluster, minlength=k)[:, None]
        centres = torch.where(counts > 0, F.normalize(sums, dim=1), centres)  # an empty cluster keeps its centre
    return (f @ centres.T).argmax(1), centres


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


def balanced_subset(f: torch.Tensor, cluster: torch.Tensor, centres: torch.Tensor, n: int,
                    nearest: bool) -> torch.Tensor:
    """The official equal_cluster: equal shares per cluster, and within a cluster the members
    nearest to its centre (largest=False) or furthest from it (largest=True). Distances on the
    sphere rank like cosines. f: (N, F), cluster: (N,), centres: (k, F) -> n sorted indices; a
    smaller n keeps a subset of a larger one."""
    quota = equal_shares(torch.bincount(cluster, minlength=len(centres)), n)
    cos = (F.normalize(f.float(), dim=1) * centres[cluster]).sum(1)  # (N,): similarity to the own centre
    keep = []
    for c in range(len(centres)):
        members = (cluster == c).nonzero().flatten()
        order = cos[members].argsort(descending=nearest, stable=True)
        keep.append(members[order[:quota[c]]])
    return torch.cat(keep).sort().values


def random_subset(n_total: int, frac: float, seed: int) -> torch.Tensor:
    """The first frac of one fixed random order: nested, and the 50% subset is half A."""
    order = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return order[:round(frac * n_total)].sort().values


# %% training: one recipe for every model, cached by what trained it


def train(cfg, device, name: str, data, data_key: str, depth: int | None = None, seed: int | None = None,
          steps: int | None = None, snapshots: tuple = ()) -> tuple[TinyDiT, dict]:
    """A class-conditional TinyDiT trained on `data` with the shared recipe (common/pretrain.py's:
    flow matching, 10% CFG dropout, logit-normal t, EMA). Only the arguments given differ from the
    reference; `data_key` names the data in the checkpoint key. `snapshots`: steps at which the EMA
    weights are kept too (info["snapshots"]). info["loss_curve"]: the mean loss of each tenth of
    training. -> (model in eval mode, info)."""
    seed = cfg.seed if seed is None else seed
    steps = steps or cfg.steps
    arch = dict(SIZES[cfg.model], patch=4)
    arch["depth"] = depth or arch["depth"]
    torch.manual_seed(seed)  # the weight init
    net = TinyDiT(img_size=data.size, channels=data.channels, n_classes=data.n_classes, **arch)
    key = dict(kind="lfm_stability", version=2, data_version=data_mod.VERSION, model_version=dit.VERSION,
               data_key=data_key, n=len(data.images), steps=steps, batch=cfg.batch, lr=cfg.lr, seed=seed,
               snapshots=sorted(snapshots), **arch)

    def fit(net):
        net.to(device).train()
        g = torch.Generator().manual_seed(seed)  # batches, dropout, noise and times
        opt, ema = make_optimizer(net, cfg.lr), EMA(net, 0.999)
        losses, kept = torch.zeros(steps), {}
        bar = tqdm(range(steps), desc=f"train {name}", mininterval=1.0, leave=False)
        for step in bar:
            i = torch.randint(0, len(data.images), (cfg.batch,), generator=g)
            x, y = data.images[i], data.labels[i]
            y = torch.where(torch.rand(cfg.batch, generator=g) < P_UNCOND, net.null_label, y)  # CFG dropout
            eps, t = torch.randn(x.shape, generator=g), sample_t(cfg.batch, "logit_normal", g)
            x, y, eps, t = x.to(device), y.to(device), eps.to(device), t.to(device)
            with autocast(device):
                loss = fm_loss(net(interpolate(x, eps, t), t, y), x, eps).mean()
            optimizer_step(loss, net, opt, ema)
            losses[step] = loss.item()
            if step + 1 in snapshots:
                kept[step + 1] = {k: v.clone().cpu() for k, v in ema.shadow.items()}
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        ema.copy_to(net)
        tenths = [chunk.mean().item() for chunk in losses.tensor_split(min(10, steps))]
        return dict(final_loss=loss.item(), loss_curve=tenths, snapshots=kept)

    info = load_or_train("lfm_stability", key, net, fit)
    return net.to(device).eval(), dict(info, params=count_params(net))


def snapshot_steps(steps: int) -> tuple:
    """The steps at which the smaller network's checkpoints are kept (SNAPSHOTS of its training)."""
    return tuple(sorted({max(1, round(f * steps)) for f in SNAPSHOTS}))


def model_specs(cfg, feats: torch.Tensor, cluster: torch.Tensor, centres: torch.Tensor) -> dict:
    """name -> (training indices, data key, what else differs from the reference). Part 1's
    perturbations, then Part 2's extra fractions and second training seeds; random 50% is half A,
    100% is the reference. feats, cluster, centres: the clustering of the training set."""
    n = len(cluster)
    order = cfg.seed + 101  # the seed of the random order
    half_a = random_subset(n, 0.5, order)
    half_b = torch.ones(n, dtype=torch.bool).index_fill_(0, half_a, False).nonzero().flatten()
    # the clustering depends on the encoder's recipe, so that is part of the key
    clustering = f"of{n}/k{cfg.clusters}/enc{cfg.seed + 1}-{cfg.eval_steps}/km{cfg.seed}"

    def rnd(f):
        return random_subset(n, f, order), f"random{f:g}/of{n}/order{order}"

    def bal(f, nearest):
        kind = "nearest" if nearest else "furthest"
        return balanced_subset(feats, cluster, centres, round(f * n), nearest), f"{kind}{f:g}/{clustering}"

    full = (torch.arange(n), f"full{n}")
    second = dict(seed=cfg.seed + 1)  # the second training seed of Part 2
    specs = {
        "reference": (*full, {}),
        "half_A": (*rnd(0.5), {}),
        "half_B": (half_b, f"halfB/of{n}/order{order}", {}),
        "random_25": (*rnd(0.25), {}),
        "nearest_25": (*bal(0.25, True), {}),
        "furthest_25": (*bal(0.25, False), {}),
        "other_seed": (*full, dict(seed=cfg.seed + 1)),
        "small": (*full, dict(depth=cfg.small_depth, steps=cfg.small_steps,
                              snapshots=snapshot_steps(cfg.small_steps))),
        "random_10": (*rnd(0.1), {}),
        "nearest_50": (*bal(0.5, True), {}),
        "nearest_10": (*bal(0.1, True), {}),
        "furthest_50": (*bal(0.5, False), {}),
        "furthest_10": (*bal(0.1, False), {}),
        "random_25_s2": (*rnd(0.25), second),
        "nearest_25_s2": (*bal(0.25, True), second),
        "furthest_25_s2": (*bal(0.25, False), second),
    }
    return specs


def small_checkpoints(cfg, device, info: dict, data, ev, y, real, x_large) -> dict:
    """The smaller network's own earlier checkpoints against the large model, the same way as the
    final one: the same size, worse quality. Beside the final (quality-matched) pair they separate
    "smaller" from "worse". x_large: the large model's samples from the same noise.
    -> {step: {"fd", "mse_ratio", "position_ratio", ...}}."""
    torch.manual_seed(cfg.seed)
    arch = dict(SIZES[cfg.model], patch=4, depth=cfg.small_depth)
    net = TinyDiT(img_size=data.size, channels=data.channels, n_classes=data.n_classes, **arch)
    out = {}
    for step, state in sorted(info["snapshots"].items()):
        net.load_state_dict(state, strict=False)
        x = sample_labels(net.to(device).eval(), y, cfg.sample_steps, cfg.cfg_scale, cfg.seed + 1)
        m = stability_metrics(ev, x_large, x, y, cfg.seed)
        out[str(step)] = dict(fd=ev.fd(x, real), **{k: m[k] for k in (
            "mse_ratio", "position_ratio", "size_ratio", "label_agreement", "unrelated_label_agreement", "passes")})
    return out


# %% part 3: coarse-to-fine sampling


def step_split(steps: int, switch_t: float) -> tuple[int, int]:
    """(small-model steps, large-model steps) of a `steps`-step Euler grid switched at switch_t
    (snapped to the grid): the small model takes the steps from t = 1 down to the switch."""
    n_small = round(steps * (1 - switch_t))
    return n_small, steps - n_small


def coarse_to_fine(small, large, noise: torch.Tensor, y: torch.Tensor, steps: int, switch_t: float,
                   scale: float) -> torch.Tensor:
    """Euler with CFG on one time grid of `steps` steps: the small model from t = 1 down to switch_t
    (snapped to the grid), the large model from there to t = 0 (the paper's t_split = 1 - switch_t).
    switch_t = 1 is the large model alone, 0 the small one alone. noise: (B, C, S, S) at t = 1."""
    n_small, n_large = step_split(steps, switch_t)
    t_mid = 1 - n_small / steps
    x = noise
    if n_small > 0:
        x = euler(cfg_velocity(small, y, scale, small.null_label), x, n_small, 1.0, t_mid)
    if n_large > 0:
        x = euler(cfg_velocity(large, y, scale, large.null_label), x, n_large, t_mid, 0.0)
    return x


def cost_model_speedup(steps: int, switch_t: float, t_large: float, t_small: float) -> float:
    """The speed-up that the per-step costs predict: n T_L / (n_L T_L + n_S T_S)."""
    n_small, n_large = step_split(steps, switch_t)
    return steps * t_large / (n_large * t_large + n_small * t_small)


def time_round_robin(samplers: dict, noise: torch.Tensor, y: torch.Tensor, chunk: int, device) -> tuple[dict, dict]:
    """Time every sampler on the same chunk, round-robin: round r takes chunk r of the images and
    calls every sampler once, in an order rotated by r, so slow drift of the machine hits every
    sampler alike. Each sampler gets one untimed warm-up call first (first-call allocations).
    samplers: name -> sample(noise, y). -> ({name: all samples on the CPU}, {name: [seconds per round]})."""
    names = list(samplers)
    for name in names:
        samplers[name](noise[:2].to(device), y[:2].to(device))
    out, seconds = {n: [] for n in names}, {n: [] for n in names}
    for r in range(len(y) // chunk):
        nb, yb = noise[r * chunk:(r + 1) * chunk].to(device), y[r * chunk:(r + 1) * chunk].to(device)
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            x = samplers[name](nb, yb)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name].append(time.perf_counter() - t0)
            out[name].append(x.float().cpu())
    return {n: torch.cat(out[n]) for n in names}, seconds


def fd_with_ci(f_x: torch.Tensor, f_real: torch.Tensor, f_base: torch.Tensor, seed: int) -> dict:
    """FD to the real features, and its ratio to a baseline's FD, each with a 95% bootstrap interval.
    f_base: the same noise through another sampler, so the ratio resamples the pairs together; the
    real set stays fixed, as it is one set for every model compared. FD is biased up by the
    duplicates of a resample, so the intervals are the 2.5-97.5% percentiles of the bootstrap
    values shifted by that bias (mean of the bootstrap minus the estimate). f_*: (B, F) features."""
    g = torch.Generator().manual_seed(seed)
    fd, fd_base = frechet_distance(f_x, f_real), frechet_distance(f_base, f_real)
    boot_fd, boot_ratio = torch.zeros(N_BOOT), torch.zeros(N_BOOT)
    for b in range(N_BOOT):
        i = torch.randint(len(f_x), (len(f_x),), generator=g)
        boot_fd[b] = frechet_distance(f_x[i], f_real)
        boot_ratio[b] = boot_fd[b] / frechet_distance(f_base[i], f_real)

    def interval(boot, estimate):
        lo, hi = torch.quantile(boot - boot.mean(), torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
        return [estimate + lo, estimate + hi]

    return dict(fd=fd, fd_ci=interval(boot_fd, fd), fd_sd=boot_fd.std().item(), fd_ratio=fd / fd_base,
                fd_ratio_ci=interval(boot_ratio, fd / fd_base))


def forward_flops(model) -> int:
    """FLOPs of one forward pass for one image (torch's FLOP counter: matmuls and attention)."""
    p = next(model.parameters())
    x = torch.zeros(1, model.C, model.img_size, model.img_size, device=p.device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x, torch.ones(1, device=p.device), torch.zeros(1, dtype=torch.long, device=p.device))
    return counter.get_total_flops()


def part3(cfg, small, large, ev, y, real, device) -> tuple[list, dict, dict]:
    """Sweep the switch: FD to real images (with a bootstrap interval), paired cosine to the large
    model alone (same noise), and the wall-clock of each switch, timed round-robin; beside it the
    speed-up that the measured per-step costs of the two models predict."""
    noise = seeded_noise(len(y), large.C, large.img_size, cfg.seed + 1)  # the noise of Part 1's samples
    switches = switch_list(cfg.switches)
    samplers = {s: (lambda nb, yb, s=s: coarse_to_fine(small, large, nb, yb, cfg.sample_steps, s, cfg.cfg_scale))
                for s in switches}
    samples, seconds = time_round_robin(samplers, noise, y, cfg.time_batch, device)
    median = {s: statistics.median(v) for s, v in seconds.items()}
    t_large, t_small = median[1.0] / cfg.sample_steps, median[0.0] / cfg.sample_steps  # per Euler step
    f_real, f_large = ev.features(real), ev.features(samples[1.0])
    rows = []
    for s in tqdm(switches, desc="coarse-to-fine FD", leave=False):
        f_x = ev.features(samples[s])
        n_small, _ = step_split(cfg.sample_steps, s)
        rows.append(dict(switch_t=round(1 - n_small / cfg.sample_steps, 6), small_steps=n_small,
                         **fd_with_ci(f_x, f_real, f_large, cfg.seed),
                         paired_cos=paired_cosine(f_x, f_large).mean().item(),
                         mse_to_large=(samples[s] - samples[1.0]).pow(2).mean().item(),
                         seconds=median[s], seconds_all=seconds[s],
                         speedup=median[1.0] / median[s],
                         speedup_cost_model=cost_model_speedup(cfg.sample_steps, s, t_large, t_small)))
    pair = dict(flops_small=forward_flops(small), flops_large=forward_flops(large),
                params_small=count_params(small), params_large=count_params(large),
                seconds_per_step_large=t_large, seconds_per_step_small=t_small,
                measured_cost_ratio=t_large / t_small, time_batch=cfg.time_batch, rounds=len(y) // cfg.time_batch)
    pair["flops_ratio"] = pair["flops_large"] / pair["flops_small"]
    pair["params_ratio"] = pair["params_large"] / pair["params_small"]
    return rows, pair, samples


# %% claims: the paper's headline numbers against ours, each with its test


def make_claims(r: dict) -> list:
    """One entry per headline claim; `reproduced` is computed from the stored numbers."""
    def claim(*args):  # every claim reads its number from r
        return config.claim_entry(r, *args)

    gate = "max(paired / unrelated pixel MSE, paired / unrelated position error) <= 0.5"
    c2f, best = r["c2f_paper"], r["c2f_best"]
    return [
        claim("same noise, other data (halves, random and balanced 25%) or another seed: nearly the same image, "
              "with guidance", "DINOv2 cosine far above permuted pairs (ImageNet, CFG 4)",
              "stability_worst.data_or_seed", f"worst of the six pairs, CFG 5: {gate}", lambda v: v <= 0.5,
              "unrelated pairs: same class, other noise"),
        claim("the same, without guidance (the flow itself)", "similar images (unconditional CelebA-HQ, FFHQ)",
              "stability_worst_no_cfg.data_or_seed", f"worst of the six pairs, CFG 1: {gate}", lambda v: v <= 0.5,
              "guidance amplifies model differences and shrinks the spread within a class"),
        claim("same noise, a smaller network: nearly the same image, with guidance",
              "DiT-S/2 vs DiT-XL/2: similar images", "stability_worst.small",
              f"small vs the base model (equal FD), CFG 5: {gate}", lambda v: v <= 0.5,
              "7x fewer parameters (the paper: 20x)"),
        claim("the same, without guidance", "DiT-S/2 vs DiT-XL/2: similar images", "stability_worst_no_cfg.small",
              f"small vs the base model, CFG 1: {gate}", lambda v: v <= 0.5,
              "the small net's earlier checkpoints (worse FD): small_checkpoints"),
        claim("half the data costs no quality", "50% of CelebA-HQ pruned: slight FID gain",
              "pruning.fd_ratio_50", "FD(random 50%, mean of halves A and B) / FD(full) <= 1",
              lambda v: v <= 1.0, f"largest relative FD gap between two seeds at 25%: "
                                  f"{r['pruning']['seed_spread_25']:.2f}"),
        claim("balanced clustering (nearest) beats random pruning at 25%", "75% of ImageNet pruned with balanced "
              "clustering", "pruning.nearest_vs_random_25", "mean FD over 2 seeds, nearest / random < 1",
              lambda v: v < 1.0, "spherical k-means, one cluster per class, nearest members kept"),
        claim("balanced clustering (furthest) beats random pruning at 25%", "75% of ImageNet pruned with balanced "
              "clustering", "pruning.furthest_vs_random_25", "mean FD over 2 seeds, furthest / random < 1",
              lambda v: v < 1.0, "the official equal_cluster's default (largest=True)"),
        claim("coarse-to-fine at the paper's switch: > 2x faster at comparable quality", "2.15x (t_split 0.7)",
              "c2f_speedup_measured", "measured speed-up >= 2 and FD <= 1.1 x large alone at switch 0.3",
              lambda v: v >= 2 and c2f["fd_ratio"] <= 1.1,
              f"FD ratio {c2f['fd_ratio']:.2f}; cost model {r['c2f_speedup_cost_model']:.2f}x; best switch within "
              f"10% FD: {best['switch_t']:g} ({best['speedup']:.2f}x)"),
    ]


# %% figures


def image_rows(rows: list, path, title: str) -> None:
    """One row of images per model, labelled: rows = [(label, images (K, C, S, S)), ...]."""
    k, S = len(rows[0][1]), rows[0][1].shape[-1]
    canvas = grid(torch.cat([x for _, x in rows]), nrow=k)  # (H, W, 3), 1 px of padding between images
    fig, ax = plt.subplots(figsize=(0.42 * k + 1.5, 0.42 * len(rows) + 0.45))
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


def plot_c2f(c2f: list, path) -> None:
    """FD relative to the large model alone (with its paired interval) and the speed-up (measured,
    and what the cost model predicts) against the switch time."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ts = [r["switch_t"] for r in c2f]
    err = [[r["fd_ratio"] - r["fd_ratio_ci"][0] for r in c2f], [r["fd_ratio_ci"][1] - r["fd_ratio"] for r in c2f]]
    ax.errorbar(ts, [r["fd_ratio"] for r in c2f], yerr=err, fmt="o-", color="C0", ms=3, capsize=2,
                label="FD / FD of the large model alone (95%)")
    ax.axhline(1.1, color="C0", ls=":", lw=1, label="+10%")
    ax.axvline(PAPER_SWITCH, color="grey", ls="--", lw=0.8, label="the paper's switch")
    ax.set(xlabel="switch time (small model while t > switch)", ylabel="evaluator FD, relative", xlim=(1.05, -0.05))
    ax2 = ax.twinx()
    ax2.plot(ts, [r["speedup"] for r in c2f], "s-", color="C1", ms=3, label="speed-up, measured (median)")
    ax2.plot(ts, [r["speedup_cost_model"] for r in c2f], "--", color="C3", lw=1, label="speed-up, cost model")
    ax2.set_ylabel("speed-up over the large model alone", color="C1")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    ax.set_title("coarse-to-fine: small model first, large model last", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fd_fraction(fd_frac: dict, fd_25_s2: dict, path) -> None:
    """FD against the share of data kept, one line per pruning rule; the second seed at 25% as
    open markers beside the first."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (kind, by_frac) in enumerate(fd_frac.items()):
        label = kind if kind == "random" else f"balanced, {kind}"
        ax.plot([float(f) for f in by_frac], list(by_frac.values()), "o-", ms=3, color=f"C{i}", label=label)
        ax.plot([0.25], [fd_25_s2[kind]], "o", mfc="none", color=f"C{i}")
    ax.plot([], [], "o", mfc="none", color="grey", label="25%, second training seed")
    ax.set(xscale="log", xlabel="share of the training data kept", ylabel="evaluator FD to held-out images",
           title="less data, equal training steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figures(out, samples, traj, t_grid, fd_frac, fd_25_s2, c2f, c2f_samples):
    cols = min(12, len(next(iter(samples.values()))))
    image_rows([(name, samples[name][:cols]) for name in ("reference", *PART1[:-1], "large", "small")],
               out / "fig_stability_grid.png", "same noise (one column each), different models (one row each)")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, d in traj["distance"].items():
        ax.plot(t_grid, d, marker="o", ms=2, label=f"{name} vs {PARTNER[name]}")
    unrelated = statistics.median(traj["unrelated"].values())
    ax.axhline(unrelated, color="k", ls=":", lw=1, label="unrelated pairs at t = 0 (same class, median)")
    ax.set(xlabel="t (sampling runs from 1, noise, to 0, data)", ylabel="mean per-image RMS distance of x_t",
           title="where same-noise trajectories part", xlim=(1.02, -0.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fig_trajectory.png", dpi=120)
    plt.close(fig)
    plot_fd_fraction(fd_frac, fd_25_s2, out / "fig_fd_vs_fraction.png")
    plot_c2f(c2f, out / "fig_c2f.png")
    image_rows([(f"switch {s:g}", x[:cols]) for s, x in c2f_samples.items()], out / "fig_c2f_samples.png",
               "coarse-to-fine samples, same noise (1: large model alone, 0: small alone)")


# %% run


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = run_dir(cfg, "lfm_stability")
    data = data_mod.load("shapes", cfg.n_train, 16, cfg.seed, "train")
    held_out = data_mod.load("shapes", cfg.n_samples, 16, cfg.seed, "test")
    real = held_out.images  # for the FD
    ev, _ = get_evaluator("shapes", 16, device, cfg.eval_steps, cfg.seed)
    # Balanced clustering in a space that is not the FD's: a second classifier (another seed, other
    # draws of the data) stands in for CLIP, a semantic encoder trained on other data.
    encoder, _ = get_evaluator("shapes", 16, device, cfg.eval_steps, cfg.seed + 1)
    feats = encoder.features(data.images)
    cluster, centres = spherical_kmeans(feats, cfg.clusters, cfg.seed)

    models, info, specs = {}, {}, model_specs(cfg, feats, cluster, centres)
    for name, (idx, key, kw) in tqdm(specs.items(), desc="models"):
        subset = data_mod.Dataset(data.images[idx], data.labels[idx], data.class_names)
        models[name], info[name] = train(cfg, device, name, subset, key, **kw)
    models["large"], _ = pretrain.base_model(pretrain.Config(**pretrain.PRESETS[cfg.large], seed=cfg.seed), device)

    # Part 1: the same noise and labels through every model (sample_labels draws the noise from
    # the seed on the CPU), then same-noise pairs against unrelated pairs, with the sampler's
    # guidance and without it (CFG 1: the flow itself).
    y = torch.arange(cfg.n_samples) % data.n_classes  # balanced labels
    samples = {name: sample_labels(m, y, cfg.sample_steps, cfg.cfg_scale, cfg.seed + 1)
               for name, m in tqdm(models.items(), desc="sampling", leave=False) if name != "large"}
    # Part 3 (coarse-to-fine, the smaller network then the base model) runs here: its switch 1 is
    # the large model alone from the same noise, Part 1's large-model samples.
    c2f, pair, c2f_samples = part3(cfg, models["small"], models["large"], ev, y, real, device)
    samples["large"] = c2f_samples[1.0]
    plain = {name: sample_labels(models[name], y, cfg.sample_steps, 1.0, cfg.seed + 1)
             for name in tqdm(("reference", *PART1, "large"), desc="sampling without CFG", leave=False)}
    fd = {name: ev.fd(x, real) for name, x in samples.items()}
    stability = {n: stability_metrics(ev, samples[PARTNER[n]], samples[n], y, cfg.seed) for n in PART1}
    stability_no_cfg = {n: stability_metrics(ev, plain[PARTNER[n]], plain[n], y, cfg.seed) for n in PART1}
    checkpoints = small_checkpoints(cfg, device, info["small"], data, ev, y, real, samples["large"])
    n_traj = min(64, cfg.n_samples)
    traj = trajectory_distance({n: (models[PARTNER[n]], models[n]) for n in PART1},
                               seeded_noise(cfg.n_samples, data.channels, data.size, cfg.seed + 1)[:n_traj], y[:n_traj],
                               cfg, cfg.seed)
    t_grid = torch.linspace(1, 0, cfg.sample_steps + 1).tolist()

    def worst(stab, names):  # the gate's statistic: the larger of the two ratios, worst over the names
        return max(max(stab[n]["mse_ratio"], stab[n]["position_ratio"]) for n in names)

    # Part 2: quality against the share of data kept, random vs balanced pruning, equal steps.
    names = {"random": ("reference", "half_A", "random_25", "random_10"),
             "nearest": ("reference", "nearest_50", "nearest_25", "nearest_10"),
             "furthest": ("reference", "furthest_50", "furthest_25", "furthest_10")}
    fd_by_fraction = {kind: {f"{f:g}": fd[m] for f, m in zip(FRACTIONS, ms)} for kind, ms in names.items()}
    fd_25 = {kind: [fd[f"{kind}_25"], fd[f"{kind}_25_s2"]] for kind in names}
    mean25 = {kind: sum(v) / 2 for kind, v in fd_25.items()}
    pruning = dict(
        fd_25_two_seeds=fd_25,
        fd_ratio_50=(fd["half_A"] + fd["half_B"]) / 2 / fd["reference"],
        nearest_vs_random_25=mean25["nearest"] / mean25["random"],
        furthest_vs_random_25=mean25["furthest"] / mean25["random"],
        seed_spread_25=max(abs(a - b) / ((a + b) / 2) for a, b in fd_25.values()),  # largest relative gap
    )

    # Part 3's headline rows: the paper's switch, and the most small-model steps at FD within 10%.
    paper = min(c2f, key=lambda r: abs(r["switch_t"] - PAPER_SWITCH))  # 0.3, or its nearest grid time
    within = [r for r in c2f if r["fd_ratio"] <= 1.1]  # the large model alone is always there
    best = min(within, key=lambda r: r["switch_t"])  # the most small-model steps at FD within 10%
    real_2 = data_mod.load("shapes", cfg.n_samples, 16, cfg.seed + 1, "test").images  # another held-out draw

    results = dict(
        stability=stability,
        stability_no_cfg=stability_no_cfg,
        stability_worst=dict(data_or_seed=worst(stability, PART1[:6]), small=worst(stability, ["small"])),
        stability_worst_no_cfg=dict(data_or_seed=worst(stability_no_cfg, PART1[:6]),
                                    small=worst(stability_no_cfg, ["small"])),
        stability_targets_hold=all(stability[n]["passes"] for n in PART1),
        small_checkpoints=checkpoints,
        trajectory=dict(t=t_grid, **traj),
        fd_by_fraction=fd_by_fraction,
        pruning=pruning,
        fd=fd,
        fd_real_vs_real=ev.fd(real_2, real),  # the FD floor of two real sets of this size
        real_unrelated_position_err=real_spread(held_out, cfg.seed),  # the data's own spread within a class
        sample_accuracy={name: ev.accuracy(x, y) for name, x in samples.items()},
        # Clusters of equal size need not hold equal shares of each class: the class mix of each subset.
        class_counts={name: torch.bincount(data.labels[idx], minlength=data.n_classes).tolist()
                      for name, (idx, _, _) in specs.items() if name not in ("reference", "other_seed", "small")},
        cluster_class_counts=[torch.bincount(data.labels[cluster == c], minlength=data.n_classes).tolist()
                              for c in range(cfg.clusters)],
        params={name: count_params(m) for name, m in models.items()},
        train_seconds={name: round(i["train_seconds"], 1) for name, i in info.items()},
        loss_curve={name: info[name]["loss_curve"] for name in ("reference", "small")},
        c2f=c2f,
        c2f_pair=pair,
        c2f_paper=paper,
        c2f_best=best,
        c2f_speedup_measured=paper["speedup"],
        c2f_speedup_cost_model=paper["speedup_cost_model"],
        c2f_model_vs_measured=max(abs(r["speedup"] / r["speedup_cost_model"] - 1) for r in c2f),
        c2f_fd_ci={f"{r['switch_t']:g}": r["fd_ci"] for r in c2f},
        fd_large_only=c2f[0]["fd"],
        metric_note="cos: evaluator-feature cosine (DINOv2 stand-in); FD: evaluator Frechet distance (FID "
                    "stand-in); unrelated: same-class pairs from different noise; position / size: centroid "
                    "and area of the lit pixels",
        device=str(device),
    )
    results["claims"] = make_claims(results)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    save_json(out / "results.json", results)
    figures(out, samples, traj, t_grid, fd_by_fraction, {k: v[1] for k, v in fd_25.items()}, c2f, c2f_samples)
    rows = [(f"{n} vs {PARTNER[n]}", v["label_agreement"], v["unrelated_label_agreement"], v["mse_ratio"],
             v["position_ratio"], v["size_ratio"], stability_no_cfg[n]["mse_ratio"],
             stability_no_cfg[n]["position_ratio"], v["passes"]) for n, v in stability.items()]
    print_table(rows, ("pair", "label agr.", "unrel. agr.", "MSE ratio", "pos. ratio", "size ratio", "MSE, CFG 1",
                       "pos., CFG 1", "passes"))
    print()
    print_table([(n, results["sample_accuracy"][n], fd[n], results["params"][n], results["train_seconds"].get(n, "-"))
                 for n in samples], ("model", "accuracy (CFG)", "eval FD", "params", "train s"))
    print()
    print_table([(r["switch_t"], r["fd"], r["fd_ratio"], r["paired_cos"], r["seconds"], r["speedup"],
                  r["speedup_cost_model"]) for r in c2f],
                ("switch t", "eval FD", "FD / large", "cos to large", "median s", "speed-up", "cost model"))
    print()
    print_table([(c["claim"], c["ours"], c["reproduced"]) for c in results["claims"]], ("claim", "ours", "reproduced"))
    print(f"seconds {results['seconds']}; wrote {out}/results.json and figures")
    return results


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python lfm_stability.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
