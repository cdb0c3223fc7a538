"""Attention Sinks in Diffusion Transformers: dynamic sinks, and what removing them does.
Fangzheng Wu, Brian Summa (ICML 2026), arXiv 2605.09313. Official code: wfz666/ICML26-attention-sink.
Long-form notes, the official code's protocols, the statistics and the deviations: docs/attention_sinks.md.

Claim. In a DiT with SD3-style joint attention over [text ; image] tokens, a few keys receive a
disproportionate share of the image queries' attention (sinks). They are dynamic: the top-1 sink moves
across samples and steps and is almost never the token at index 0 (< 0.2%). Removing the sinks at one
layer, at every step, leaves alignment unchanged (CLIP-T) yet moves the image far more than removing as
many random keys: LPIPS 0.347 vs 0.053 at k = 1 (6.5x), 0.436 vs 0.104 at k = 5 (4.2x).

Paper -> code
    incoming mass of key j: attention on j, averaged over the image queries ...... `incoming_mass`
    the sinks, recomputed at every call, and the equal-budget random control ...... `choose_keys`
    score path (logits - 1e4, re-softmax), value path (zero / mean), both ......... `remove_keys`
        its slow twin, one query row at a time, the removed keys dropped .......... `remove_keys_ref`
    sinks found, then removed, inside one attention call ......................... `sink_attention`
    the intervention at the chosen layers, at every sampling step ................ `SinkHook`
    top-1 share of index 0, sink strength, token type, movement .................. `detection_stats`
    seed-paired shift and alignment, DDelta = Delta_sink - Delta_random ........... `paired_effect`
    bootstrap intervals, sign-flip tests, Holm-Bonferroni ........................ common/stats.py

Two selection protocols, both in the official scripts (k = the budget per head, H heads):
    per head  each head loses its own top-k keys (run_dynamic_sink.py: the GenEval alignment runs)
    union     the top k*H keys of the head-averaged mass, removed in every head and query row, against
              k*H random keys shared by the heads (the LPIPS DDelta table: run_perceptual_delta_delta.py
              with the patcher of ablation_counterfactual_v3.py)
    Ours, not in the official runs: the per-head random control, the fixed-index control (k = 1: the BOS).

Model. The base model's recipe (common.pretrain --patch 2, cached like it): 69 keys per layer (64 image
    tokens, 5 context), 4 heads: union k = 1 removes 4 keys (5.8%), k = 5 20 (29%); in SD3 0.5% and 2.7%.

Convention (common/flow.py): t = 0 data, t = 1 noise; sampling runs from t = 1 to t = 0, as in SD3.
    Keys are [BOS, 4 label tokens, image tokens], so our index 0 is the BOS; the official detection
    scripts order the keys [image ; text], so their index 0 is the first image token: we report both.
    Sampling: 20 Euler steps, as the official runs; no CFG (the docs page says why).

Run
    python attention_sinks.py                  # cpu preset: 322 s with its model cached (842 s the first time)
    python attention_sinks.py --preset smoke   # seconds, what the tests run
    python attention_sinks.py --preset gpu     # 1,024 pairs, k up to 10 (not measured yet)
"""

# %% imports
import dataclasses
import math
import time
import zlib

import numpy as np
import torch
from matplotlib.colors import LogNorm
from tqdm import tqdm

from common import config, pretrain
from common.config import BaseConfig, UserError, cli, field, int_list, print_table, resolve_device, run_dir, save_json
from common.dit import SIZES, attention_hook, attention_ref
from common.evaluator import get_evaluator, paired_distance
from common.plot import grid, plt
from common.sampler import sample_labels
from common.stats import bootstrap_ci, holm, sign_flip_p

# %% config and presets


@dataclasses.dataclass
class Config(BaseConfig):
    n_samples: int = field(256, "seed-paired (noise, label) pairs; 256 keeps the accuracy intervals near +-0.03")
    sample_steps: int = field(20, "Euler steps, 20 as in the official runs; the hook acts at every one")
    patch: int = field(2, "patch size of the model: 2 gives 64 image tokens at 16 px (69 keys)", choices=(1, 2, 4))
    ks: str = field("1,2,5", "budgets k per head (the paper's: 1 and 5); union removes k*H keys from every head")
    selection: str = field("per_head", "protocol of the path, per-layer and multi-layer runs (the k table runs "
                                       "both): per_head (each head's top-k) or union (top k*H of the "
                                       "head-averaged mass, in every head)", choices=("per_head", "union"))
    query_rows: str = field("all", "query rows that lose the keys: all (the official experiments) or image (the "
                                   "official processor class); the other is run once beside", choices=("all", "image"))
    layer: int = field(-1, "intervention layer (0-based); -1 = the middle one, depth // 2", min=-1)
    mask_value: float = field(1e4, "the score path subtracts this from the removed keys' logits (the paper's 1e4)")
    n_boot: int = field(2000, "paired bootstrap resamples for the 95 percent intervals")
    n_perm: int = field(10000, "sign flips per paired test; the smallest p, 1 / (n_perm + 1), survives Holm over 40")

    def validate(self):
        ks = int_list(self.ks, "--ks")
        depth, heads, n_keys = model_shape(self)  # from the presets: no training needed to check
        if self.layer >= depth:
            raise UserError(f"--layer {self.layer}: the model has {depth} layers (0..{depth - 1})")
        if max(ks) * heads >= n_keys:
            raise UserError(f"--ks {self.ks}: the union protocol removes k*H = {max(ks)}*{heads} keys per layer, but "
                            f"the model has {n_keys}; every k must be <= {(n_keys - 1) // heads}")


