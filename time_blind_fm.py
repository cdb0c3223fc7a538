"""What Time Is It? How Data Geometry Makes Time Conditioning Optional for Flow Matching.
Helbling, Gutierrez Hernandez, Hoover, Chau, Ram (2026), arXiv 2605.08344. Long-form notes,
derivations and deviations: docs/time_blind_fm.md.

Claim. A time-blind velocity net (no t input) pays the coupling variance (ambiguous targets from how
noise and data are paired; paid with t too) plus a time-blindness gap (from not knowing t). When the
data lie near a k-dimensional subspace of R^d, t can be read off one x_t from its energy outside
that subspace with error O(1/sqrt(d - k)), so the gap becomes negligible next to the coupling
variance as d grows, and the coupling (independent -> minibatch OT) matters more than t.

Paper -> code (the paper's text is not at hand: * marks what we reconstructed, checked in tests)
    loss = coupling variance + gap + approximation* ..... `decomposition` (exact, Gaussian data),
                                                            `decomposition_mc` (its sampled twin)
    E[u | x_t, t] per eigendirection* ................... `path_var`, `cond_mean_coef`
    E[u | x_t]: the posterior over t* ................... `posterior_nodes`, `blind_coef`
    the closed-form estimator t_hat(x_t)* ............... `fit_subspace`, `estimate_t`
    couplings: independent / minibatch OT ............... common/flow.py `pair_noise`
    time-blind network .................................. common/dit.py TinyDiT(time_cond=False)
    {with t, time-blind} x {independent, OT} ............ `train_fm`, `grid_experiment`
    the gap by resolution, off / on a fixed subspace .... `gap_study`

Convention (common/flow.py): t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, target u = eps - x.
    The paper puts noise at t = 0: t_ours = 1 - t_theirs, v_ours = -v_theirs.

Decomposition*: for any time-blind f, E||f(x_t) - u||^2 = E||u - E[u|x_t,t]||^2 (coupling variance)
    + E||E[u|x_t,t] - E[u|x_t]||^2 (gap) + E||f(x_t) - E[u|x_t]||^2 (approximation). For Gaussian
    data, along an eigendirection of variance lam: E[u|x_t,t] = a(t) x_t, a = (t - (1 - t) lam) / s,
    s = (1 - t)^2 lam + t^2, Var(u|x_t,t) = lam / s, so the coupling variance is (pi / 2) sum sqrt(lam);
    E[u|x_t] = E[a(t) | x_t] x_t needs the posterior over t, a one-dimensional integral.

Estimator* (our t): U the data's top-k principal directions plus its mean, c its energy per dimension
    outside U; q = ||(I - U U^T) x_t||^2 / (d - k) ~= t^2 + c (1 - t)^2, so
    t_hat = (c + sqrt(max(0, (1 + c) q - c))) / (1 + c), with RMSE ~ t / sqrt(2 (d - k)).

Run
    python time_blind_fm.py                    # cpu preset: 349 s on 2 CPU cores (25 s with its nets cached)
    python time_blind_fm.py --preset gpu       # larger nets, GPU (not measured yet)
    python time_blind_fm.py --preset smoke     # seconds, what the tests run
    python time_blind_fm.py --dataset mnist    # real digits: the MNIST files (docs/running.md)
"""

# %% imports
import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import config, dit
from common import data as data_mod
from common.config import BaseConfig, UserError, cli, field, int_list, print_table, resolve_device, run_dir, save_json
from common.dit import SIZES, TinyDiT
from common.evaluator import get_evaluator
from common.flow import fm_loss, interpolate, loss_per_time_bin, pair_noise
from common.plot import grid as image_grid
from common.plot import plt, save_curves, save_image_panels
from common.sampler import euler
from common.stats import bootstrap_ci
from common.train import EMA, load_or_train, make_optimizer, optimizer_step

# %% config and presets


