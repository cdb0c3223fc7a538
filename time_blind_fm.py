"""What Time Is It? How Data Geometry Makes Time Conditioning Optional for Flow Matching.
Helbling, Gutierrez Hernandez, Hoover, Chau, Ram (2026), arXiv 2605.08344.

Claim reproduced
    A time-blind velocity net (no t input) pays two irreducible errors: the coupling variance
    (ambiguous targets from how noise and data are paired; paid even with t) and the
    time-blindness gap (from not knowing t). When data lie near a k-dimensional subspace of R^d,
    t can be read off a single x_t from its energy outside that subspace, with error
    O(1/sqrt(d - k)); so the gap is small next to the coupling variance, and changing the
    coupling (independent -> minibatch OT) matters more than removing t.

Paper -> code
    loss decomposition (law of total variance) ...... docstring of `grid_experiment`
    closed-form estimator t_hat(x_t) ................ `fit_subspace`, `estimate_t`
    rate O(1/sqrt(d - k)) ........................... `synthetic_sweep`, `image_sweep`
    couplings: independent / minibatch OT ........... common/flow.py `pair_noise`
    time-blind network .............................. common/dit.py TinyDiT(time_cond=False)
    {with t, time-blind} x {independent, OT} ........ `train_fm`, `grid_experiment`

Conventions (common/flow.py): t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, target eps - x.
    The paper puts noise at t = 0: t_ours = 1 - t_theirs, v_ours = -v_theirs. Its estimator,
    written in our t, is the one below; its "t near 1 is easy" becomes "t near 0 is hard" here.

Estimator (reconstructed from the paper's statement; checked numerically on synthetic data).
    Let U be the data's top-k principal directions, P = I - U U^T, c the mean residual energy of
    the data per dimension outside U. Then
        q = ||P x_t||^2 / (d - k) ~= t^2 + c (1 - t)^2
        t_hat = (c + sqrt(max(0, (1 + c) q - c))) / (1 + c)       (t_hat = sqrt(q) if c = 0)
    with RMSE ~ t / sqrt(2 (d - k)). Deviation: our data are not centred, so the mean direction
    is added to U (it is projected out with the principal directions; k counts it).

Deviations from the paper. Toy data (procedural shapes at 8-32 px, MNIST when present) instead
    of CIFAR-10 / CelebA-HQ / FFHQ; a 2-layer TinyDiT-xs trained for a minute each; unconditional nets;
    the evaluator FD (common/evaluator.py) stands in for FID. The gap by resolution uses patch 4
    at every size and a constant token budget per step (`batch_for`), so each size costs about the
    same. (A first version kept 16 tokens with patch 8 at 32 px: each token then had to emit 192
    values from a 64-wide feature, both nets stalled at loss 0.80, and the tiny gap share there
    was an artefact of the huge loss. Check `gap_by_resolution` losses before trusting a share.)

Run
    python time_blind_fm.py                    # cpu preset: 396 s on 2 CPU cores (24 s with its nets cached)
    python time_blind_fm.py --preset gpu       # larger models, GPU (not measured yet)
    python time_blind_fm.py --preset smoke     # seconds, what the tests run
    python time_blind_fm.py --dataset mnist    # real digits: the IDX files in data/mnist (README)
"""

# %% imports
import dataclasses
import math
import time

import torch
from tqdm import tqdm

from common import data as data_mod
from common import dit
from common.config import BaseConfig, UserError, cli, field, int_list, print_table, resolve_device, run_dir, save_json
from common.dit import SIZES, TinyDiT
from common.evaluator import get_evaluator
from common.flow import fm_loss, interpolate, loss_per_time_bin, pair_noise
from common.plot import plt, save_curves, save_image_panels
from common.sampler import euler
from common.train import EMA, load_or_train, make_optimizer, optimizer_step

# %% config and presets


