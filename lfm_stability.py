"""Stability in latent flow matching: same noise, same picture; coarse-to-fine sampling.
Briq, Kamp, Fried, Cohen, Kesselheim (ICML 2026), arXiv 2605.08398.
Official code: github.com/briqr/explo-r-it-ing_lfm_stability. Long-form notes, findings and
deviations: docs/lfm_stability.md.

Claim. Flow-matching models are stable: from the same noise, models trained on disjoint halves of
    the data, on a pruned quarter of it or with another seed draw nearly the same image. Two uses:
    (1) pruned data: balanced clustering (spherical k-means on normalised features, equal samples per
    cluster, the members nearest to or furthest from the centroid) keeps quality with less data;
    (2) coarse-to-fine sampling: a small model runs the noisy first part of the trajectory and the
    large one finishes it, at comparable quality and > 2x faster (DiT-S/2 then XL/2: 2.15x).

Paper -> code
    same-seed pairs vs permuted pairs (DINOv2 cosine) ....... `stability_metrics` (`official` cosine
                                                              beside our pixel ratios), `gate`
    what the noise decides inside a class ................... `shape_attributes`, `real_spread`
    balanced clustering (cluster_features.py) ............... `spherical_kmeans`
    equal_cluster (nearest / furthest members) .............. `equal_shares`, `balanced_subset`
    coarse-to-fine (CoarseFineModel, t_split) ............... `switched_velocity`, `coarse_to_fine`
    its cost ................................................ `step_split`, `cost_model_speedup`
    quality (FID) with intervals ............................ `fd_ci`, `fd_ratio_ci`
    the experiment: models, pairs, pruning, the switch sweep  `model_specs`, `train`, `run`

Convention (common/flow.py): t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, Euler from 1 to 0.
    The paper puts noise at t = 0: t_ours = 1 - t_theirs, v_ours = -v_theirs. Its switch
    t_split = 0.7 (the official wrapper runs the coarse model while t_theirs < 0.7) is
    switch_t = 0.3 here: the small model runs while t > 0.3, the large one from 0.3 to 0.

Regime. Unguided (CFG 1) as the unconditional datasets and the released coarse-to-fine sampler;
    CFG 4 on every channel is a second row. Claims are decided by 95% bootstrap intervals.

Run
    python lfm_stability.py                    # cpu preset, 2 CPU cores: see docs/lfm_stability.md
    python lfm_stability.py --preset gpu       # GPU (not measured yet)
    python lfm_stability.py --preset smoke     # seconds, what the tests run
"""

# %% imports
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import config, dit, pretrain
from common import data as data_mod
from common.config import BaseConfig, UserError, cli, field, print_table, resolve_device, run_dir, save_json
from common.dit import SIZES, TinyDiT, count_params
from common.evaluator import frechet_distance, get_evaluator, paired_cosine
from common.flow import fm_loss, interpolate, sample_t
from common.plot import grid, plt
from common.sampler import autocast, cfg_velocity, euler, sample_labels, seeded_noise
from common.stats import ratio_ci, shifted_interval
from common.train import EMA, load_or_train, make_optimizer, optimizer_step

# %% config and presets


@dataclasses.dataclass
class Config(BaseConfig):
    model: str = field("xs", "TinyDiT size of the reference and of every data / seed model", choices=tuple(SIZES))
    small_width: int = field(48, "width of the small (coarse) network: one block, one head, MLP ratio 1, patch 4; "
                                 "at least the 48 values of a patch (the large one: 4 blocks of width 96)", min=48)
    small_steps: int = field(4800, "optimizer steps of the small network (cheap per step; trained longer)")
    large: str = field("cpu", "common.pretrain preset of the large (fine) model", choices=tuple(pretrain.PRESETS))
    steps: int = field(2400, "optimizer steps of every data / seed model (one recipe: about 55 s each for xs)")
    batch: int = field(64, "batch size of every trained model")
    lr: float = field(2e-3, "AdamW learning rate (the base model's)")
    n_train: int = field(20000, "the full training set; every subset is drawn from it")
    clusters: int = field(9, "spherical k-means clusters: one per class, as the paper's k = 1000 on ImageNet")
    n_samples: int = field(1152, "samples per model, balanced over classes, the same noise for every model")
    sample_steps: int = field(30, "Euler steps (a multiple of 10 puts switches 0.1, 0.2, ... on the grid)")
    cfg_scale: float = field(4.0, "guidance scale of the second row (the paper's ImageNet scale)", min=0)
    time_batch: int = field(192, "images per timed sampling call (every switch once per round)")
    eval_steps: int = field(300, "training steps of the evaluator and of the clustering encoder")
    n_boot: int = field(300, "bootstrap resamples of every 95% interval", min=20)

    def validate(self):
        if self.n_train < 8:
            raise UserError(f"--n-train {self.n_train} must be >= 8, so that a quarter holds two images")
        if self.clusters > self.n_train:
            raise UserError(f"--clusters {self.clusters} cannot exceed the {self.n_train} training images")
        if self.n_samples < 2 * N_CLASSES:
            raise UserError(f"--n-samples {self.n_samples} must be >= {2 * N_CLASSES}: two samples per class")
        if self.time_batch > self.n_samples or self.n_samples % self.time_batch:
            raise UserError(f"--time-batch {self.time_batch} must divide --n-samples {self.n_samples}")