@dataclasses.dataclass
class Config(BaseConfig):
    dataset: str = field("shapes", "shapes (embedded) or mnist (IDX files in --data-root)", choices=("shapes", "mnist"))
    data_root: str = field("", "folder with the MNIST IDX files (docs/running.md)", shown="data/mnist")
    sizes: str = field("8,16,32", "image sizes (px) of the gap-by-resolution studies; the smallest is the one "
                                  "the upsampled images are drawn at")
    grid_size: int = field(16, "image size of the 2 x 2 training grid")
    k: int = field(8, "strong directions of the Gaussian data the decomposition is computed on")
    decomp_d: str = field("256,1024,4096,16384,65536", "dimensions d of the exact decomposition (>= 2 decades)")
    n_mc: int = field(20000, "draws of the Monte Carlo check of the exact decomposition (at the smallest d)")
    model: str = field("xs", "TinyDiT size of the velocity nets (xs: twelve nets fit a 10-minute CPU run)",
                       choices=tuple(SIZES))
    steps: int = field(1200, "optimizer steps per net (all nets get the same steps and seeds)")
    batch: int = field(48, "images per step at every size (every net sees the same number of images); "
                           "the OT minibatch")
    lr: float = field(2e-3, "AdamW learning rate (2e-3 trained the base model best on a CPU budget)")
    n_train: int = field(10000, "training images per size")
    n_bank: int = field(2048, "held-out (x, eps, t) draws every net is scored on")
    n_samples: int = field(512, "samples per net of the 2 x 2 grid for the evaluator FD")
    sample_steps: int = field(20, "Euler steps for samples (time-blind nets use the same t grid)")
    eval_steps: int = field(300, "evaluator training steps (shared with common.pretrain's cache)")

    def validate(self):
        sizes = int_list(self.sizes, "--sizes", 8)
        for size in [*sizes, self.grid_size]:
            if size < 8 or size % 4:
                raise UserError(f"image sizes must be >= 8 and divisible by 4 (patch 4), got {size}")
        if min(int_list(self.decomp_d, "--decomp-d")) <= 2 * self.k:
            raise UserError(f"--decomp-d values must exceed 2 k = {2 * self.k} (a low-dimensional subspace)")


PRESETS = {
    "smoke": dict(sizes="8,16", grid_size=8, decomp_d="64,256,1024", n_mc=2000, model="xs", steps=8, batch=16,
                  n_train=256, n_bank=64, n_samples=32, sample_steps=3, eval_steps=20),
    "cpu": dict(),
    "gpu": dict(model="m", steps=4000, batch=256, n_train=50000, n_bank=8192, n_samples=4096, sample_steps=50,
                eval_steps=600),
}
SETTINGS = ("cond_indep", "blind_indep", "cond_ot", "blind_ot")  # {time} x {coupling}
COUPLING = {"indep": "independent", "ot": "ot"}  # setting suffix -> common.flow.pair_noise name
FLOOR = 0.01  # variance of the Gaussian data in every direction outside the k strong ones
ENERGY = 0.99  # images: k = the principal directions holding this share of the smallest size's variance
D64 = torch.float64

# %% the method, part 1: the decomposition, exactly, on Gaussian data


def path_var(t, lam):
    """Var(x_t) along an eigendirection of data variance lam, given t: s(t) = (1 - t)^2 lam + t^2."""
    return (1 - t) ** 2 * lam + t ** 2


def cond_mean_coef(t, lam):
    """E[u | x_t, t] = a(t) x_t along the direction: a = Cov(u, x_t) / Var(x_t) (u, x_t jointly Gaussian).
    Its residual variance is (1 + lam) - a^2 s = lam / s, whose integral over t is (pi / 2) sqrt(lam)."""
    return (t - (1 - t) * lam) / path_var(t, lam)


def posterior_nodes(lam, mult, per_width: float = 5.0, lo: float = 1e-6):
    """Nodes and weights for integrals over t in (0, 1), evenly spaced in units of the posterior's width:
    uniform in phi(t) = int sqrt(I), I = 2 sum mult a(t)^2 the Fisher information of x_t about t (ds/dt = 2 a s).
    The posterior narrows like 1 / sqrt(d - k); this grid keeps ~per_width nodes per width at every d."""
    info = lambda t: 2 * (mult * cond_mean_coef(t[:, None], lam) ** 2).sum(1)  # noqa: E731
    ref = torch.logspace(math.log10(lo), 0, 20001, dtype=D64)
    root = info(ref).sqrt()
    phi = torch.cat([ref.new_zeros(1), torch.cumsum((root[1:] + root[:-1]) / 2 * ref.diff(), 0)])
    nodes = np.linspace(0, phi[-1].item(), int(per_width * phi[-1]) + 512)
    t = torch.tensor(np.interp(nodes, phi.numpy(), ref.numpy()), dtype=D64)
    w = (nodes[1] - nodes[0]) / info(t).sqrt()  # trapezoid in phi: dt = dphi / sqrt(I)
    w[[0, -1]] /= 2
    return t, w


def blind_coef(Q, lam, mult, nodes):
    """E[a(t) | x_t] for each group of directions, from Q (..., G) = ||x_t||^2 within each group (the
    sufficient statistics of Gaussian x_t). t ~ U(0, 1) a priori; log p(x_t | t) = sum -mult/2 log s - Q / 2s."""
    t, w = nodes
    s = path_var(t[:, None], lam)  # (P, G)
    log_post = w.log() - (mult / 2 * s.log()).sum(1) - Q @ (0.5 / s).T  # (..., P)
    return torch.softmax(log_post, -1) @ cond_mean_coef(t[:, None], lam)  # (..., G)