@dataclasses.dataclass
class Config(BaseConfig):
    dataset: str = field("shapes", "shapes (embedded) or mnist (IDX files in --data-root)", choices=("shapes", "mnist"))
    data_root: str = field("", "folder with the MNIST IDX files (README: how to get them)", shown="data/mnist")
    sizes: str = field("8,16,32", "image sizes (px) for the estimator on images and the gap by resolution")
    grid_size: int = field(16, "image size of the 2 x 2 training grid")
    ks: str = field("8,24,64", "principal directions fitted to images; the last is the headline (fewer leave "
                                "more energy outside the subspace, a higher floor c)")
    synth_ks: str = field("8,32", "subspace dimensions k of the synthetic spiked-covariance data")
    synth_dmk: str = field("56,120,248,504,1016,2040,3008", "values of d - k for the synthetic sweep")
    model: str = field("xs", "TinyDiT size of the velocity nets (xs: 8 nets fit a 10-minute CPU run)",
                       choices=tuple(SIZES))
    steps: int = field(1200, "optimizer steps per model (all models get the same steps and seeds)")
    batch: int = field(128, "batch size at 16 px (other sizes keep batch x tokens fixed); the OT minibatch")
    lr: float = field(2e-3, "AdamW learning rate (2e-3 trained the base model best on a CPU budget)")
    n_train: int = field(10000, "training images per size")
    n_bank: int = field(2048, "held-out (x, eps, t) draws every model is scored on")
    n_samples: int = field(512, "samples per model for the evaluator FD")
    sample_steps: int = field(20, "Euler steps for samples (time-blind models use the same t grid)")
    eval_steps: int = field(300, "evaluator training steps (shared with common.pretrain's cache)")

    def validate(self):
        for size in [*int_list(self.sizes, "--sizes", 8), self.grid_size]:
            if size < 8 or size % 4:
                raise UserError(f"image sizes must be >= 8 and divisible by 4 (a 4 x 4 token grid), got {size}")
        channels = 1 if self.dataset == "mnist" else 3
        d_max = channels * max(int_list(self.sizes, "--sizes", 8)) ** 2
        if max(int_list(self.ks, "--ks")) + 1 >= d_max // 2:
            raise UserError(f"--ks values must satisfy k + 1 < d / 2 = {d_max // 2} at the largest size (a "
                            f"low-dimensional subspace), got {self.ks}")
        int_list(self.synth_dmk, "--synth-dmk", 2)
        int_list(self.synth_ks, "--synth-ks")


PRESETS = {
    "smoke": dict(sizes="8,16", grid_size=8, ks="8,24", synth_dmk="56,248", model="xs", steps=8, batch=16,
                  n_train=256, n_bank=64, n_samples=32, sample_steps=3, eval_steps=20),
    "cpu": dict(),
    "gpu": dict(model="m", steps=4000, batch=256, n_train=50000, n_bank=8192, n_samples=4096, sample_steps=50,
                eval_steps=600),
}
SETTINGS = ("cond_indep", "blind_indep", "cond_ot", "blind_ot")  # {time} x {coupling}
COUPLING = {"indep": "independent", "ot": "ot"}  # setting suffix -> common.flow.pair_noise name

# %% part 1: time can be read off a single x_t


def principal_directions(x: torch.Tensor) -> torch.Tensor:
    """x: (n, d) -> (min(n, d), d), the rows ordered by variance explained (PCA of centred x)."""
    return torch.linalg.svd(x - x.mean(0), full_matrices=False)[2]