PRESETS = {
    "smoke": dict(steps=10, small_steps=10, batch=16, n_train=720, clusters=6, n_samples=36, sample_steps=4,
                  large="smoke", time_batch=12, eval_steps=20, n_boot=20),
    "cpu": dict(),
    "gpu": dict(model="s", large="gpu", steps=4000, small_steps=12000, batch=256, n_samples=4608,
                sample_steps=60, time_batch=768, eval_steps=600),
}
N_CLASSES = len(data_mod.SHAPES) * len(data_mod.COLOURS)  # 9 shapes classes
PAPER_SWITCH = 0.3  # the official t_split = 0.7 with noise at 0 (see the paper card)
SWITCHES = (1.0, 0.7, 0.5, 0.4, PAPER_SWITCH, 0.2, 0.0)  # 1: the large model alone, 0: the small one alone
GATE = 0.5  # a pair is "nearly the same image" when its paired error is at most half the unrelated one
P_UNCOND = 0.1  # CFG dropout of the shared recipe (common/pretrain.py's)
WORDS = {"reference": "all the data", "half_A": "random half A", "half_B": "half B", "random_25": "random quarter",
         "nearest_25": "nearest quarter", "furthest_25": "furthest quarter", "other_seed": "another seed",
         "large": "large model", "small": "small model"}  # plain words for figures and tables
PAIRS = {"half_A": ("reference", "half_A"), "half_B": ("reference", "half_B"), "halves": ("half_A", "half_B"),
         **{n: ("reference", n) for n in ("random_25", "nearest_25", "furthest_25", "other_seed")},
         "small": ("large", "small")}  # pair name -> (model a, model b): the same noise and labels through both
DATA_PAIRS = tuple(PAIRS)[:-1]  # the data / seed pairs; "small" is the network pair


# %% the method, part 1: stability, same noise against unrelated pairs


def shape_attributes(x: torch.Tensor) -> torch.Tensor:
    """Where the shape sits and how big it is (what the noise decides here), from pixels: a pixel's lit
    weight is its brightest channel mapped to [0, 1], 0 below 0.1 (a dim background must not pull the
    centroid). x: (B, C, S, S) -> (B, 3): centroid column and row (px, centres at i + 0.5), lit area."""
    lit = ((x.float().amax(1) + 1) / 2).clamp(0, 1)  # (B, S, S)
    lit = torch.where(lit > 0.1, lit, 0.0)
    centres = torch.arange(x.shape[-1], dtype=torch.float32) + 0.5
    area = lit.sum((1, 2))
    denom = area.clamp(min=1e-6)  # an image with nothing lit has its centroid at 0
    cx = (lit * centres[None, None, :]).sum((1, 2)) / denom
    cy = (lit * centres[None, :, None]).sum((1, 2)) / denom
    return torch.stack([cx, cy, area], 1)