def chi2_nodes(m: int, n: int):
    """Gauss quadrature for E f(G), G ~ chi^2 with m degrees of freedom (Golub-Welsch on the generalised
    Laguerre weight x^(m/2 - 1) e^-x, G = 2x). -> nodes (n,), weights (n,) summing to 1."""
    alpha, i = m / 2 - 1, np.arange(n)
    off = np.sqrt(i[1:] * (i[1:] + alpha))
    x, V = np.linalg.eigh(np.diag(2 * i + alpha + 1.0) + np.diag(off, 1) + np.diag(off, -1))
    return torch.tensor(2 * x, dtype=D64), torch.tensor(V[0] ** 2, dtype=D64)


def outer_nodes(panels: int = 24, n: int = 8, lo: float = 1e-6):
    """Gauss-Legendre on panels of (0, 1) that shrink geometrically towards both ends, where a(t) turns
    fastest (near the data for the weak directions, near the noise for the strong ones)."""
    x, w = np.polynomial.legendre.leggauss(n)
    half = np.geomspace(lo, 0.5, panels // 2)
    edges = np.concatenate([[0], half, 1 - half[::-1][1:], [1]])
    lo_, hi_ = edges[:-1, None], edges[1:, None]
    return torch.tensor(((lo_ + hi_) / 2 + (hi_ - lo_) / 2 * x).ravel()), torch.tensor(((hi_ - lo_) / 2 * w).ravel())


def decomposition(d: int, k: int, spike: float, floor: float = FLOOR, n_q: int = 8) -> dict:
    """Coupling variance and gap per dimension, exactly, for the independent coupling on Gaussian data with
    k directions of variance spike + floor and d - k of variance floor (t ~ U(0, 1)). Also the gap left by
    the estimator: the with-t target evaluated at t_hat(x_t) instead of E[a(t) | x_t] (an upper bound)."""
    lam, mult = torch.tensor([spike + floor, floor], dtype=D64), torch.tensor([k, d - k], dtype=D64)  # (2,) groups
    cv = math.pi / 2 * (mult * lam.sqrt()).sum().item()  # int_0^1 sum lam / s(t) dt, in closed form
    t, wt = outer_nodes()
    nodes = posterior_nodes(lam, mult)
    (gs, ws), (gf, wf) = chi2_nodes(k, n_q), chi2_nodes(d - k, n_q)
    G, WG = torch.cartesian_prod(gs, gf), torch.outer(ws, wf).flatten()  # (n_q^2, 2): Q_g / s_g(t) ~ chi^2
    gap = plug = 0.0
    for i in range(0, len(t), 16):  # chunks of true t: (T, n_q^2, P) posteriors at a time
        tc = t[i:i + 16, None]
        Q = path_var(tc, lam)[:, None] * G  # (T, n_q^2, 2): ||x_t||^2 in each group
        a = cond_mean_coef(tc, lam)[:, None]  # (T, 1, 2): the with-t coefficients
        a_hat = cond_mean_coef(t_from_energy(Q[..., 1:] / (d - k), floor), lam)  # (T, n_q^2, 2): plug-in
        gap += wt[i:i + 16] @ (((a - blind_coef(Q, lam, mult, nodes)) ** 2 * Q).sum(-1) @ WG)
        plug += wt[i:i + 16] @ (((a - a_hat) ** 2 * Q).sum(-1) @ WG)
    return dict(d=d, k=k, coupling_variance=cv / d, gap=float(gap) / d, gap_plugin=float(plug) / d,
                ratio=float(gap) / cv)


def spiked_data(n: int, d: int, k: int, g, floor: float = FLOOR, spike: float | None = None):
    """Gaussian data: a random k-dim subspace U (d, k) of variance `spike` per direction (default d / k: about
    1 per dimension on average, like images) plus variance `floor` in every direction. -> (x (n, d), U)."""
    U, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=D64))
    z = torch.randn(n, k, generator=g, dtype=D64) * math.sqrt(d / k if spike is None else spike)
    return z @ U.T + math.sqrt(floor) * torch.randn(n, d, generator=g, dtype=D64), U