PRESETS = {
    "smoke": dict(n_samples=18, sample_steps=4, ks="1,2", n_boot=200, n_perm=200),
    "cpu": dict(),
    "gpu": dict(n_samples=1024, ks="1,2,5,10"),
}
PATHS = ("score", "value_zero", "value_mean", "both")  # "both": the score path and zeroed values
SELECTIONS = ("per_head", "union", "fixed")
SD3_KEYS, SD3_HEADS = 4429, 24  # SD3-medium: 4,096 image + 333 text keys, 24 heads
PAPER = dict(ratio_k1=round(0.347 / 0.053, 2), ratio_k5=round(0.436 / 0.104, 2), index0_below=0.002,
             key_share_removed_union=dict(zip("15", (SD3_HEADS / SD3_KEYS, 5 * SD3_HEADS / SD3_KEYS))))


def model_config(cfg) -> pretrain.Config:
    """The base model's recipe for this preset with our patch size; cached by common.pretrain like the base model."""
    return pretrain.Config(**{**pretrain.PRESETS[cfg.preset], "patch": cfg.patch}, device=cfg.device)


def model_shape(cfg) -> tuple[int, int, int]:
    """(depth, heads H, keys per layer Nk) of the model, read from the recipe alone (5 context keys)."""
    m = model_config(cfg)
    return SIZES[m.model]["depth"], SIZES[m.model]["heads"], 5 + (m.size // m.patch) ** 2


def key_share(k: int, selection: str, H: int, n_keys: int) -> float:
    """The share of a head's keys a budget removes: k*H keys in every head for union, k per head otherwise."""
    return k * (H if selection == "union" else 1) / n_keys


def measured_layers(depth: int) -> list:
    """The layers the paper reads detection statistics at, 6, 12, 18 of SD3's 24, scaled to our depth."""
    return sorted({depth * i // 4 for i in (1, 2, 3)})


# %% method: incoming mass, the keys to remove, attention without them


def incoming_mass(probs: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """probs (B, H, Nq, Nk) -> (B, H, Nk): the attention each key gets from the image queries (rows n_ctx..),
    averaged over them. Sums to 1 over the keys."""
    return probs[:, :, n_ctx:].mean(2)


def choose_keys(mass: torch.Tensor, k: int, control: str = "sink", selection: str = "per_head",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean (B, H, Nk): the keys to remove, from the incoming mass (B, H, Nk).

    selection says how many keys and whose ranking: per_head: k keys, each head's own; union: k*H keys of the
    head-averaged mass, the same in every head; fixed: the first k keys (k = 1: the BOS), in every head.
    control says which: sink: the top of that ranking; random: as many keys drawn uniformly without
    replacement from `generator`, anew at every call (per head for per_head, shared by the heads otherwise)."""
    B, H, N = mass.shape
    if selection == "per_head":
        score, n = mass, k  # (B, H, Nk): one ranking per head
    elif selection == "union":
        score, n = mass.mean(1, keepdim=True), k * H  # (B, 1, Nk): one ranking for every head
    elif selection == "fixed":
        score, n = -torch.arange(N, dtype=mass.dtype, device=mass.device).expand(B, 1, N), k  # index 0 ranks first
    else:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if control == "sink":
        idx = score.topk(n, dim=-1).indices
    elif control == "random":
        idx = torch.rand(score.shape, generator=generator).argsort(-1)[..., :n].to(mass.device)  # a uniform n-subset
    else:
        raise ValueError(f"control must be 'sink' or 'random', got {control!r}")
    return torch.zeros(score.shape, dtype=torch.bool, device=mass.device).scatter_(-1, idx, True).expand(B, H, N)


def remove_keys(q, k, v, sel: torch.Tensor, path: str = "score", first_row: int = 0, mask_value: float = 1e4):
    """Attention with the keys sel (B, H, Nk) removed; q, k, v: (B, H, N, Dh).
    score: their logits lowered by mask_value for the query rows first_row.. (0: every row; n_ctx: the image
    rows), then the softmax; value_zero / value_mean: their values replaced by zero / the mean value, for
    every query; both: the two together. -> (out (B, H, N, Dh), probs (B, H, N, N)).
    With nothing selected every edit adds -0.0 or replaces nothing: bit-equal to attention_ref (tested)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    mask, v_used = None, v
    if path in ("score", "both"):
        rows = torch.arange(q.shape[2], device=q.device) >= first_row  # (Nq,) the query rows edited
        mask = -(mask_value * (sel[:, :, None, :] & rows[:, None]).to(q.dtype))  # (B, H, Nq, Nk), additive
    if path != "score":
        repl = v.mean(2, keepdim=True) if path == "value_mean" else torch.zeros_like(v)  # (B, H, 1 or N, Dh)
        v_used = torch.where(sel[..., None], repl.expand_as(v), v)
    return attention_ref(q, k, v_used, mask, return_probs=True)


def remove_keys_ref(q, k, v, sel: torch.Tensor, path: str = "score", first_row: int = 0) -> torch.Tensor:
    """The slow twin of `remove_keys`: per sample, head and query row, a softmax over the keys that row still
    sees (the score path drops the removed keys outright), reading values replaced key by key."""
    B, H, N, Dh = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            values = v[b, h].clone()  # (N, Dh): each key's value, replaced on the value paths
            if path != "score":
                values[sel[b, h]] = v[b, h].mean(0) if path == "value_mean" else 0
            for i in range(N):
                dropped = sel[b, h] if path in ("score", "both") and i >= first_row else torch.zeros_like(sel[b, h])
                w = (k[b, h, ~dropped] @ q[b, h, i] / math.sqrt(Dh)).softmax(0)
                out[b, h, i] = w @ values[~dropped]
    return out


def sink_attention(q, k, v, n_ctx: int, n_keys: int, path: str = "score", control: str = "sink", *,
                   selection: str = "per_head", rows: str = "all", mask_value: float = 1e4, generator=None):
    """One attention call with its sinks (or as many random keys) removed: find, choose, remove.
    -> (out (B, H, N, Dh), probs after the edit (B, H, N, N), the keys removed (B, H, Nk), mass before)."""
    if rows not in ("all", "image"):
        raise ValueError(f"rows must be 'all' or 'image', got {rows!r}")
    _, probs = attention_ref(q, k, v, return_probs=True)
    mass = incoming_mass(probs, n_ctx)  # the sinks of *this* call: recomputed at every step
    sel = choose_keys(mass, n_keys, control, selection, generator)
    out, probs = remove_keys(q, k, v, sel, path, n_ctx if rows == "image" else 0, mask_value)
    return out, probs, sel, mass


@dataclasses.dataclass(frozen=True)
class Removal:
    """One intervention of the experiment: k keys per head chosen by `selection`, removed by `path` from the
    query `rows`, at `layers`, at every sampling step."""
    layers: tuple = ()
    k: int = 0
    path: str = "score"
    selection: str = "per_head"
    rows: str = "all"


class SinkHook:
    """The attention hook (common/dit.py): `sink_attention` at the removal's layers, plain attention elsewhere.
    record=True keeps every call's incoming mass and sample 0's attention matrix (for detection, figures)."""

    def __init__(self, n_ctx: int, removal: Removal = Removal(), control: str = "sink", mask_value: float = 1e4,
                 seed: int = 0, record: bool = False):
        self.n_ctx, self.removal, self.control, self.mask_value = n_ctx, removal, control, mask_value
        self.record, self.masses, self.probs0 = record, [], []
        self.generator = torch.Generator().manual_seed(seed)  # advances at every call: a fresh draw per step

    def __call__(self, q, k, v, layer: int):
        r = self.removal
        if layer in r.layers:
            out, probs, _, mass = sink_attention(q, k, v, self.n_ctx, r.k, r.path, self.control, selection=r.selection,
                                                 rows=r.rows, mask_value=self.mask_value, generator=self.generator)
        elif self.record:
            out, probs = attention_ref(q, k, v, return_probs=True)
            mass = incoming_mass(probs, self.n_ctx)
        else:
            return attention_ref(q, k, v)
        if self.record:
            self.masses.append(mass.cpu())  # (B, H, Nk)
            self.probs0.append(probs[0].cpu())  # (H, N, N)
        return out


# %% experiment: seed-paired measurements


def measures(evaluator, x: torch.Tensor, y: torch.Tensor) -> dict:
    """What the evaluator says about each sample: its features (for the LPIPS stand-in), and whether it is right."""
    return dict(x=x, feat=evaluator.features(x), correct=(evaluator.logits(x).argmax(1) == y).float())


def paired_effect(base: dict, sink: dict, rand: dict, cfg) -> dict:
    """A sink run and its random control, each paired with the baseline seed by seed (same noise and label).
    shift: evaluator-feature distance to the baseline (LPIPS stand-in); DDelta = shift(sink) - shift(random) per
    pair. align: accuracy change (CLIP-T stand-in), against the baseline (align_delta_*) and sink - random
    (align_ddelta). Two tests per setting, sign-flip: DDelta = 0 (p_value), no accuracy change (align_p_value)."""
    shift_s, shift_r = paired_distance(base["feat"], sink["feat"]), paired_distance(base["feat"], rand["feat"])
    l2_s, l2_r = [(m["x"] - base["x"]).flatten(1).pow(2).mean(1).sqrt() for m in (sink, rand)]  # pixel RMS
    dd = shift_s - shift_r  # (n,) one DDelta per pair
    acc_s, acc_r = sink["correct"] - base["correct"], rand["correct"] - base["correct"]
    ci = lambda d: bootstrap_ci(d, cfg.n_boot, cfg.seed)  # noqa: E731
    return dict(shift_sink=shift_s.mean().item(), shift_random=shift_r.mean().item(),
                shift_ratio=(shift_s.mean() / shift_r.mean()).item() if shift_r.mean() > 0 else None,
                ddelta=dd.mean().item(), ddelta_ci=ci(dd), p_value=sign_flip_p(dd, cfg.n_perm, cfg.seed),
                align_delta_sink=acc_s.mean().item(), align_delta_sink_ci=ci(acc_s),
                align_p_value=sign_flip_p(acc_s, cfg.n_perm, cfg.seed), align_delta_random=acc_r.mean().item(),
                align_ddelta=(acc_s - acc_r).mean().item(), align_ddelta_ci=ci(acc_s - acc_r),
                shift_sink_l2=l2_s.mean().item(), shift_random_l2=l2_r.mean().item(), ddelta_l2_ci=ci(l2_s - l2_r))


def detection_stats(M: torch.Tensor, n_ctx: int, layers=None) -> dict:
    """M: the baseline's incoming mass (S steps, L layers, B samples, H heads, Nk keys); layers: where the headline
    overlaps are read (default: the paper's layers, scaled)."""
    S, L, B, H, N = M.shape
    layers = measured_layers(L) if layers is None else list(layers)
    top1_mass, top1 = M.max(-1)  # (S, L, B, H)
    onehot = torch.nn.functional.one_hot(top1, N)  # (S, L, B, H, Nk)
    share = lambda hit: hit.float().mean().item()  # noqa: E731

    def kinds(t, m):  # what the top-1 sinks t (..., B, H) are; m: their mass
        return dict(sink_strength=(m * N).mean().item(), bos_share=share(t == 0), first_image_share=share(t == n_ctx),
                    label_share=share((t >= 1) & (t < n_ctx)), image_share=share(t >= n_ctx))

    return dict(
        measured_layers=layers,  # the top-1 is the BOS / the first image token (the official index 0)
        bos_overlap=share(top1[:, layers] == 0), first_image_token_overlap=share(top1[:, layers] == n_ctx),
        all_layers=kinds(top1, top1_mass),
        # movement: how often the top-1 changes from one step to the next, how many positions one trajectory
        # visits, and how many positions the samples use at one (step, layer, head)
        top1_switch_rate=share(top1[1:] != top1[:-1]) if S > 1 else 0.0,
        top1_positions_per_trajectory=onehot.amax(0).sum(-1).float().mean().item(),
        top1_positions_across_samples=onehot.amax(2).sum(-1).float().mean().item(),
        detection_by_layer=[kinds(top1[:, i], top1_mass[:, i]) for i in range(L)])


def sample_with(model, cfg, y: torch.Tensor, hook) -> torch.Tensor:
    """Samples for labels y with the hook on every attention call; the noise comes from cfg.seed, so every run is
    paired with the baseline seed by seed."""
    with attention_hook(model, hook):
        return sample_labels(model, y, cfg.sample_steps, 1.0, seed=cfg.seed + 1, batch=len(y))  # no CFG


def seed_of(cfg, *tags) -> int:
    """A stable seed per (run seed, tags): the random control of each setting is reproducible."""
    return cfg.seed * 1_000_003 + zlib.crc32(repr(tags).encode())


def design(cfg, ks: list, layer: int, depth: int) -> dict:
    """The experiment as named groups of Removals; `run` measures each distinct one once (sinks and random keys)
    and puts its effect in its place."""
    at, sel, rows = (layer,), cfg.selection, cfg.query_rows
    paths = PATHS if rows == "image" else PATHS[:3]  # with every row masked, "both" equals the score path (tested)
    return dict(
        by_selection={s: dict(by_k={str(k): Removal(at, k, "score", s, rows) for k in ks}) for s in SELECTIONS[:2]},
        by_path={p: {str(k): Removal(at, k, p, sel, rows) for k in ks} for p in paths},
        fixed_bos={p: Removal(at, 1, p, "fixed", rows) for p in PATHS[1:3]},  # the official value runs: index 0
        other_rows=Removal(at, 1, "score", sel, "image" if rows == "all" else "all"),
        by_layer=[Removal((i,), 1, "score", sel, rows) for i in range(depth)],
        multi_layer=Removal(tuple(measured_layers(depth)), 1, "score", sel, rows))  # the paper's layers 6, 12, 18


def leaves(tree) -> list:
    """Every Removal in a design, in order (with repeats)."""
    return [tree] if isinstance(tree, Removal) else [r for v in (tree.values() if isinstance(tree, dict) else tree)
                                                     for r in leaves(v)]


def replace(tree, f):
    """The design with each Removal r replaced by f(r)."""
    if isinstance(tree, Removal):
        return f(tree)
    return {k: replace(v, f) for k, v in tree.items()} if isinstance(tree, dict) else [replace(v, f) for v in tree]


def make_claims(res: dict) -> list:
    """One entry per headline claim the run tests; `reproduced` is computed from the criterion."""
    claims, add = [], lambda *a: claims.append(config.claim_entry(res, *a))
    union = res["by_selection"]["union"]["by_k"]
    for k, paper in (("1", "LPIPS 0.347 vs 0.053 (6.5x); DDelta +0.295 [0.265, 0.323]"),
                     ("5", "LPIPS 0.436 vs 0.104 (4.2x); DDelta +0.332 [0.308, 0.358]")):
        if (e := union.get(k)) is None:
            continue
        ok = e["shift_ratio"] is not None and e["shift_ratio"] >= 3 and e["ddelta"] > 0 and e["p_holm"] < 0.05
        add(f"removing the sinks (union protocol, k = {k}) shifts the image several times more than as many random "
            "keys", paper, f"by_selection.union.by_k.{k}.shift_ratio", "shift ratio >= 3 and DDelta > 0 with "
            "Holm-adjusted p < 0.05 (testable while the budget removes at most half the keys)",
            ok if e["keys_removed_share"] <= 0.5 else None,  # above: sink and random sets share most keys
            f"feature distance {e['shift_sink']:.3f} vs {e['shift_random']:.3f}; removes {e['keys_removed_share']:.1%} "
            f"of the keys (SD3: {int(k) * SD3_HEADS / SD3_KEYS:.1%})")
    words = dict(align_delta_sink="accuracy is unchanged (vs the baseline) when the sinks are removed",
                 align_ddelta="the accuracy DDelta (sinks removed - random keys removed) is not significant")
    geneval = "CLIP-T change vs baseline: CI contains 0 (553 GenEval prompts)"
    for where, stat, setting, paper in (
            ("by_selection.per_head.by_k.1", "align_delta_sink", "per head, k = 1", geneval),
            ("by_selection.per_head.by_k.5", "align_delta_sink", "per head, k = 5", geneval),
            ("by_selection.union.by_k.1", "align_delta_sink", "union, k = 1", "(the paper tests sink - random: below)"),
            ("by_selection.union.by_k.1", "align_ddelta", "union, k = 1", "CLIP-T DDelta n.s. (64 prompts, layer 12)"),
            ("multi_layer", "align_delta_sink", "top-1, the paper's layers", "CLIP-T CI contains 0, layers 6, 12, 18")):
        e = res
        for part in where.split("."):
            e = e.get(part) if e else None
        if e is not None:
            (lo, hi), d = e[stat + "_ci"], e[stat]
            add(f"{words[stat]} ({setting})", paper, f"{where}.{stat}", "95% CI contains 0 and |change| <= 0.05",
                lo <= 0 <= hi and abs(d) <= 0.05, f"CI [{lo:+.3f}, {hi:+.3f}]; layers {e['layers']}")
    for key, what in (("bos_overlap", "the BOS (index 0 of our [context ; image] keys)"),
                      ("first_image_token_overlap", "the first image token (index 0 of the official [image ; text])")):
        add(f"the top-1 sink is almost never {what}", "< 0.2% (layers 6, 12, 18)", key, "share < 0.002",
            res[key] < PAPER["index0_below"], f"layers {res['measured_layers']}; chance 1/{res['keys_per_layer']}")
    return claims


# %% figures: each drawn from the run's own numbers and tensors


def fig_method(out, probs0, n_ctx: int, image: torch.Tensor, where: str):
    """Sample 0's attention (probs0: (H, N, N)) at one layer and step: head 0's matrix, every head's incoming mass,
    and the keys each protocol removes at k = 1 (per head: each head's top key; union: the top H of the mean)."""
    H, N = probs0.shape[:2]
    side = int(round(math.sqrt(N - n_ctx)))  # patches per image side
    P = image.shape[-1] // side  # pixels per patch side
    mass = incoming_mass(probs0[None], n_ctx)[0] * N  # (H, Nk), 1 = uniform
    per_head, union = mass.argmax(-1).tolist(), mass.mean(0).topk(H).indices.tolist()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4), gridspec_kw=dict(width_ratios=[1.1, 1.4, 0.8]))
    im = axes[0].imshow(probs0[0].clamp_min(1e-4).numpy(), cmap="magma", norm=LogNorm(1e-4, 1), interpolation="nearest")
    for j in union:
        axes[0].add_patch(plt.Rectangle((j - 0.5, -0.5), 1, N, fill=False, ec="deepskyblue", lw=1.5))
    axes[0].plot([per_head[0]], [-2], "v", color="C0", ms=11, mec="k", clip_on=False)
    axes[0].set(xlabel="key (first 5: BOS and label tokens, then the image patches)", ylabel="query (same order)",
                title="head 0: attention of each query on each key\ntriangle: its top key; blue: the union set")
    fig.colorbar(im, ax=axes[0], fraction=0.046, label="attention probability (log scale)")
    for h in range(H):
        axes[1].plot(range(N), mass[h], lw=1, color=f"C{h}", label=f"head {h}")
        axes[1].plot([per_head[h]], [mass[h, per_head[h]]], "v", color=f"C{h}", ms=11, mec="k")
    axes[1].plot(range(N), mass.mean(0), "k-", lw=2, label="mean over the heads")
    axes[1].plot(union, mass.mean(0)[union], "s", ms=12, mfc="none", mec="deepskyblue", mew=2,
                 label=f"the union set: the top {H} of the mean, removed in every head")
    axes[1].axvspan(-0.5, n_ctx - 0.5, color="0.9", zorder=0)
    axes[1].set(xlabel="key (grey: BOS and label tokens)", ylabel="incoming mass x number of keys (1 = uniform)",
                title=f"{where}\nper head, k = 1 removes each head's triangle; union, k = 1 the blue squares")
    axes[1].legend(fontsize=9)
    axes[2].imshow(grid(image[None], 1, pad=0).numpy(), interpolation="nearest")
    for j in (j for j in union if j >= n_ctx):
        r, c = divmod(j - n_ctx, side)
        axes[2].add_patch(plt.Rectangle((c * P - 0.5, r * P - 0.5), P, P, fill=False, ec="deepskyblue", lw=3))
    ctx = [f"label {j}" if j else "BOS" for j in sorted(union) if j < n_ctx]
    axes[2].set_title("final image; blue: union patches" + f"\nalso removed: {', '.join(ctx)}" * bool(ctx))
    axes[2].axis("off")
    fig.tight_layout()
    fig.savefig(out / "fig_method.png", dpi=110)
    plt.close(fig)


def fig_heatmap(out, M: torch.Tensor, layer: int, n_ctx: int, side: int):
    """Incoming mass over the steps at one layer, per head: sample 0 and the mean over samples, one colour scale."""
    S, _, _, H, N = M.shape
    panels = [(M[:, layer, 0, h] * N, f"head {h}, one sample") for h in range(H)]
    panels += [(M[:, layer, :, h].mean(1) * N, f"head {h}, mean of samples") for h in range(H)]
    hi = max(p.max().item() for p, _ in panels)
    ticks = [0, n_ctx / 2] + list(range(n_ctx, N, side))  # the BOS, the label tokens, each row of patches
    names = ["BOS", "label tokens"] + [f"image row {r}" for r in range(side)]
    fig, axes = plt.subplots(2, H, figsize=(3.2 * H + 1, 11), squeeze=False, sharey=True)
    for ax, (mass, title) in zip(axes.flat, panels):
        im = ax.imshow(mass.T.clamp_min(0.1).numpy(), aspect="auto", cmap="magma", norm=LogNorm(0.1, hi),
                       interpolation="nearest")
        ax.plot(range(S), mass.argmax(-1).numpy(), "o", mfc="none", mec="cyan", ms=6, label="top-1 sink")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("sampling step (noise -> image)", fontsize=10)
        ax.set_yticks(ticks, names, fontsize=9)
    axes[0, 0].legend(fontsize=9, loc="lower right")
    fig.colorbar(im, ax=axes, fraction=0.02, ticks=[t for t in (0.1, 0.3, 1, 3, 10, 30) if t <= hi],
                 format="%g", label="incoming mass x number of keys (1 = uniform), log scale")
    fig.suptitle(f"how much attention each key gets at layer {layer}: the sinks move", fontsize=13)
    fig.savefig(out / "fig_heatmap.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def fig_triplets(out, trip: list, nrow: int, layer: int, H: int):
    """Baseline, sinks removed, random keys removed (same noise and label); below, |change| on one scale."""
    diffs = [(x - trip[0]).abs().mean(1, keepdim=True) for x in trip[1:]]  # (B, 1, S, S) in [0, 2]
    hi = max(d.max().item() for d in diffs) or 1.0
    pad = grid(torch.full_like(trip[0], -1), nrow)[..., 0] > 0.5  # where grid() puts its white padding
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5))
    titles = ["baseline", f"top {H} sinks removed (union, k = 1)", f"{H} random keys removed"]
    for ax, x, title in zip(axes[0], trip, titles):
        ax.imshow(grid(x, nrow).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=11)
    for ax, d, title in zip(axes[1, 1:], diffs, ("|sinks removed - baseline|", "|random keys removed - baseline|")):
        canvas = grid(d.expand(-1, 3, -1, -1) * 2 / hi - 1, nrow)[..., 0] * hi
        im = ax.imshow(canvas.masked_fill(pad, float("nan")).numpy(), cmap="magma", vmin=0, vmax=hi,
                       interpolation="nearest")
        ax.set_title(title, fontsize=11)
    fig.colorbar(im, ax=axes[1, 1:].tolist(), fraction=0.03, label="pixel change (mean over colours)")
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"the same noise and label in every column: sinks or as many random keys removed at layer {layer}, "
                 "every step;\nbelow: how far each image moved", fontsize=12)
    fig.savefig(out / "fig_triplets.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


PATH_WORDS = {"score": "keys masked", "value_zero": "values zeroed", "value_mean": "values set to their mean",
              "both": "masked and zeroed"}


def bars(ax, labels: list, series: dict, ylabel: str, title: str, err=None):
    """Grouped bars, one group per label: series = {legend: values}; err: (2, n) error bars of a single series."""
    xs, w = np.arange(len(labels)), 0.8 / len(series)
    for j, (name, values) in enumerate(series.items()):
        ax.bar(xs + w * (j - (len(series) - 1) / 2), values, w, yerr=err, capsize=3, label=name)
    ax.set(xticks=xs, ylabel=ylabel, title=title)
    long = max(map(len, labels)) > 8
    ax.set_xticklabels(labels, rotation=20 if long else 0, ha="right" if long else "center")
    ax.axhline(0, color="k", lw=0.8)


def fig_shift_alignment(out, res: dict, layer: int):
    """How far the image moves (sinks vs random keys) and what accuracy does: against k, per edit, per layer."""
    err = lambda rows, key: np.array([[r[key] - r[key + "_ci"][0], r[key + "_ci"][1] - r[key]] for r in rows]).T  # noqa
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    for j, (sel, col, words) in enumerate((("per_head", "C0", "each head's top k"), ("union", "C3", "union"))):
        by_k = res["by_selection"][sel]["by_k"]
        ks, rows = np.array([int(k) for k in by_k], dtype=float), list(by_k.values())
        axes[0, 0].plot(ks, [r["shift_sink"] for r in rows], "o-", color=col, label=f"{words}: sinks removed")
        axes[0, 0].plot(ks, [r["shift_random"] for r in rows], "o--", color=col, alpha=0.5, label=f"{words}: random")
        for key, fmt, what in (("align_delta_sink", "o-", "sinks removed vs baseline"),
                               ("align_ddelta", "s:", "sinks - random")):
            axes[0, 1].errorbar(ks * 1.04 ** (j - 0.5), [r[key] for r in rows], yerr=err(rows, key), fmt=fmt, color=col,
                                capsize=3, label=f"{words}: {what}")  # side by side: the bars do not hide each other
    axes[0, 0].set(ylabel="change of the image (feature distance)", title=f"how far the image moves, layer {layer}")
    axes[0, 1].set(ylabel="accuracy change, 95% interval", title="alignment (the classifier's accuracy)")
    axes[0, 1].axhline(0, color="k", lw=0.8)
    for ax in axes[0, :2]:
        ax.set(xscale="log", xlabel="k, keys removed per head (union: k*H keys from every head)")
        ax.set_xticks(ks, [str(int(k)) for k in ks])
        ax.minorticks_off()
    other = {f"{PATH_WORDS[p]}, k = 1": e["1"] for p, e in res["by_path"].items() if "1" in e}
    other.update({f"the BOS token's {PATH_WORDS[p]}": e for p, e in res["fixed_bos"].items()})
    other[f"keys masked for {res['other_rows']['rows']} query rows"] = res["other_rows"]
    bars(axes[0, 2], list(other), {"chosen keys (the sinks, or the BOS)": [e["shift_sink"] for e in other.values()],
                                   "as many random keys": [e["shift_random"] for e in other.values()]},
         "change of the image (feature distance)", f"other edits, layer {layer}")
    rows = [*res["by_layer"], res["multi_layer"]]
    names = ["+".join(map(str, r["layers"])) for r in rows]
    bars(axes[1, 0], names, {"top-1 sink removed": [r["shift_sink"] for r in rows],
                             "1 random key removed": [r["shift_random"] for r in rows]},
         "change of the image (feature distance)", "per layer (k = 1)")
    bars(axes[1, 1], names, {"top-1 sink removed, vs baseline": [r["align_delta_sink"] for r in rows]},
         "accuracy change, 95% interval", "alignment per layer (k = 1)", err(rows, "align_delta_sink"))
    kinds = (("bos_share", "the BOS"), ("label_share", "a label token"), ("image_share", "an image patch"),
             ("first_image_share", "the first patch"))
    bars(axes[1, 2], names[:-1], {w: [r[key] for r in res["by_layer"]] for key, w in kinds}, "share of top-1 sinks",
         "what the top-1 sink is")
    axes[1, 2].set_ylim(0, 1.3)  # room for the legend above the bars
    for ax in axes.flat:
        ax.legend(fontsize=10)
        ax.title.set_fontsize(13)
    for ax in axes[1]:
        ax.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(out / "fig_shift_alignment.png", dpi=100)
    plt.close(fig)


# %% run


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = run_dir(cfg, "attention_sinks")
    m_cfg = model_config(cfg)
    model, info = pretrain.base_model(m_cfg, device)  # trained once with the base recipe, then cached
    evaluator, _ = get_evaluator(m_cfg.dataset, m_cfg.size, device, m_cfg.eval_steps, m_cfg.seed)
    depth, H, n_ctx, side = len(model.blocks), model.blocks[0].attn.H, model.n_ctx, model.img_size // model.P
    n_keys = n_ctx + side ** 2
    assert (depth, H, n_keys) == model_shape(cfg), "Config.validate checked another shape"
    layer = depth // 2 if cfg.layer == -1 else cfg.layer
    ks = int_list(cfg.ks, "--ks")
    y = torch.arange(cfg.n_samples) % model.n_classes  # balanced labels, paired with the noise by index

    # Baseline: the hook with nothing removed, recording the incoming mass of every call.
    rec = SinkHook(n_ctx, record=True)
    base = measures(evaluator, sample_with(model, cfg, y, rec), y)
    M = torch.stack(rec.masses).reshape(cfg.sample_steps, depth, *rec.masses[0].shape)  # (S, L, B, H, Nk)
    probs0 = torch.stack(rec.probs0).reshape(cfg.sample_steps, depth, H, n_keys, n_keys)
    detection = detection_stats(M, n_ctx)

    plan, runs, effects = design(cfg, ks, layer, depth), {}, {}
    for r in tqdm(list(dict.fromkeys(leaves(plan))), desc="interventions", mininterval=1.0):
        for control in ("sink", "random"):
            hook = SinkHook(n_ctx, r, control, cfg.mask_value, seed_of(cfg, r, control))
            runs[r, control] = measures(evaluator, sample_with(model, cfg, y, hook), y)
        effects[r] = dict(paired_effect(base, runs[r, "sink"], runs[r, "random"], cfg), layers=list(r.layers),
                          rows=r.rows, keys_removed_share=key_share(r.k, r.selection, H, n_keys))
    # Holm-Bonferroni over every test the run reports: the DDelta and the accuracy change of each setting.
    tests = [(e, p) for e in effects.values() for p in ("p_value", "align_p_value")]
    for (e, p), adj in zip(tests, holm([e[p] for e, p in tests])):
        e[p.replace("p_value", "p_holm")] = adj
    res = replace(plan, lambda r: dict(effects[r]))  # a copy per place: the by_layer rows get detection added
    for row, det in zip(res["by_layer"], detection["detection_by_layer"]):
        row.update(det)
    res.update(
        {k: v for k, v in detection.items() if k != "detection_by_layer"}, keys_per_layer=n_keys, heads=H, layer=layer,
        key_share_removed={s: {str(k): key_share(k, s, H, n_keys) for k in ks} for s in ("per_head", "union")},
        selection=cfg.selection, query_rows=cfg.query_rows, n_samples=cfg.n_samples, sample_steps=cfg.sample_steps,
        sampling_runs=1 + len(runs), baseline_accuracy=base["correct"].mean().item(), holm_family_size=len(tests),
        model_train_seconds=round(info["train_seconds"], 1), model_loaded_from_cache=info["cached"], paper=PAPER,
        device=str(device))
    res["claims"] = make_claims(res)
    step = cfg.sample_steps // 2
    fig_method(out, probs0[step, layer], n_ctx, base["x"][0],
               f"layer {layer}, step {step + 1} of {cfg.sample_steps}, sample 0: every head's incoming mass")
    fig_heatmap(out, M, layer, n_ctx, side)
    union1 = Removal((layer,), 1, "score", "union", cfg.query_rows)
    fig_triplets(out, [x["x"][:8] for x in (base, runs[union1, "sink"], runs[union1, "random"])], 4, layer, H)
    fig_shift_alignment(out, res, layer)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    save_json(out / "results.json", res)  # last: a folder holds results.json only when the run finished

    print_table([(s, k, f"{r['keys_removed_share']:.3f}", r["shift_sink"], r["shift_random"], r["shift_ratio"],
                  r["ddelta"], r["p_holm"], r["align_delta_sink"], r["align_ddelta"])
                 for s, d in res["by_selection"].items() for k, r in d["by_k"].items()],
                ("protocol", "k", "keys", "shift sink", "shift rand", "ratio", "DDelta", "p_holm", "d acc", "acc DD"))
    print_table([(c["claim"][:72], f"{c['ours']:.4g}", c["reproduced"]) for c in res["claims"]]
                + [("baseline accuracy", res["baseline_accuracy"], ""), ("seconds", res["seconds"], "")],
                ("claim", "ours", "reproduced"))
    print(f"wrote {out}/results.json and figures")
    return res


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python attention_sinks.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