def off_subspace(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """P x = x - U U^T x: the part of each row of x (n, d) outside the span of basis (d, k')."""
    return x - (x @ basis) @ basis.T


def fit_subspace(x: torch.Tensor, k: int, directions: torch.Tensor | None = None):
    """x: (n, d) samples of the data. -> (basis (d, k'), c): the top principal directions plus the
    mean direction (orthonormal, k' <= k + 1), and the data's mean energy per dimension outside them.
    `directions` (from principal_directions(x)) saves the SVD when several k are fitted."""
    mean = x.mean(0)
    Vh = principal_directions(x) if directions is None else directions
    basis, _ = torch.linalg.qr(torch.cat([Vh[:k].T, mean[:, None]], 1))  # add the mean direction
    c = off_subspace(x, basis).pow(2).sum(1).mean().item() / (x.shape[1] - basis.shape[1])
    return basis, c


def estimate_t(xt: torch.Tensor, basis: torch.Tensor, c: float) -> torch.Tensor:
    """The closed-form estimator: xt (n, d) -> t_hat (n,) in [0, 1]."""
    d, k = xt.shape[1], basis.shape[1]
    q = off_subspace(xt, basis).pow(2).sum(1) / (d - k)  # energy per off-subspace dimension
    t_hat = (c + torch.sqrt(((1 + c) * q - c).clamp(min=0))) / (1 + c)  # root of (1+c)t^2 - 2ct + c - q
    return t_hat.clamp(0, 1)


def estimator_rmse(x_fit, x_test, k, g, t_min=0.1, directions=None):
    """RMSE of t_hat over t ~ U(t_min, 1) on held-out data (t < t_min sits near the point
    t = c / (1 + c) where q is flat in t, so t is not identifiable there). -> (rmse, d - k, t, t_hat, c)."""
    basis, c = fit_subspace(x_fit, k, directions)
    t = t_min + (1 - t_min) * torch.rand(len(x_test), generator=g, dtype=x_test.dtype)
    eps = torch.randn(x_test.shape, generator=g, dtype=x_test.dtype)
    t_hat = estimate_t(interpolate(x_test, eps, t), basis, c)
    return (t_hat - t).pow(2).mean().sqrt().item(), x_fit.shape[1] - basis.shape[1], t, t_hat, c


def spiked_data(n, d, k, g, floor=0.01):
    """Spiked covariance: a random k-dim subspace carrying the signal (average per-dimension
    variance about 1, like images) plus an isotropic floor of variance `floor` everywhere."""
    U, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    spikes = (d / k) * torch.linspace(0.5, 1.5, k, dtype=torch.float64)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * spikes.sqrt()
    return z @ U.T + math.sqrt(floor) * torch.randn(n, d, generator=g, dtype=torch.float64)


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log y against log x (theory: -0.5)."""
    lx, ly = torch.log(torch.tensor(xs, dtype=torch.float64)), torch.log(torch.tensor(ys, dtype=torch.float64))
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / lx.pow(2).sum())


def synthetic_sweep(cfg):
    """RMSE over a grid of (d, k). Theory: it depends on d - k alone, like 0.43 / sqrt(d - k)."""
    g = torch.Generator().manual_seed(cfg.seed)
    grid = [(k, dmk) for k in int_list(cfg.synth_ks, "--synth-ks") for dmk in int_list(cfg.synth_dmk, "--synth-dmk")]
    rows = []
    for k, dmk in tqdm(grid, desc="estimator (synthetic)", leave=False):
        # d is chosen so that d - k' = dmk, where k' = k + 1 counts the added mean direction
        x = spiked_data(2000, dmk + k + 1, k, g)
        rmse, dmk_eff, *_ = estimator_rmse(x[:1000], x[1000:], k, g)  # fit on 1,000, test on 1,000
        rows.append(dict(k=k, d=dmk + k + 1, d_minus_k=dmk_eff, rmse=rmse, rmse_sqrt_dmk=rmse * math.sqrt(dmk_eff)))
    return rows


def image_sweep(cfg, images_by_size):
    """RMSE of t_hat on held-out images, for every k and size. -> ({k: rows}, scatter data)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    ks = int_list(cfg.ks, "--ks")
    by_k, scatter = {k: [] for k in ks}, None
    for size, x in images_by_size.items():
        flat = x[:4000].flatten(1).double()  # 4,000 images are plenty for a PCA with k <= 64
        half = len(flat) // 2  # fit the subspace on one half, estimate t on the other
        directions = principal_directions(flat[:half])  # one SVD per size, shared by every k
        for k in ks:
            if k + 1 >= flat.shape[1] // 2:
                continue  # the subspace would not be "low-dimensional" at this size
            rmse, dmk, t, t_hat, c = estimator_rmse(flat[:half], flat[half:], k, g, directions=directions)
            by_k[k].append(dict(size=size, d=flat.shape[1], d_minus_k=dmk, rmse=rmse,
                                rmse_sqrt_dmk=rmse * math.sqrt(dmk), noise_floor_c=c))
            scatter = (size, k, t, t_hat)  # plotted: the largest size at the largest k that fits
    if scatter is None:
        raise UserError(f"every --ks value is too large for --sizes {cfg.sizes}: k + 1 must be below d / 2")
    return by_k, scatter


# %% part 2: coupling vs clock -- the 2 x 2 grid


PATCH = 4  # at every size: each token emits 4*4*3 = 48 values, below the net's width (no bottleneck)


def make_net(cfg, size: int, channels: int, time_cond: bool) -> TinyDiT:
    """Unconditional TinyDiT, patch 4 at every size (4, 16 or 64 image tokens at 8, 16, 32 px)."""
    return TinyDiT(img_size=size, channels=channels, patch=PATCH, n_classes=0, time_cond=time_cond,
                   **SIZES[cfg.model])


def batch_for(cfg, size: int) -> int:
    """A constant token budget per step: cfg.batch images at 16 px (16 tokens), so 4x the images
    at 8 px and a quarter at 32 px. Every size then costs about the same per step."""
    return max(1, cfg.batch * 16 // (size // PATCH) ** 2)


def train_fm(cfg, x_train: torch.Tensor, time_cond: bool, coupling: str, device) -> TinyDiT:
    """Plain flow matching; the two switches are the only differences between the four cells.
    Identical seeds: every cell sees the same data batches, noise and times, in the same order."""
    size, C = x_train.shape[-1], x_train.shape[1]
    batch = batch_for(cfg, size)
    torch.manual_seed(cfg.seed)
    model = make_net(cfg, size, C, time_cond)
    key = dict(kind="time_blind_fm", data_version=data_mod.VERSION, model_version=dit.VERSION, dataset=cfg.dataset,
               size=size, model=cfg.model, patch=PATCH, steps=cfg.steps, batch=batch, lr=cfg.lr, n_train=cfg.n_train,
               seed=cfg.seed, time_cond=time_cond, coupling=coupling)

    def fit(model):
        model.to(device).train()
        g = torch.Generator().manual_seed(cfg.seed)
        opt, ema = make_optimizer(model, cfg.lr), EMA(model, 0.999)
        name = f"{'cond' if time_cond else 'blind'}/{coupling} {size}px"
        bar = tqdm(range(cfg.steps), desc=name, leave=False, mininterval=1.0)
        for _ in bar:
            x = x_train[torch.randint(0, len(x_train), (batch,), generator=g)]
            eps = pair_noise(x, torch.randn(x.shape, generator=g), coupling)  # the coupling switch
            t = torch.rand(batch, generator=g)
            x, eps, t = x.to(device), eps.to(device), t.to(device)
            loss = fm_loss(model(interpolate(x, eps, t), t), x, eps).mean()  # blind nets never read t
            optimizer_step(loss, model, opt, ema)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        ema.copy_to(model)

    load_or_train("time_blind_fm", key, model, fit)
    return model.to(device).eval()


def make_bank(x_test: torch.Tensor, n: int, seed: int):
    """One fixed held-out bank of (x, eps, t), shared by every model."""
    g = torch.Generator().manual_seed(seed + 7)
    x = x_test[:n]
    return x, torch.randn(x.shape, generator=g), torch.rand(len(x), generator=g)


@torch.inference_mode()
def bank_loss(model, bank, coupling: str, batch: int, device, t_model=None):
    """Per-example held-out loss, each model under its own coupling: OT cells re-pair the bank's
    x and eps with the same minibatch OT as in training, in batches of the training size.
    t_model, if given, is the time the net is told instead of the true t (the plug-in test)."""
    x_all, eps_all, t_all = bank
    t_in = t_all if t_model is None else t_model
    losses = []
    for i in range(0, len(x_all), batch):
        x, t, ti = x_all[i:i + batch], t_all[i:i + batch], t_in[i:i + batch]
        eps = pair_noise(x, eps_all[i:i + batch], coupling)
        x, eps, t, ti = x.to(device), eps.to(device), t.to(device), ti.to(device)
        losses.append(fm_loss(model(interpolate(x, eps, t), ti), x, eps).cpu())
    return torch.cat(losses)


def grid_experiment(cfg, data_by_size, device):
    """The four cells at one size, and the with-t / time-blind pair at every size.

    For any time-blind f and target u = eps - x (law of total variance):
        E||f(x_t) - u||^2 = E||u - E[u | x_t, t]||^2        coupling variance (paid with t too)
                          + E||E[u | x_t, t] - E[u | x_t]||^2   time-blindness gap
                          + E||f(x_t) - E[u | x_t]||^2          approximation error
    so L(blind) - L(cond) estimates the gap when both nets fit equally well."""
    loss, per_bin, samples = {}, {}, {}
    train, test = data_by_size[cfg.grid_size]
    bank = make_bank(test, cfg.n_bank, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 11)
    noise = torch.randn(cfg.n_samples, *train.shape[1:], generator=g)  # the same noise for all four
    for name in SETTINGS:
        time_cond, coupling = name.startswith("cond"), COUPLING[name.split("_")[1]]
        model = train_fm(cfg, train, time_cond, coupling, device)
        per_example = bank_loss(model, bank, coupling, batch_for(cfg, cfg.grid_size), device)
        loss[name] = per_example.mean().item()
        per_bin[name] = loss_per_time_bin(bank[2], per_example, bins=10)
        samples[name] = euler(model, noise.to(device), cfg.sample_steps).cpu()  # blind nets ignore t
    gap = {}
    for size, (tr, te) in data_by_size.items():  # the gap's share of the loss as d grows
        b = make_bank(te, cfg.n_bank, cfg.seed)
        cond = train_fm(cfg, tr, True, "independent", device)
        lc = bank_loss(cond, b, "independent", 256, device).mean().item()
        lb = bank_loss(train_fm(cfg, tr, False, "independent", device), b, "independent", 256, device).mean().item()
        # Plug-in test: the time-conditioned net told t_hat(x_t) instead of t. Its extra loss is the
        # cost of reading the clock off x_t (no learning involved), which theory says vanishes with d.
        flat = tr[:2000].flatten(1).double()
        k = max([k for k in int_list(cfg.ks, "--ks") if k + 1 < flat.shape[1] // 2], default=1)
        basis, c = fit_subspace(flat, k)
        t_hat = estimate_t(interpolate(b[0], b[1], b[2]).flatten(1).double(), basis, c).float()
        lp = bank_loss(cond, b, "independent", 256, device, t_model=t_hat).mean().item()
        gap[str(size)] = dict(loss_cond=lc, loss_blind=lb, gap_fraction=(lb - lc) / lb, k=k,
                              loss_cond_t_hat=lp, plugin_fraction=(lp - lc) / lp)
    return loss, per_bin, samples, gap


# %% the claims, each with the test that decides it


def claims(r: dict) -> list:
    """The paper's headline claims as tested here: the number, the test, and whether it passed."""
    sizes = sorted(r["gap_fraction_by_resolution"], key=int)
    small, large = (r["gap_fraction_by_resolution"][s] for s in (sizes[0], sizes[-1]))
    return [
        dict(claim="t can be read off one x_t with error O(1/sqrt(d - k)) (synthetic data)", paper="slope -0.5",
             ours=r["estimator_slope"], key="estimator_slope", criterion="-0.6 <= estimator_slope <= -0.4",
             reproduced=-0.6 <= r["estimator_slope"] <= -0.4, note="log-log slope of RMSE against d - k"),
        dict(claim="the coupling moves the held-out loss more than the clock", paper="coupling effect > time effect",
             ours=r["coupling_over_time"], key="coupling_over_time", criterion="coupling_over_time > 1",
             reproduced=r["coupling_over_time"] > 1, note="16 px, 2 x 2 grid of nets with identical seeds"),
        dict(claim="the time-blindness gap shrinks as the dimension grows", paper="-> 0 as d grows",
             ours=large, key=f"gap_fraction_by_resolution.{sizes[-1]}",
             criterion=f"gap share at {sizes[-1]} px < half of that at {sizes[0]} px", reproduced=large < small / 2,
             note="learned nets; see plugin_fraction_by_resolution for the clock-reading part alone"),
        dict(claim="the coupling matters more than the clock for sample quality", paper="OT helps more than t",
             ours=r["fd_coupling_effect"], key="fd_coupling_effect", criterion="fd_coupling_effect > fd_time_effect",
             reproduced=r["fd_coupling_effect"] > r["fd_time_effect"], note="evaluator FD (FID stand-in)"),
    ]


# %% figures


def figures(out, synth, images, scatter, per_bin, samples, gap):
    curves = {}
    for k in sorted({r["k"] for r in synth}):
        rows = [r for r in synth if r["k"] == k]
        curves[f"synthetic, k = {k}"] = ([r["d_minus_k"] for r in rows], [r["rmse"] for r in rows])
    dmk = sorted({r["d_minus_k"] for r in synth})
    curves["theory 0.43 / sqrt(d - k)"] = (dmk, [0.43 / math.sqrt(x) for x in dmk])
    for k, rows in images.items():
        curves[f"images, k = {k} (8/16/32 px)"] = ([r["d_minus_k"] for r in rows], [r["rmse"] for r in rows])
    save_curves(curves,
                out / "fig_estimator_rmse.png", "d - k", "RMSE of t_hat", "time from a single x_t",
                logx=True, logy=True)
    size, k, t, t_hat = scatter
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(t.numpy(), t_hat.numpy(), s=3, alpha=0.4)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="true t (0 data, 1 noise)", ylabel="t_hat(x_t)", title=f"estimator on {size}px images, k = {k}")
    fig.tight_layout()
    fig.savefig(out / "fig_t_hat_vs_t.png", dpi=120)
    plt.close(fig)
    save_image_panels([(n, samples[n][:36]) for n in SETTINGS],
                      out / "fig_samples_grid.png", nrow=6, title="same noise, four models (cond/blind x indep/ot)")
    save_curves({n: per_bin[n] for n in SETTINGS}, out / "fig_loss_per_time.png", "t (0 data, 1 noise)",
                "held-out flow-matching loss", "loss per time bin")
    sizes = list(gap)
    save_curves({"learned: (L_blind - L_cond) / L_blind": ([int(s) for s in sizes],
                                                            [gap[s]["gap_fraction"] for s in sizes]),
                 "plug-in: cond net told t_hat(x_t)": ([int(s) for s in sizes],
                                                      [gap[s]["plugin_fraction"] for s in sizes])},
                out / "fig_gap_by_resolution.png", "image side (px)", "time-blindness gap share", logx=True)


# %% run


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = run_dir(cfg, "time_blind_fm")
    sizes = sorted(set(int_list(cfg.sizes, "--sizes")) | {cfg.grid_size})
    root = cfg.data_root or None
    data_by_size = {s: (data_mod.load(cfg.dataset, cfg.n_train, s, cfg.seed, "train", root).images,
                        data_mod.load(cfg.dataset, max(cfg.n_bank, cfg.n_samples), s, cfg.seed, "test", root).images)
                    for s in sizes}

    synth = synthetic_sweep(cfg)
    images, scatter = image_sweep(cfg, {s: torch.cat(data_by_size[s]) for s in sizes})
    headline_k = int_list(cfg.ks, "--ks")[-1]
    slopes = {k: loglog_slope([r["d_minus_k"] for r in rows], [r["rmse"] for r in rows]) if len(rows) > 1
              else None for k, rows in images.items()}  # None (JSON null): fewer than two sizes
    loss, per_bin, samples, gap = grid_experiment(cfg, data_by_size, device)
    evaluator, _ = get_evaluator(cfg.dataset, cfg.grid_size, device, cfg.eval_steps, cfg.seed, root)
    real = data_by_size[cfg.grid_size][1][:cfg.n_samples]
    fd = {n: evaluator.fd(samples[n], real) for n in SETTINGS}
    confident = {n: evaluator.logits(samples[n]).softmax(1).amax(1).gt(0.9).float().mean().item() for n in SETTINGS}

    coupling_effect = (abs(loss["cond_indep"] - loss["cond_ot"]) + abs(loss["blind_indep"] - loss["blind_ot"])) / 2
    time_effect = (abs(loss["blind_indep"] - loss["cond_indep"]) + abs(loss["blind_ot"] - loss["cond_ot"])) / 2
    # the same two effects on sample quality (evaluator FD), where the paper also says OT matters more
    fd_coupling_effect = (abs(fd["cond_indep"] - fd["cond_ot"]) + abs(fd["blind_indep"] - fd["blind_ot"])) / 2
    fd_time_effect = (abs(fd["blind_indep"] - fd["cond_indep"]) + abs(fd["blind_ot"] - fd["cond_ot"])) / 2
    results = dict(
        estimator_slope=loglog_slope([r["d_minus_k"] for r in synth], [r["rmse"] for r in synth]),
        estimator_rmse_sqrt_dmk=[r["rmse_sqrt_dmk"] for r in synth],
        estimator_synthetic=synth,
        estimator_slope_images=slopes[headline_k],
        estimator_slope_images_by_k=slopes,
        estimator_images={str(k): rows for k, rows in images.items()},
        loss=loss, fd=fd, recognisable=confident,
        coupling_effect=coupling_effect, time_effect=time_effect, coupling_over_time=coupling_effect / time_effect,
        fd_coupling_effect=fd_coupling_effect, fd_time_effect=fd_time_effect,
        gap_fraction_by_resolution={s: v["gap_fraction"] for s, v in gap.items()},
        plugin_fraction_by_resolution={s: v["plugin_fraction"] for s, v in gap.items()},
        gap_by_resolution=gap,
        metric_note="fd: evaluator Frechet distance (FID stand-in); recognisable: share of samples the evaluator "
                    "classifies with p > 0.9 (the models are unconditional, so there is no target class)",
        device=str(device),
        seconds=round(time.perf_counter() - t0, 1),
    )
    results["claims"] = claims(results)
    save_json(out / "results.json", results)
    figures(out, synth, images, scatter, per_bin, samples, gap)
    print_table([(n, loss[n], fd[n], confident[n]) for n in SETTINGS],
                ("model", "held-out loss", "eval FD", "recognisable"))
    print()
    print_table([("estimator slope (synthetic; theory -0.5)", results["estimator_slope"]),
                 *[(f"estimator slope (images, k = {k})", v) for k, v in slopes.items()],
                 ("coupling effect", coupling_effect), ("time effect", time_effect),
                 *[(f"gap share at {s}px (learned blind net)", v["gap_fraction"]) for s, v in gap.items()],
                 *[(f"plug-in t_hat share at {s}px", v["plugin_fraction"]) for s, v in gap.items()],
                 ("seconds", results["seconds"])])
    print(f"wrote {out}/results.json and figures")
    return results


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python time_blind_fm.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