def decomposition_mc(d: int, k: int, spike: float, n: int, seed: int, floor: float = FLOOR) -> dict:
    """The sampled twin of `decomposition`: draw (x, eps, t) in R^d and average ||u - E[u|x_t,t]||^2 and
    ||E[u|x_t,t] - E[u|x_t]||^2 per dimension, with 95% bootstrap intervals."""
    g = torch.Generator().manual_seed(seed)
    x, U = spiked_data(n, d, k, g, floor, spike)
    eps, t = torch.randn(n, d, generator=g, dtype=D64), torch.rand(n, generator=g, dtype=D64)
    xt, u = interpolate(x, eps, t), eps - x  # (n, d)
    inside = xt @ U @ U.T  # the part of x_t in the strong directions
    parts = torch.stack([inside, xt - inside], 1)  # (n, 2, d)
    lam, mult = torch.tensor([spike + floor, floor], dtype=D64), torch.tensor([k, d - k], dtype=D64)
    with_t = (cond_mean_coef(t[:, None], lam)[..., None] * parts).sum(1)  # E[u | x_t, t]  (n, d)
    blind = (blind_coef(parts.pow(2).sum(2), lam, mult, posterior_nodes(lam, mult))[..., None] * parts).sum(1)
    out = {}
    for name, per in (("coupling_variance", u - with_t), ("gap", with_t - blind)):
        v = per.pow(2).mean(1)
        out[name], out[name + "_ci"] = v.mean().item(), bootstrap_ci(v, 1000, seed)
    return out


# %% the method, part 2: t read off a single x_t


def principal_directions(x: torch.Tensor) -> torch.Tensor:
    """x: (n, d) -> (min(n, d), d), the rows ordered by variance explained (PCA of centred x)."""
    return torch.linalg.svd(x - x.mean(0), full_matrices=False)[2]


def off_subspace(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(I - U U^T) x: the part of each row of x (n, d) outside the span of basis (d, k')."""
    return x - (x @ basis) @ basis.T


def fit_subspace(x: torch.Tensor, k: int, directions: torch.Tensor | None = None):
    """x: (n, d) samples of the data -> (basis (d, k'), c): the top-k principal directions plus the mean
    direction (orthonormal, k' = k + 1: our data are not centred), and the data's mean energy per dimension
    outside them. `directions` (from principal_directions(x)) saves the SVD when it is already done."""
    Vh = principal_directions(x) if directions is None else directions
    basis, _ = torch.linalg.qr(torch.cat([Vh[:k].T, x.mean(0)[:, None]], 1))
    c = off_subspace(x, basis).pow(2).sum(1).mean().item() / (x.shape[1] - basis.shape[1])
    return basis, c


def t_from_energy(q, c: float):
    """Invert q = t^2 + c (1 - t)^2 on the branch t >= c / (1 + c): the root of (1 + c) t^2 - 2 c t + c - q."""
    return ((c + torch.sqrt(((1 + c) * q - c).clamp(min=0))) / (1 + c)).clamp(0, 1)


def estimate_t(xt: torch.Tensor, basis: torch.Tensor, c: float) -> torch.Tensor:
    """The closed-form estimator: xt (n, d) -> t_hat (n,) in [0, 1]."""
    q = off_subspace(xt, basis).pow(2).sum(1) / (xt.shape[1] - basis.shape[1])  # energy per outside dimension
    return t_from_energy(q, c)


# %% experiment: images off and on a fixed subspace


def load_images(cfg, size: int, split: str, n: int, upsampled: bool) -> torch.Tensor:
    """Native: drawn at `size`. Upsampled: drawn at the smallest size and upsampled bilinearly, so every
    size lies in the same fixed subspace (a linear image of the small images)."""
    base = min(int_list(cfg.sizes, "--sizes"))
    x = data_mod.load(cfg.dataset, n, base if upsampled else size, cfg.seed, split, cfg.data_root or None).images
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) if upsampled else x


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = torch.log(torch.tensor(xs, dtype=D64)), torch.log(torch.tensor(ys, dtype=D64))
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / lx.pow(2).sum())


def share(worse: float, better: float) -> float:
    """The gap's share of a loss: (L_worse - L_better) / L_worse (blind vs with t, or t_hat vs t)."""
    return (worse - better) / worse


def make_net(cfg, size: int, channels: int, time_cond: bool) -> TinyDiT:
    """Unconditional TinyDiT, patch 4 at every size (4, 16 or 64 tokens at 8, 16, 32 px)."""
    return TinyDiT(img_size=size, channels=channels, patch=4, n_classes=0, time_cond=time_cond, **SIZES[cfg.model])