def shuffle_within_class(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Every index to another of the same label (a cyclic shift of a shuffled class): the "unrelated"
    partner shares the label but not the noise."""
    perm = torch.arange(len(y))
    for c in y.unique():
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        perm[members] = members.roll(1)
    return perm


def errors(x_a: torch.Tensor, x_b: torch.Tensor) -> dict:
    """Per-pair differences of two image sets (B,) each: pixel MSE, position (px), size (px of area)."""
    at_a, at_b = shape_attributes(x_a), shape_attributes(x_b)
    return dict(mse=(x_a - x_b).pow(2).flatten(1).mean(1), position=(at_a[:, :2] - at_b[:, :2]).norm(dim=1),
                size=(at_a[:, 2] - at_b[:, 2]).abs())


def real_spread(images: torch.Tensor, labels: torch.Tensor, seed: int) -> dict:
    """How far apart two real images of one class are (the mean of `errors` over same-class pairs):
    a denominator that guidance cannot move, unlike the unrelated pairs of a guided sampler."""
    perm = shuffle_within_class(labels, torch.Generator().manual_seed(seed))
    return {k: v.mean().item() for k, v in errors(images, images[perm]).items()}


def stability_metrics(ev, x_a: torch.Tensor, x_b: torch.Tensor, y: torch.Tensor, real: dict, seed: int,
                      n_boot: int = 400) -> dict:
    """Same-noise pairs (x_a[i], x_b[i]) against unrelated pairs (x_a[i], x_b[perm[i]]): the same label,
    other noise. Each ratio is paired / unrelated, [value, low, high] (1: chance, 0: the same image),
    and paired / the real spread (`real`). Beside them the official measure: the paired feature cosine
    against a permutation over all samples. x_a, x_b: (B, C, S, S) from the same noise and labels y."""
    g = torch.Generator().manual_seed(seed)
    same_class, any_class = shuffle_within_class(y, g), torch.randperm(len(y), generator=g)
    paired, unrelated = errors(x_a, x_b), errors(x_a, x_b[same_class])
    f_a, f_b = ev.features(x_a), ev.features(x_b)  # (B, F): the DINOv2 stand-in
    m = dict(paired_cos=paired_cosine(f_a, f_b).mean().item(),
             permuted_cos=paired_cosine(f_a, f_b[any_class]).mean().item(),  # the official "unrelated"
             unrelated_cos=paired_cosine(f_a, f_b[same_class]).mean().item())
    for k in ("mse", "position", "size"):
        m[f"{k}_err"], m[f"unrelated_{k}_err"] = paired[k].mean().item(), unrelated[k].mean().item()
        m[f"{k}_ratio"] = ratio_ci(paired[k], unrelated[k], n_boot, seed)
        m[f"real_{k}_ratio"] = m[f"{k}_err"] / real[k]
    m["verdict"] = gate(m)
    m["passes"] = m["verdict"] == "holds"
    return m


def gate(m: dict) -> str:
    """The gate by intervals: "holds" when the upper ends of the MSE and position ratios are both <= GATE,
    "fails" when the lower end of either is above it, otherwise "undecided"."""
    if m["mse_ratio"][2] <= GATE and m["position_ratio"][2] <= GATE:
        return "holds"
    return "fails" if max(m["mse_ratio"][1], m["position_ratio"][1]) > GATE else "undecided"


# %% the method, part 2: balanced clustering


def spherical_kmeans(f: torch.Tensor, k: int, seed: int, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on the unit sphere, as the official cluster_features.py: rows L2-normalised, each assigned
    to the centre of highest cosine, each centre the normalised mean of its members; k-means++ seeds
    (on the sphere 1 - cos is half the squared distance). f: (N, F) -> (cluster (N,), centres (k, F))."""
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
    """How many to keep per cluster: n in all, as equal as possible, at most a cluster's size (water filling)."""
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
    """The official equal_cluster: equal shares per cluster, in each the members nearest to its centre
    (largest=False) or furthest (largest=True). -> n sorted indices; a smaller n keeps a subset."""
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


# %% the method, part 3: coarse-to-fine sampling


def switched_velocity(small, large, y: torch.Tensor, switch_t: float, scale: float = 1.0):
    """The official CoarseFineModel as a velocity: the small model while t > switch_t (t_theirs < t_split),
    the large one from there to t = 0; one model per Euler step, picked by the step's start time."""
    v_small = cfg_velocity(small, y, scale, small.null_label)
    v_large = cfg_velocity(large, y, scale, large.null_label)
    return lambda x, t: v_small(x, t) if float(t[0]) > switch_t + 1e-6 else v_large(x, t)


def coarse_to_fine(small, large, noise: torch.Tensor, y: torch.Tensor, steps: int, switch_t: float,
                   scale: float = 1.0) -> torch.Tensor:
    """Euler on one grid with the switched velocity (switch_t = 1: large alone, 0: small alone)."""
    return euler(switched_velocity(small, large, y, switch_t, scale), noise, steps)


def step_split(steps: int, switch_t: float) -> tuple[int, int]:
    """(small-model, large-model) steps: grid times t_i = 1 - i / steps above the switch are the small's."""
    n_small = sum(1 - i / steps > switch_t + 1e-6 for i in range(steps))
    return n_small, steps - n_small


def cost_model_speedup(steps: int, switch_t: float, t_large: float, t_small: float) -> float:
    """The speed-up that the per-step costs predict: n T_L / (n_L T_L + n_S T_S)."""
    n_small, n_large = step_split(steps, switch_t)
    return steps * t_large / (n_large * t_large + n_small * t_small)


# %% quality: FD with intervals


def fd_ci(f_x: torch.Tensor, f_real: torch.Tensor, seed: int, n_boot: int = 400) -> list:
    """Evaluator FD (FID stand-in) to the real features, [FD, low, high]: samples resampled, real set fixed."""
    g = torch.Generator().manual_seed(seed)
    boot = torch.tensor([frechet_distance(f_x[torch.randint(len(f_x), (len(f_x),), generator=g)], f_real)
                         for _ in range(n_boot)])
    return shifted_interval(boot, frechet_distance(f_x, f_real))


def fd_ratio_ci(groups: list, f_real: torch.Tensor, seed: int, n_boot: int = 400) -> list:
    """FD(x) / FD(base) averaged over pairs and training seeds, [ratio, low, high]. groups: per training
    seed a list of (f_x, f_base) from the same noise. The bootstrap resamples the seeds, then the samples
    of each drawn seed (shared by its pairs): seed-to-seed spread and sample noise both enter."""
    g = torch.Generator().manual_seed(seed)

    def ratio(group, i=None):
        return sum(frechet_distance(fx if i is None else fx[i], f_real) /
                   frechet_distance(fb if i is None else fb[i], f_real) for fx, fb in group) / len(group)

    estimate = sum(ratio(group) for group in groups) / len(groups)
    boot = []
    for _ in range(n_boot):
        drawn = [groups[j] for j in torch.randint(len(groups), (len(groups),), generator=g)]
        boot.append(sum(ratio(gr, torch.randint(len(gr[0][0]), (len(gr[0][0]),), generator=g))
                        for gr in drawn) / len(drawn))
    return shifted_interval(torch.tensor(boot), estimate)


# %% the experiment: one training recipe for every model, cached by what trained it


def train(cfg, device, name: str, data, data_key: str, seed: int, small: bool = False) -> tuple[TinyDiT, dict]:
    """A TinyDiT trained on `data` with the base model's recipe (10% CFG dropout, logit-normal t, EMA)."""
    steps, arch = (cfg.small_steps if small else cfg.steps), dict(SIZES[cfg.model], patch=4)
    if small:  # one block, narrow MLP: the paper's DiT-S/2 next to XL/2, in miniature
        arch.update(width=cfg.small_width, depth=1, heads=1, mlp_ratio=1)
    torch.manual_seed(seed)  # the weight init
    net = TinyDiT(img_size=data.size, channels=data.channels, n_classes=data.n_classes, **arch)
    key = dict(kind="lfm_stability", version=3, data_version=data_mod.VERSION, model_version=dit.VERSION,
               data_key=data_key, n=len(data.images), steps=steps, batch=cfg.batch, lr=cfg.lr, seed=seed,
               small=f"w{cfg.small_width}-h1-d1-mlp1" if small else None, model=cfg.model)

    def fit(net):
        net.to(device).train()
        g = torch.Generator().manual_seed(seed)  # batches, dropout, noise and times
        opt, ema = make_optimizer(net, cfg.lr), EMA(net, 0.999)
        losses = torch.zeros(steps)
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
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        ema.copy_to(net)
        return dict(loss_curve=[c.mean().item() for c in losses.tensor_split(min(10, steps))])

    info = load_or_train("lfm_stability", key, net, fit)
    return net.to(device).eval(), info


def model_specs(cfg, feats: torch.Tensor, cluster: torch.Tensor, centres: torch.Tensor) -> dict:
    """name -> (training indices, data key, seed): two training seeds of the full data, a random half
    and the random / nearest / furthest quarters; half B (the other half) with the first seed."""
    n, order = len(cluster), cfg.seed + 101  # order: the seed of the random order
    half_a = random_subset(n, 0.5, order)
    half_b = torch.ones(n, dtype=torch.bool).index_fill_(0, half_a, False).nonzero().flatten()
    clustering = f"of{n}/k{cfg.clusters}/enc{cfg.seed + 1}-{cfg.eval_steps}/km{cfg.seed}"
    data = {"reference": (torch.arange(n), f"full{n}"),
            "half_A": (half_a, f"random0.5/of{n}/order{order}"),
            "random_25": (random_subset(n, 0.25, order), f"random0.25/of{n}/order{order}"),
            "nearest_25": (balanced_subset(feats, cluster, centres, n // 4, True), f"nearest0.25/{clustering}"),
            "furthest_25": (balanced_subset(feats, cluster, centres, n // 4, False), f"furthest0.25/{clustering}")}
    specs = {name: (*d, cfg.seed) for name, d in data.items()}
    specs["half_B"] = (half_b, f"halfB/of{n}/order{order}", cfg.seed)
    specs["other_seed"] = (*data["reference"], cfg.seed + 1)  # the reference's second training seed
    specs |= {f"{name}_s2": (*data[name], cfg.seed + 1) for name in ("half_A", "random_25", "nearest_25",
                                                                     "furthest_25")}
    return specs


def time_round_robin(samplers: dict, noise: torch.Tensor, y: torch.Tensor, chunk: int, device) -> tuple[dict, dict]:
    """Round r times every sampler once on chunk r, in an order rotated by r (drift hits all alike), after
    one untimed warm-up call each. -> ({name: all samples on the CPU}, {name: [seconds per round]})."""
    names, sync = list(samplers), (torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    for name in names:
        samplers[name](noise[:2].to(device), y[:2].to(device))
    out, seconds = {n: [] for n in names}, {n: [] for n in names}
    for r in range(len(y) // chunk):
        nb, yb = noise[r * chunk:(r + 1) * chunk].to(device), y[r * chunk:(r + 1) * chunk].to(device)
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            x = samplers[name](nb, yb)
            sync()
            seconds[name].append(time.perf_counter() - t0)
            out[name].append(x.float().cpu())
    return {n: torch.cat(out[n]) for n in names}, seconds


def sweep_switches(cfg, small, large, noise, y, f_of, f_real, device) -> tuple[list, dict]:
    """The coarse-to-fine sweep, unguided like the released sampler: per switch the FD, the paired FD
    ratio to the large model alone, the cosine to its images, the measured and predicted speed-up."""
    samplers = {s: (lambda nb, yb, s=s: coarse_to_fine(small, large, nb, yb, cfg.sample_steps, s))
                for s in SWITCHES}
    samples, seconds = time_round_robin(samplers, noise, y, cfg.time_batch, device)
    median = {s: statistics.median(v) for s, v in seconds.items()}
    t_large, t_small = median[1.0] / cfg.sample_steps, median[0.0] / cfg.sample_steps  # per Euler step
    f_large, rows = f_of(samples[1.0]), []
    for s in tqdm(SWITCHES, desc="coarse-to-fine FD", leave=False):
        f_x = f_of(samples[s])
        rows.append(dict(switch_t=s, small_steps=step_split(cfg.sample_steps, s)[0], seconds=median[s],
                         fd=fd_ci(f_x, f_real, cfg.seed, cfg.n_boot), speedup=median[1.0] / median[s],
                         fd_ratio=fd_ratio_ci([[(f_x, f_large)]], f_real, cfg.seed, cfg.n_boot),
                         cos_to_large=paired_cosine(f_x, f_large).mean().item(),
                         speedup_cost_model=cost_model_speedup(cfg.sample_steps, s, t_large, t_small)))
    return rows, dict(samples=samples, t_large=t_large, t_small=t_small)


# %% the claims, each with the test that decides it (fixed before the run)


def make_claims(r: dict) -> list:
    def claim(*args):
        return config.claim_entry(r, *args)

    g = f"upper end of the 95% interval of max(paired / unrelated pixel MSE, position error) <= {GATE}"
    c2f = r["c2f_paper"]
    return [
        claim("same noise, other data (halves, quarters) or another seed: nearly the same image, unguided",
              "similar images (unconditional CelebA-HQ, FFHQ; DINOv2 cosine far above permuted pairs)",
              "stability_worst.data_or_seed", f"worst of the seven pairs, CFG 1: {g}", lambda v: v <= GATE,
              "unrelated pairs: same class, other noise; official cosine beside it: official_cosine"),
        claim("the same with guidance", "ImageNet, CFG 4 on 3 of 8 latent channels", "stability_worst_cfg.data_or_seed",
              f"worst of the seven pairs, CFG 4 on every channel: {g}", lambda v: v <= GATE,
              "full-image guidance pulls a class towards one prototype: outside the paper's regime"),
        claim("same noise, a much smaller network: nearly the same image, unguided", "DiT-S/2 vs DiT-XL/2",
              "stability_worst.small", f"small vs large, CFG 1: {g}", lambda v: v <= GATE,
              f"small net FD {r['model_fd']['small'][0]:.2f} vs large {r['model_fd']['large'][0]:.2f}"),
        claim("half the data costs no quality", "50% of CelebA-HQ pruned: slight FID gain", "pruning.half_data.1",
              "FD(random 50%) / FD(full) over 2 training seeds: the interval's lower end <= 1",
              lambda v: v <= 1.0, f"ratio {r['pruning']['half_data'][0]:.2f}, upper end "
                                  f"{r['pruning']['half_data'][2]:.2f}"),
        *(claim(f"balanced clustering ({k} members) beats random pruning at 25%", "75% of ImageNet pruned with "
                "balanced clustering", f"pruning.{k}_vs_random.2", f"FD {k} / random over 2 training seeds: the "
                "interval's upper end < 1", lambda v: v < 1.0, "here the clusters are the classes: class-balanced "
                "selection of typical (nearest) or atypical (furthest) images") for k in ("nearest", "furthest")),
        claim("the small network is really small: >= 10x cheaper per step, worse alone",
              "DiT-S/2 vs XL/2, about 20x in cost", "cost_ratio_per_step",
              "measured cost ratio >= 10 and the FD intervals of small and large alone do not overlap",
              lambda v: v >= 10 and r["model_fd"]["small"][1] > r["model_fd"]["large"][2],
              f"FD {r['model_fd']['small'][0]:.2f} vs {r['model_fd']['large'][0]:.2f}"),
        claim("coarse-to-fine at the paper's switch: > 2x faster at comparable quality", "2.15x (t_split 0.7)",
              "c2f_paper.speedup", "measured speed-up >= 2 and the FD ratio's upper end <= 1.1 at switch 0.3",
              lambda v: v >= 2 and c2f["fd_ratio"][2] <= 1.1,
              f"FD ratio {c2f['fd_ratio'][0]:.2f} [{c2f['fd_ratio'][1]:.2f}, {c2f['fd_ratio'][2]:.2f}]"),
    ]


# %% figures


def save(fig, path) -> None:  # one PNG per figure
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fig_method(out, small, large, noise, y, steps: int, switch_t: float) -> dict:
    """One noise through the large model, the small one and coarse-to-fine: the clean image each heads for
    (x_0 = x_t - t v, the path is straight), and each path's distance to the large one's (returned)."""
    paths = {"large model alone": 1.0, "small model alone": 0.0, f"small, then large from t = {switch_t:g}": switch_t}
    ts = torch.linspace(1, 0, steps + 1).tolist()
    traj, preds, dev = {}, {}, next(large.parameters()).device
    for label, s in paths.items():
        v = switched_velocity(small, large, y.to(dev), s)
        traj[label] = euler(v, noise.to(dev), steps, return_trajectory=True)[1]  # (S + 1, B, C, H, W) on the CPU
        with torch.inference_mode():
            preds[label] = [(x - t * v(x.to(dev), torch.full((len(x),), t, device=dev)).float().cpu())
                            for x, t in zip(traj[label], ts)]
    cols = sorted({min(range(len(ts)), key=lambda i: abs(ts[i] - w)) for w in (1, .8, .6, .4, .3, .2, .1, 0)})
    rows = [torch.stack([preds[label][i][k] for i in cols]) for k in range(2) for label in paths]
    dist = {label: (traj[label] - traj["large model alone"]).pow(2).flatten(2).mean(2).sqrt().mean(1).tolist()
            for label in paths}
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw=dict(width_ratios=[1.5, 1]))
    S = noise.shape[-1]  # image side
    a0.imshow(grid(torch.cat(rows), nrow=len(cols)).numpy(), interpolation="nearest")
    a0.set_xticks([(j + 0.5) * (S + 1) for j in range(len(cols))], [f"{ts[i]:.2g}" for i in cols])
    a0.set_yticks([(r + 0.5) * (S + 1) for r in range(len(rows))], [*paths, *paths], fontsize=7)
    a0.set(xlabel="t (1: noise, 0: the sample)", title="the clean image each path heads for, two noises")
    for (label, d), mark in zip(list(dist.items())[1:], "os"):
        a1.plot(ts, d, f"{mark}-", ms=2, label=label)
    a1.axvline(switch_t, color="grey", ls="--", lw=0.8, label="the switch to the large model")
    a1.set(xlim=(1.02, -0.02), xlabel="t", ylabel="RMS pixel distance to the large path",
           title="how far each path is from the large model's")
    a1.legend(fontsize=7)
    save(fig, out / "fig_method.png")
    return dict(t=ts, distance_to_large=dist)


def plot_c2f(c2f: list, path) -> None:
    """FD relative to the large model alone (with its paired interval) and the speed-up against the switch."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ts, fr = [r["switch_t"] for r in c2f], [r["fd_ratio"] for r in c2f]
    ax.errorbar(ts, [v[0] for v in fr], yerr=[[v[0] - v[1] for v in fr], [v[2] - v[0] for v in fr]], fmt="o-",
                color="C0", ms=3, capsize=2, label="FD / FD of the large model alone (95%)")
    ax.axhline(1.1, color="C0", ls=":", lw=1, label="+10%")
    ax.axvline(PAPER_SWITCH, color="grey", ls="--", lw=0.8, label="the paper's switch")
    ax.set(xlabel="switch time (small model while t > switch)", ylabel="evaluator FD, relative", xlim=(1.05, -0.05))
    ax2 = ax.twinx()
    ax2.plot(ts, [r["speedup"] for r in c2f], "s-", color="C1", ms=3, label="speed-up, measured")
    ax2.plot(ts, [r["speedup_cost_model"] for r in c2f], "--", color="C3", lw=1, label="speed-up, cost model")
    ax2.set_ylabel("speed-up over the large model alone", color="C1")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0], fontsize=7,
              title="coarse-to-fine, unguided: small model first, large model last", title_fontsize=8)
    save(fig, path)


# %% run


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = run_dir(cfg, "lfm_stability")
    data = data_mod.load("shapes", cfg.n_train, 16, cfg.seed, "train")
    held_out = data_mod.load("shapes", 2 * cfg.n_samples, 16, cfg.seed, "test")  # the FD's real set
    ev, _ = get_evaluator("shapes", 16, device, cfg.eval_steps, cfg.seed)
    # Balanced clustering in a space that is not the FD's: a second classifier (another seed) for CLIP.
    encoder, _ = get_evaluator("shapes", 16, device, cfg.eval_steps, cfg.seed + 1)
    feats = encoder.features(data.images)
    cluster, centres = spherical_kmeans(feats, cfg.clusters, cfg.seed)
    models, info = {}, {}
    for name, (idx, key, seed) in tqdm(model_specs(cfg, feats, cluster, centres).items(), desc="models"):
        subset = data_mod.Dataset(data.images[idx], data.labels[idx], data.class_names)
        models[name], info[name] = train(cfg, device, name, subset, key, seed)
    models["small"], info["small"] = train(cfg, device, "small", data, f"full{cfg.n_train}", cfg.seed, small=True)
    models["large"], _ = pretrain.base_model(pretrain.Config(**pretrain.PRESETS[cfg.large], seed=cfg.seed), device)

    # Same noise and labels through every model; the large and small ones' unguided samples: the sweep's ends.
    y = torch.arange(cfg.n_samples) % data.n_classes  # balanced labels
    noise, f_real = seeded_noise(cfg.n_samples, data.channels, data.size, cfg.seed + 1), ev.features(held_out.images)
    c2f, sweep = sweep_switches(cfg, models["small"], models["large"], noise, y, ev.features, f_real, device)
    plain = {n: sample_labels(m, y, cfg.sample_steps, 1.0, cfg.seed + 1) for n, m in
             tqdm(models.items(), desc="sampling", leave=False) if n not in ("small", "large")}
    plain |= {"large": sweep["samples"][1.0], "small": sweep["samples"][0.0]}
    guided = {n: sample_labels(models[n], y, cfg.sample_steps, cfg.cfg_scale, cfg.seed + 1)
              for n in tqdm(sorted({m for pair in PAIRS.values() for m in pair}), desc="with CFG", leave=False)}
    real = real_spread(held_out.images, held_out.labels, cfg.seed)
    stab, stab_cfg = ({p: stability_metrics(ev, x[a], x[b], y, real, cfg.seed, cfg.n_boot)
                       for p, (a, b) in PAIRS.items()} for x in (plain, guided))
    f = {n: ev.features(x) for n, x in plain.items()}
    model_fd = {n: fd_ci(fn, f_real, cfg.seed, cfg.n_boot) for n, fn in tqdm(f.items(), desc="FD", leave=False)}
    f["reference_s2"] = f["other_seed"]  # the reference's second training seed

    def worst(s, names):  # the gate's statistic: the larger upper end of the two ratios, worst pair
        return max(max(s[n]["mse_ratio"][2], s[n]["position_ratio"][2]) for n in names)

    def vs(a, b):  # FD(a) / FD(b) over the two training seeds, each seed's models from the same noise
        return fd_ratio_ci([[(f[a], f[b])], [(f[f"{a}_s2"], f[f"{b}_s2"])]], f_real, cfg.seed, cfg.n_boot)

    results = dict(
        stability=stab, stability_cfg=stab_cfg,
        stability_worst={k: worst(stab, names) for k, names in (("data_or_seed", DATA_PAIRS), ("small", ["small"]))},
        stability_worst_cfg={k: worst(stab_cfg, n) for k, n in (("data_or_seed", DATA_PAIRS), ("small", ["small"]))},
        official_cosine={k: {p: s[f"{k}_cos"] for p, s in stab.items()} for k in ("paired", "permuted")},
        real_spread=real, model_fd=model_fd,
        pruning=dict(half_data=fd_ratio_ci([[(f["half_A"], f["reference"]), (f["half_B"], f["reference"])],
                                            [(f["half_A_s2"], f["other_seed"])]], f_real, cfg.seed, cfg.n_boot),
                     nearest_vs_random=vs("nearest_25", "random_25"), furthest_vs_random=vs("furthest_25", "random_25"),
                     random_25_vs_full=vs("random_25", "reference")),
        fd_real_vs_real=frechet_distance(ev.features(data_mod.load("shapes", cfg.n_samples, 16, cfg.seed + 1,
                                                                   "test").images), f_real),  # the FD's floor
        sample_accuracy={n: ev.accuracy(x, y) for n, x in plain.items()},
        # the clusters against the classes: a permutation matrix means the clusters are the classes
        cluster_class_counts=[torch.bincount(data.labels[cluster == c], minlength=data.n_classes).tolist()
                              for c in range(cfg.clusters)],
        params={n: count_params(m) for n, m in models.items()},
        cost_ratio_per_step=sweep["t_large"] / sweep["t_small"],
        seconds_per_step=dict(large=sweep["t_large"], small=sweep["t_small"]),
        train_seconds={n: round(i["train_seconds"], 1) for n, i in info.items()},
        loss_curve={n: info[n]["loss_curve"] for n in ("reference", "small")},
        c2f=c2f, c2f_paper=next(r for r in c2f if r["switch_t"] == PAPER_SWITCH),
        c2f_best=min((r for r in c2f if r["fd_ratio"][2] <= 1.1), key=lambda r: r["switch_t"], default=None),
        method=fig_method(out, models["small"], models["large"], noise[:2], y[:2], cfg.sample_steps, PAPER_SWITCH),
        device=str(device))
    results["claims"] = make_claims(results)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    save_json(out / "results.json", results)
    rows = [plain[n][:12] for n in WORDS]
    fig, ax = plt.subplots(figsize=(0.42 * len(rows[0]) + 1.8, 0.42 * len(rows) + 0.45))
    ax.imshow(grid(torch.cat(rows), nrow=len(rows[0])).numpy(), interpolation="nearest")
    ax.set_yticks([(r + 0.5) * 17 for r in range(len(rows))], list(WORDS.values()), fontsize=8)
    ax.set(xticks=[], title="same noise per column, one model per row, no guidance")
    save(fig, out / "fig_stability_grid.png")
    plot_c2f(c2f, out / "fig_c2f.png")

    def ci(v):
        return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"

    print_table([(f"{WORDS[b]} vs {WORDS[a]}", ci(model_fd[a]), ci(model_fd[b]), ci(stab[p]["mse_ratio"]),
                  ci(stab[p]["position_ratio"]), stab[p]["real_position_ratio"], stab[p]["paired_cos"],
                  stab[p]["permuted_cos"], stab[p]["verdict"], ci(stab_cfg[p]["position_ratio"]),
                  stab_cfg[p]["verdict"]) for p, (a, b) in PAIRS.items()],
                ("pair, no guidance", "FD a", "FD b", "MSE ratio", "position ratio", "pos. / real", "cos",
                 "cos permuted", "gate", "position ratio, CFG", "gate, CFG"))
    print_table([(c["claim"], c["ours"], c["reproduced"]) for c in results["claims"]],
                ("\nclaim", "ours", "reproduced"))
    print(f"seconds {results['seconds']}; wrote {out}/results.json and figures")
    return results


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python lfm_stability.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