def train_fm(cfg, x_train: torch.Tensor, time_cond: bool, coupling: str, device, data: str = "native") -> TinyDiT:
    """Plain flow matching; time_cond and coupling are the only differences between nets. Identical seeds:
    every net sees the same batches, noise and times in the same order, cfg.batch images per step."""
    size, C = x_train.shape[-1], x_train.shape[1]
    torch.manual_seed(cfg.seed)
    model = make_net(cfg, size, C, time_cond)
    key = dict(kind="time_blind_fm", data_version=data_mod.VERSION, model_version=dit.VERSION, dataset=cfg.dataset,
               data=data, size=size, model=cfg.model, patch=4, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr,
               n_train=cfg.n_train, seed=cfg.seed, time_cond=time_cond, coupling=coupling)

    def fit(model):
        model.to(device).train()
        g = torch.Generator().manual_seed(cfg.seed)
        opt, ema = make_optimizer(model, cfg.lr), EMA(model, 0.999)
        bar = tqdm(range(cfg.steps), desc=f"{'cond' if time_cond else 'blind'}/{coupling} {data} {size}px",
                   leave=False, mininterval=1.0)
        for _ in bar:
            x = x_train[torch.randint(0, len(x_train), (cfg.batch,), generator=g)]
            eps = pair_noise(x, torch.randn(x.shape, generator=g), coupling)  # the coupling switch
            t = torch.rand(cfg.batch, generator=g)
            x, eps, t = x.to(device), eps.to(device), t.to(device)
            loss = fm_loss(model(interpolate(x, eps, t), t), x, eps).mean()  # blind nets never read t
            optimizer_step(loss, model, opt, ema)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        ema.copy_to(model)

    load_or_train("time_blind_fm", key, model, fit)
    return model.to(device).eval()


def make_bank(x_test: torch.Tensor, n: int, seed: int):
    """One fixed held-out bank of (x, eps, t), shared by every net of a size."""
    g = torch.Generator().manual_seed(seed + 7)
    x = x_test[:n]
    return x, torch.randn(x.shape, generator=g), torch.rand(len(x), generator=g)


@torch.inference_mode()
def bank_loss(model, bank, coupling: str, batch: int, device, t_model=None):
    """Per-example held-out loss, each net under its own coupling (OT nets re-pair the bank's x and eps
    in minibatches of the training size). t_model, if given, is the time the net is told instead of the
    true t, which still builds x_t (the plug-in test)."""
    x_all, eps_all, t_all = bank
    t_in = t_all if t_model is None else t_model
    losses = []
    for i in range(0, len(x_all), batch):
        x, t, ti = x_all[i:i + batch], t_all[i:i + batch], t_in[i:i + batch]
        eps = pair_noise(x, eps_all[i:i + batch], coupling)
        x, eps, t, ti = x.to(device), eps.to(device), t.to(device), ti.to(device)
        losses.append(fm_loss(model(interpolate(x, eps, t), ti), x, eps).cpu())
    return torch.cat(losses)


def grid_experiment(cfg, train, test, device):
    """The four nets at one size, scored on one bank; the same noise for their samples."""
    loss, per_bin, samples = {}, {}, {}
    bank = make_bank(test, cfg.n_bank, cfg.seed)
    noise = torch.randn(cfg.n_samples, *train.shape[1:], generator=torch.Generator().manual_seed(cfg.seed + 11))
    for name in SETTINGS:
        time_cond, coupling = name.startswith("cond"), COUPLING[name.split("_")[1]]
        model = train_fm(cfg, train, time_cond, coupling, device)
        per_example = bank_loss(model, bank, coupling, cfg.batch, device)
        loss[name] = per_example.mean().item()
        per_bin[name] = loss_per_time_bin(bank[2], per_example, bins=10)
        samples[name] = euler(model, noise.to(device), cfg.sample_steps).cpu()  # blind nets ignore t
    return loss, per_bin, samples


def gap_study(cfg, upsampled: bool, k: int, device) -> dict:
    """Per size: the estimator's error, and the gap's share three ways. Learned: a with-t and a time-blind
    net (independent coupling). Plug-in: the with-t net told t_hat(x_t). Exact: `decomposition` on the
    Gaussian model the estimator assumes, fitted to the images (k directions of their mean variance, floor c)."""
    rows, geometry, g = {}, {}, torch.Generator().manual_seed(cfg.seed + 1)
    base = min(int_list(cfg.sizes, "--sizes"))
    data = f"upsampled from {base}px"
    for size in sorted(int_list(cfg.sizes, "--sizes")):
        train = load_images(cfg, size, "train", cfg.n_train, upsampled)
        test = load_images(cfg, size, "test", cfg.n_bank, upsampled)
        flat = train[:1500].flatten(1).double()  # the subspace needs far fewer images than d
        directions = principal_directions(flat)
        basis, c = fit_subspace(flat, k, directions)
        d, dmk = flat.shape[1], flat.shape[1] - basis.shape[1]
        t = 0.1 + 0.9 * torch.rand(len(test), generator=g, dtype=D64)  # t < 0.1: near the unidentifiable c/(1+c)
        x_t = interpolate(test.flatten(1).double(), torch.randn(len(test), d, generator=g, dtype=D64), t)
        rmse = (estimate_t(x_t, basis, c) - t).pow(2).mean().sqrt().item()
        bank = make_bank(test, cfg.n_bank, cfg.seed)
        tag = data if upsampled and size > base else "native"  # the smallest size is the same data either way
        cond = train_fm(cfg, train, True, "independent", device, tag)
        lc = bank_loss(cond, bank, "independent", 256, device).mean().item()
        lb = bank_loss(train_fm(cfg, train, False, "independent", device, tag), bank, "independent", 256,
                       device).mean().item()
        t_hat = estimate_t(interpolate(*bank).flatten(1).double(), basis, c).float()
        lp = bank_loss(cond, bank, "independent", 256, device, t_model=t_hat).mean().item()
        top = ((flat - flat.mean(0)) @ directions[:k].T).pow(2).mean().item()  # mean variance of the top k
        exact = decomposition(d, k, max(top - c, c), c)
        rows[str(size)] = dict(d=d, k=k, d_minus_k=dmk, noise_floor_c=c, rmse=rmse, rmse_sqrt_dmk=rmse * math.sqrt(dmk),
                               loss_cond=lc, loss_blind=lb, loss_cond_t_hat=lp,
                               gap_share_learned=share(lb, lc), gap_share_plugin=share(lp, lc),
                               gap_share_exact=exact["gap"] / (exact["gap"] + exact["coupling_variance"]),
                               images_seen=cfg.steps * cfg.batch)
        geometry[size] = (basis, c, test[:1])
    return rows, geometry


# %% the claims, each with the test that decides it (fixed before the run)


def claims(r: dict) -> list:
    """The paper's claims as tested here: the number, the test, and whether it passed."""
    ratio, sizes = r["decomposition"]["ratio"], sorted(r["upsampled"], key=int)
    learned = [r["upsampled"][s]["gap_share_learned"] for s in (sizes[0], sizes[-1])]
    falls = all(b < a for a, b in zip(ratio, ratio[1:])) and ratio[-1] < ratio[0] / 2
    entry = config.claim_entry  # (results, claim, paper, key of ours, criterion, ok, note)
    return [
        entry(r, "t can be read off one x_t with error O(1/sqrt(d - k)), on images the estimator was not "
                    "built from (drawn small, upsampled)", "slope -0.5", "estimator_slope_upsampled",
                    "-0.6 <= slope <= -0.4", lambda v: -0.6 <= v <= -0.4, "log-log slope of RMSE against d - k"),
        entry(r, "the time-blindness gap is negligible next to the coupling variance as d grows (exact, "
                    "Gaussian data)", "-> 0 as d grows", f"decomposition.ratio.{len(ratio) - 1}",
                    "gap / coupling variance falls at every d, and ends below half its value at the smallest d",
                    falls, f"k = {r['decomposition']['k'][0]}, floor {FLOOR}, d = {r['decomposition']['d']}"),
        entry(r, "the learned nets' gap shrinks with d where the data lie in a fixed subspace",
                    "-> 0 as d grows", f"upsampled.{sizes[-1]}.gap_share_learned",
                    f"learned gap share at {sizes[-1]} px < half of that at {sizes[0]} px (none there: untestable)",
                    None if learned[0] <= 0 else learned[1] < learned[0] / 2,
                    "(L_blind - L_cond) / L_blind; equal images seen per size"),
        entry(r, "the coupling moves the held-out loss more than the clock", "coupling effect > time effect",
                    "coupling_over_time", "coupling_over_time > 1", lambda v: v > 1,
                    f"{r['grid_size']} px, 2 x 2 grid of nets with identical seeds"),
        entry(r, "the coupling matters more than the clock for sample quality", "OT helps more than t",
                    "fd_coupling_effect", "fd_coupling_effect > fd_time_effect",
                    r["fd_coupling_effect"] > r["fd_time_effect"], "evaluator FD (FID stand-in)"),
    ]


# %% figures

NAMES = {"cond_indep": "with t, independent", "blind_indep": "time-blind, independent",
         "cond_ot": "with t, minibatch OT", "blind_ot": "time-blind, minibatch OT"}


def fig_method(out, geometry, decomp, seed):
    """x_t of one image at several t with the estimator's reading; the energy outside the data subspace
    against t; the two terms of the decomposition against d."""
    basis, c, x = geometry
    ts = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    eps = torch.randn(len(ts), *x.shape[1:], generator=torch.Generator().manual_seed(seed))
    xt = interpolate(x.expand(len(ts), -1, -1, -1), eps, ts)
    t_hat = estimate_t(xt.flatten(1).double(), basis, c)
    fig = plt.figure(figsize=(11, 6))
    spec = fig.add_gridspec(2, 6, height_ratios=[1, 1.5])
    for i in range(len(ts)):
        ax = fig.add_subplot(spec[0, i])
        ax.imshow(image_grid(xt[i:i + 1], 1, pad=0).numpy(), interpolation="nearest")
        ax.set_title(f"t = {ts[i]:.1f}\nread off x_t: {t_hat[i]:.2f}", fontsize=10)
        ax.axis("off")
    ax = fig.add_subplot(spec[1, :3])
    many = torch.linspace(0, 1, 201)
    e = torch.randn(len(many), *x.shape[1:], generator=torch.Generator().manual_seed(seed + 1))
    q = off_subspace(interpolate(x.expand(len(many), -1, -1, -1), e, many).flatten(1).double(), basis).pow(2)
    ax.plot(many, q.sum(1) / (q.shape[1] - basis.shape[1]), ".", ms=3, alpha=0.5, label="one image, fresh noise")
    ax.plot(many, many ** 2 + c * (1 - many) ** 2, "k-", lw=1, label="t² + c (1 − t)²: the estimator inverts it")
    q6 = off_subspace(xt.flatten(1).double(), basis).pow(2).sum(1) / (q.shape[1] - basis.shape[1])
    ax.plot(ts, q6, "o", ms=8, mfc="none", mec="C3", mew=2, label="the six images above")
    ax.set(xlabel="t (0 data, 1 noise)", ylabel="energy per dimension outside\nthe data subspace",
           title=f"{x.shape[-1]} px image, d − k = {xt[0].numel() - basis.shape[1]}")
    ax.legend(fontsize=9)
    ax = fig.add_subplot(spec[1, 3:])
    ax.loglog(decomp["d"], decomp["coupling_variance"], "o-", label="coupling variance (paid with t too)")
    ax.loglog(decomp["d"], decomp["gap"], "s-", label="time-blindness gap")
    ax.set(xlabel="dimension d", ylabel="per dimension", title=f"Gaussian data, k = {decomp['k'][0]} strong directions")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig_method.png", dpi=110)
    plt.close(fig)


def figures(out, r, per_bin, samples, geometry):
    dec = r["decomposition"]
    fig_method(out, geometry, dec, r["seed"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(dec["d"], dec["ratio"], "o-", label="exact gap / coupling variance")
    ax.loglog(dec["d"], [p / v for p, v in zip(dec["gap_plugin"], dec["coupling_variance"])], "s--",
              label="the same with t read off x_t (plug-in bound)")
    mc = dec["mc"]
    ax.errorbar([mc["d"]], [mc["gap"] / mc["coupling_variance"]], fmt="k^", ms=7, capsize=3,
                yerr=[[(mc["gap"] - mc["gap_ci"][0]) / mc["coupling_variance"]],
                      [(mc["gap_ci"][1] - mc["gap"]) / mc["coupling_variance"]]], label="Monte Carlo, 95% interval")
    dmk = [d - k for d, k in zip(dec["d"], dec["k"])]
    ax.loglog(dec["d"], [dec["ratio"][-1] * math.sqrt(dmk[-1] / v) for v in dmk], "k:",
              label="∝ 1/√(d − k), the estimator's rate")
    ax.set(xlabel="dimension d", ylabel="gap / coupling variance", title="the time-blindness gap, exactly")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fig_decomposition.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, fam, title in zip(axes, ("native", "upsampled"), ("drawn at each size", "drawn small, upsampled")):
        rows = r[fam]
        sizes = sorted(rows, key=int)
        for key, label in (("learned", "learned nets"), ("plugin", "with-t net told t read off x_t"),
                           ("exact", "exact, Gaussian model of the images")):
            ax.plot([int(s) for s in sizes], [100 * rows[s][f"gap_share_{key}"] for s in sizes], "o-", label=label)
        ax.set_xscale("log")
        ax.set_xticks([int(s) for s in sizes], sizes)
        ax.minorticks_off()
        ax.set(xlabel="image side (px)", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("time-blindness gap, % of the loss")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fig_gap_by_resolution.png", dpi=120)
    plt.close(fig)
    curves = {label: ([v["d_minus_k"] for v in r[fam].values()], [v["rmse"] for v in r[fam].values()])
              for fam, label in (("native", "images drawn at each size"), ("upsampled", "drawn small, upsampled"))}
    dmk = sorted({x for xs, _ in curves.values() for x in xs})
    curves["theory 0.43 / √(d − k)"] = (dmk, [0.43 / math.sqrt(x) for x in dmk])
    save_curves(curves, out / "fig_estimator_rmse.png", "d − k (dimensions outside the subspace)",
                "RMSE of t read off x_t", f"k = {r['k_images']} principal directions and the mean",
                logx=True, logy=True)
    save_image_panels([(NAMES[n], samples[n][:36]) for n in SETTINGS], out / "fig_samples_grid.png", nrow=6,
                      title="the same noise through four nets")
    save_curves({NAMES[n]: per_bin[n] for n in SETTINGS}, out / "fig_loss_per_time.png", "t (0 data, 1 noise)",
                "held-out flow-matching loss", "loss per time bin")


# %% run


def images_k(cfg) -> int:
    """k for images: the principal directions holding ENERGY of the variance at the smallest size."""
    base = min(int_list(cfg.sizes, "--sizes"))
    flat = load_images(cfg, base, "train", 1500, False).flatten(1).double()
    ev = torch.linalg.svdvals(flat - flat.mean(0)) ** 2
    return min(int((ev.cumsum(0) / ev.sum() < ENERGY).sum()) + 1, flat.shape[1] // 4)


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = run_dir(cfg, "time_blind_fm")
    ds = int_list(cfg.decomp_d, "--decomp-d")
    rows = [decomposition(d, cfg.k, d / cfg.k) for d in tqdm(ds, desc="exact decomposition", leave=False)]
    decomp = {key: [row[key] for row in rows] for key in rows[0]}
    decomp["ratio_slope"] = loglog_slope([d - cfg.k for d in ds], decomp["ratio"])
    mc = decomposition_mc(ds[0], cfg.k, ds[0] / cfg.k, cfg.n_mc, cfg.seed)
    decomp["mc"] = dict(d=ds[0], n=cfg.n_mc, **mc, inside=all(
        lo <= rows[0][key] <= hi for key, (lo, hi) in ((k, mc[k + "_ci"]) for k in ("coupling_variance", "gap"))))

    train = load_images(cfg, cfg.grid_size, "train", cfg.n_train, False)
    test = load_images(cfg, cfg.grid_size, "test", max(cfg.n_bank, cfg.n_samples), False)
    loss, per_bin, samples = grid_experiment(cfg, train, test, device)
    k = images_k(cfg)
    native, _ = gap_study(cfg, False, k, device)
    upsampled, geometry = gap_study(cfg, True, k, device)
    evaluator, _ = get_evaluator(cfg.dataset, cfg.grid_size, device, cfg.eval_steps, cfg.seed, cfg.data_root or None)
    fd = {n: evaluator.fd(samples[n], test[:cfg.n_samples]) for n in SETTINGS}
    confident = {n: evaluator.logits(samples[n]).softmax(1).amax(1).gt(0.9).float().mean().item() for n in SETTINGS}
    # each effect averaged over the other factor's two levels
    effect = lambda m, a, b, c, e: (abs(m[a] - m[b]) + abs(m[c] - m[e])) / 2  # noqa: E731
    slope = {fam: loglog_slope([v["d_minus_k"] for v in rows.values()], [v["rmse"] for v in rows.values()])
             if len(rows) > 1 else None for fam, rows in (("native", native), ("upsampled", upsampled))}
    results = dict(
        decomposition=decomp, upsampled=upsampled, native=native, k_images=k,
        estimator_slope_upsampled=slope["upsampled"], estimator_slope_native=slope["native"],
        loss=loss, fd=fd, recognisable=confident, grid_size=cfg.grid_size, seed=cfg.seed,
        coupling_effect=effect(loss, "cond_indep", "cond_ot", "blind_indep", "blind_ot"),
        time_effect=effect(loss, "blind_indep", "cond_indep", "blind_ot", "cond_ot"),
        fd_coupling_effect=effect(fd, "cond_indep", "cond_ot", "blind_indep", "blind_ot"),
        fd_time_effect=effect(fd, "blind_indep", "cond_indep", "blind_ot", "cond_ot"),
        metric_note="fd: evaluator Frechet distance (FID stand-in); recognisable: share of samples the evaluator "
                    "classifies with p > 0.9 (the nets are unconditional, so there is no target class)",
        device=str(device))
    results["coupling_over_time"] = results["coupling_effect"] / results["time_effect"]
    results["claims"] = claims(results)
    figures(out, results, per_bin, samples, geometry[max(geometry)])
    results["seconds"] = round(time.perf_counter() - t0, 1)
    save_json(out / "results.json", results)  # last: a folder holds results.json only when the run finished
    print_table([(NAMES[n], loss[n], fd[n], confident[n]) for n in SETTINGS],
                ("net", "held-out loss", "eval FD", "recognisable"))
    print()
    print_table([(f"d = {d}", v, g, g / v) for d, v, g in zip(ds, decomp["coupling_variance"], decomp["gap"])],
                ("Gaussian data", "coupling variance", "gap", "gap / coupling variance"))
    print()
    print_table([(f"{fam} {s} px", v["rmse"], v["gap_share_learned"], v["gap_share_plugin"], v["gap_share_exact"])
                 for fam, rows in (("native", native), ("upsampled", upsampled)) for s, v in rows.items()],
                ("images", "t_hat RMSE", "gap share learned", "plug-in", "exact (Gaussian model)"))
    print()
    print_table([(c["claim"][:60], c["ours"], c["reproduced"]) for c in results["claims"]],
                ("claim", "ours", "reproduced"))
    print(f"{results['seconds']} s; wrote {out}/results.json and figures")
    return results


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python time_blind_fm.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
