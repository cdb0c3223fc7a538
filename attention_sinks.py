"""Attention Sinks in Diffusion Transformers: dynamic sinks, and what removing them does.
Fangzheng Wu, Brian Summa (ICML 2026), arXiv 2605.09313. Official code: wfz666/ICML26-attention-sink.

Claim reproduced
    In a DiT with SD3-style joint attention over [context ; image] tokens, a few keys receive a
    disproportionate share of the image queries' attention (sinks). They are dynamic: the top-1
    sink moves across samples and steps and is almost never the token at index 0 (< 0.2%).
    Removing the sinks at one layer, at every step, leaves alignment unchanged (CLIP-T) yet moves
    the image far more than removing as many random keys: LPIPS 0.347 vs 0.053 at k = 1 (6.5x),
    0.436 vs 0.104 at k = 5.

Paper -> code
    incoming mass of key j (attention on j, averaged over image queries) ... `incoming_mass`
    the sinks, recomputed at every call, and the equal-budget random control `choose_keys`
    score path (logits - 1e4, re-softmax), value path (zero / mean), both ... `sink_attention`
    the intervention at chosen layers, every step, through the hook .......... `SinkHook`
    top-1 share of BOS / index 0, strength, token type, movement ............. `detection_stats`
    seed-paired evaluation, paired bootstrap CI, sign-flip test, DDelta ..... `paired_effect`
    Holm-Bonferroni over the family of reported tests ........................ `holm`

Two selection protocols, both in the official experiments (k = the budget per head):
    per_head  each head's own top-k keys; random control: k keys per head. The GenEval alignment
              runs (run_dynamic_sink.py: layer 12 of 24, k = 1 and 5, and layers 6/12/18).
    union     the incoming mass averaged over heads; its top k*H keys are removed in every head;
              random control: k*H keys shared by all heads (ablation_counterfactual_v3.py). This is
              the protocol behind the LPIPS DDelta table, so it is the one set beside those numbers.
    Both redraw the random keys at every attention call, and both remove the chosen keys for every
    query row, image and context (`--query-rows all`). Only the official processor class leaves the
    context queries alone (`--query-rows image`, reported once beside the default).
    The value path's official runs replace a fixed index list (default [0], the prompt's first
    token) rather than dynamic sinks: `selection="fixed"` removes the first k keys, so k = 1 is the BOS.

Conventions (common/flow.py): t = 0 data, t = 1 noise; sampling runs from t = 1 to t = 0, so
    "step 0" below is the noisiest step. The paper's SD3 uses the same direction; nothing to translate.
    Keys are ordered [BOS, label tokens, image tokens] (common/dit.py), so index 0 is the BOS. The
    official detection scripts concatenate [image ; text] keys, so their "index 0" (the < 0.2%) is the
    first image token: we report both (`bos_overlap`, `first_image_token_overlap`), read, as the paper
    reads them, at the layers depth * {1/4, 1/2, 3/4} (SD3: 6, 12, 18 of 24; here 1, 2, 3 of 4).

Deviations from the paper. TinyDiT on 16 px coloured shapes (9 labels) instead of SD3 on GenEval
    prompts; 21 keys per layer on the cpu preset (BOS, 4 label tokens, 16 image tokens) and 4 heads
    instead of 4,429 keys and 24 heads, so one budget removes a far larger share of the keys here
    (union k = 1: 4 of 21 keys, 19%; SD3: 24 of 4,429, 0.5%; stored as `keys_removed_share`).
    Stand-ins (common/evaluator.py): evaluator accuracy and label log-probability for CLIP-T, the
    paired evaluator-feature distance for LPIPS (pixel RMS distance reported beside it). No CFG
    (cfg_scale 1): with CFG the hook would also edit the unconditional pass, and the guidance
    difference would amplify the edit; the paper guides SD3 (so our setting is the cleaner one).
    Sign-flip permutation tests instead of t-tests; Holm adjusts their p-values, the CIs are plain 95%.

Run
    python attention_sinks.py                  # cpu preset, 95 s measured on 2 CPU cores (base model cached)
    python attention_sinks.py --preset gpu     # TinyDiT-m, patch 2, 69 keys (not measured yet)
    python attention_sinks.py --preset smoke   # seconds, what the tests run
"""

# %% imports
import dataclasses
import inspect
import time
import zlib

import numpy as np
import torch
from tqdm import tqdm

from common import config, pretrain
from common.config import BaseConfig, UserError, cli, field, int_list, print_table, resolve_device, run_dir, save_json
from common.dit import SIZES, TinyDiT, attention_hook, attention_ref, patchify
from common.evaluator import get_evaluator, paired_distance
from common.plot import plt, save_image_panels
from common.sampler import sample_labels

# %% config and presets


@dataclasses.dataclass
class Config(BaseConfig):
    n_samples: int = field(256, "seed-paired (noise, label) pairs shared with the baseline; 256 keeps the "
                                "accuracy CIs near +-0.03 and the cpu run to a few minutes")
    sample_steps: int = field(32, "Euler steps (as common.pretrain samples); the hook acts at every one")
    cfg_scale: float = field(1.0, "guidance scale; 1 = no CFG, so each step is one conditional forward and the "
                                  "intervention is not amplified by the guidance difference")
    ks: str = field("1,2,5", "budgets k per head (the paper's table: 1 and 5); union removes k*H keys, so "
                             "k*H must stay below the keys per layer (21 on cpu, 4 heads: k <= 5)")
    selection: str = field("per_head", "protocol of the path, per-layer and multi-layer runs (the k table runs "
                                       "both): per_head (each head's top-k) or union (top k*H of the "
                                       "head-averaged mass, in every head)", choices=("per_head", "union"))
    query_rows: str = field("all", "query rows that lose the sinks: all (the official experiments) or image "
                                   "(the official processor class); the other is reported once beside",
                            choices=("all", "image"))
    layer: int = field(-1, "intervention layer (0-based); -1 = the middle one, depth // 2", min=-1)
    mask_value: float = field(1e4, "the score path subtracts this from the sinks' logits (the paper's 1e4)")
    n_boot: int = field(2000, "paired bootstrap resamples for the 95 percent CIs")
    n_perm: int = field(10000, "sign flips per paired permutation test; the smallest p is 1 / (n_perm + 1), "
                               "small enough to survive Holm over about 40 tests")
    n_show: int = field(8, "seeds shown in the triplet figure")

    def validate(self):
        ks = int_list(self.ks, "--ks")
        depth, heads, n_keys = base_shape(self.preset)  # from the presets: no training needed to check
        if self.layer >= depth:
            raise UserError(f"--layer {self.layer}: the {self.preset} base model has {depth} layers (0..{depth - 1})")
        if max(ks) * heads >= n_keys:
            raise UserError(f"--ks {self.ks}: the union protocol removes k*H = {max(ks)}*{heads} keys per layer, but "
                            f"the {self.preset} base model has {n_keys}; every k must be <= {(n_keys - 1) // heads}")


# The base model is the shared one (common/pretrain.py) trained with the preset of the same name.
PRESETS = {
    "smoke": dict(n_samples=18, sample_steps=4, ks="1,2", n_boot=200, n_perm=200, n_show=4),
    "cpu": dict(),
    "gpu": dict(n_samples=1024, ks="1,2,5,10,16"),  # 69 keys, 4 heads: union k <= 17
}
PATHS = ("score", "value_zero", "value_mean", "both")  # "both": the score path and zeroed values
SELECTIONS = ("per_head", "union", "fixed")
# SD3-medium: 24 heads, 4,096 image + 333 text keys. The LPIPS table: union protocol, layer 12, 64 prompts.
SD3_KEYS, SD3_HEADS = 4429, 24
PAPER = dict(lpips_sink_k1=0.347, lpips_random_k1=0.053, ratio_k1=round(0.347 / 0.053, 2), ddelta_k1=0.295,
             ddelta_ci_k1=[0.265, 0.323], lpips_sink_k5=0.436, lpips_random_k5=0.104, ratio_k5=round(0.436 / 0.104, 2),
             ddelta_k5=0.332, ddelta_ci_k5=[0.308, 0.358], index0_overlap_below=0.002,
             keys_removed_share_union_k1=SD3_HEADS / SD3_KEYS, keys_removed_share_union_k5=5 * SD3_HEADS / SD3_KEYS,
             keys_removed_share_per_head_k1=1 / SD3_KEYS)


def base_shape(preset: str) -> tuple[int, int, int]:
    """(depth, heads H, keys per layer Nk) of the preset's base model, read from the presets alone."""
    b = pretrain.Config(**pretrain.PRESETS[preset])
    n_ctx = 1 + inspect.signature(TinyDiT).parameters["label_tokens"].default  # BOS + label tokens
    return SIZES[b.model]["depth"], SIZES[b.model]["heads"], n_ctx + (b.size // b.patch) ** 2


def measured_layers(depth: int) -> list:
    """The layers the paper reads detection statistics at, 6, 12, 18 of SD3's 24, scaled to our depth."""
    return sorted({depth * i // 4 for i in (1, 2, 3)})


# %% method: incoming mass, sink choice, the intervened attention


def incoming_mass(probs: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """probs (B, H, Nq, Nk) -> (B, H, Nk): how much attention each key gets from the image
    queries (rows n_ctx..), averaged over them. Sums to 1 over keys."""
    return probs[:, :, n_ctx:].mean(2)


def choose_keys(mass: torch.Tensor, k: int, control: str = "sink", selection: str = "per_head",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean (B, H, Nk) selection of the keys to remove, from the incoming mass (B, H, Nk).

    per_head: each head's own top-k.  union: the top k*H keys of the head-averaged mass, the same in
    every head.  fixed: the first k keys in every head (k = 1: the BOS).
    control "random": as many keys drawn uniformly without replacement, anew at every call from
    `generator` (an equal-budget control that cannot track the sinks): per head for per_head, shared
    by all heads for union and fixed, as the official experiments draw them."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    B, H, N = mass.shape
    shared = selection != "per_head"
    n = k * H if selection == "union" else k  # keys removed per sample (and per head for per_head)
    score = mass.mean(1, keepdim=True) if shared else mass  # (B, 1 or H, Nk)
    if control == "random":
        idx = torch.rand(score.shape, generator=generator).argsort(-1)[..., :n].to(mass.device)  # uniform n-subset
    elif control != "sink":
        raise ValueError(f"control must be 'sink' or 'random', got {control!r}")
    elif selection == "fixed":
        idx = torch.arange(n, device=mass.device).expand(B, 1, n)
    else:
        idx = score.topk(n, dim=-1).indices
    sel = torch.zeros(score.shape, dtype=torch.bool, device=mass.device).scatter_(-1, idx, True)
    return sel.expand(B, H, N)


def sink_attention(q, k, v, n_ctx: int, n_keys: int, path: str = "score", control: str = "sink", *,
                   selection: str = "per_head", rows: str = "all", mask_value: float = 1e4, generator=None):
    """Attention with k = n_keys sinks per head (or random keys) removed. q, k, v: (B, H, N, Dh).
    rows: the query rows whose logits lose the chosen keys, "all" or "image" (rows n_ctx..).
    Returns (out (B, H, N, Dh), probs after the edit (B, H, N, N), selection (B, H, N), mass before).
    Built on attention_ref: with n_keys = 0 every edit adds -0.0 or selects nothing, so the output is
    bit-equal to attention_ref's (tested)."""
    _, probs = attention_ref(q, k, v, return_probs=True)
    mass = incoming_mass(probs, n_ctx)  # the sinks of *this* call: recomputed every step
    sel = choose_keys(mass, n_keys, control, selection, generator)  # (B, H, Nk)
    mask, v_used = None, v
    if path in ("score", "both"):
        if rows not in ("all", "image"):
            raise ValueError(f"rows must be 'all' or 'image', got {rows!r}")
        hit = torch.arange(q.shape[2], device=q.device) >= (n_ctx if rows == "image" else 0)  # (Nq,) rows edited
        mask = -(mask_value * (sel[:, :, None, :] & hit[:, None]).to(q.dtype))  # (B, H, Nq, Nk), additive
    if path in ("value_zero", "value_mean", "both"):
        repl = v.mean(2, keepdim=True) if path == "value_mean" else torch.zeros_like(v)  # (B, H, 1 or N, Dh)
        v_used = torch.where(sel[..., None], repl.expand_as(v), v)  # a key's value, read by every query
    elif path != "score":
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    out, probs = attention_ref(q, k, v_used, mask, return_probs=True)  # re-softmax with the sinks' logits lowered
    return out, probs, sel, mass


class SinkHook:
    """The attention hook (common/dit.py): `sink_attention` at the chosen layers, plain attention
    elsewhere; `record=True` keeps the incoming mass of every call (for detection)."""

    def __init__(self, n_ctx: int, layers=(), n_keys: int = 0, path: str = "score", control: str = "sink",
                 selection: str = "per_head", rows: str = "all", mask_value: float = 1e4, seed: int = 0,
                 record: bool = False):
        self.n_ctx, self.layers, self.n_keys, self.path, self.control = n_ctx, set(layers), n_keys, path, control
        self.edit = dict(selection=selection, rows=rows, mask_value=mask_value)
        self.record, self.masses = record, []
        self.generator = torch.Generator().manual_seed(seed)  # advances at every call: a fresh draw per step

    def __call__(self, q, k, v, layer: int):
        if layer not in self.layers and not self.record:
            return attention_ref(q, k, v)
        n = self.n_keys if layer in self.layers else 0
        out, _, _, mass = sink_attention(q, k, v, self.n_ctx, n, self.path, self.control, generator=self.generator,
                                         **self.edit)
        if self.record:
            self.masses.append(mass.float().cpu())
        return out


# %% statistics: seed-paired, bootstrap, sign-flip, Holm


def bootstrap_ci(d: torch.Tensor, n_boot: int, seed: int, level: float = 0.95) -> list:
    """Percentile CI of the mean of paired differences d (n,), resampling pairs with replacement."""
    g = torch.Generator().manual_seed(seed)
    means = d.double()[torch.randint(0, len(d), (n_boot, len(d)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return [float(lo), float(hi)]


def sign_flip_p(d: torch.Tensor, n_perm: int, seed: int) -> float:
    """Two-sided paired permutation test of mean(d) = 0: under H0 each pair's sign is a coin flip."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n_perm, len(d)), generator=g).double() * 2 - 1
    null = (signs * d.double()).mean(1).abs()
    return float((1 + (null >= d.double().mean().abs() - 1e-12).sum()) / (n_perm + 1))


def holm(p: list) -> list:
    """Holm-Bonferroni adjusted p-values for a family of m tests: the i-th smallest p (i = 0..m-1) is
    multiplied by m - i, then made non-decreasing in that order and capped at 1. Rejecting where the
    adjusted p < alpha keeps the family-wise error rate at alpha."""
    m, adj, running = len(p), [0.0] * len(p), 0.0
    for i, j in enumerate(sorted(range(m), key=lambda j: p[j])):
        running = max(running, min(1.0, (m - i) * p[j]))
        adj[j] = running
    return adj


def measures(evaluator, x: torch.Tensor, y: torch.Tensor) -> dict:
    """What the evaluator says about each sample: features (LPIPS stand-in), correct, log p(y|x)."""
    logits = evaluator.logits(x)
    return dict(x=x, feat=evaluator.features(x), correct=(logits.argmax(1) == y).float(),
                logp=logits.log_softmax(1).gather(1, y[:, None]).squeeze(1))


def paired_effect(base: dict, sink: dict, rand: dict, cfg) -> dict:
    """Shift and alignment change of a sink run and its random control, each paired with the
    baseline by seed (same noise, same label), and DDelta = shift(sink) - shift(random) per pair.
    Two tests per setting: DDelta = 0 (p_value) and no accuracy change (align_p_value)."""
    shift_s, shift_r = paired_distance(base["feat"], sink["feat"]), paired_distance(base["feat"], rand["feat"])
    l2_s, l2_r = [(m["x"] - base["x"]).flatten(1).pow(2).mean(1).sqrt() for m in (sink, rand)]  # pixel RMS
    dd = shift_s - shift_r  # (n,) one DDelta per seed
    acc_s, acc_r = sink["correct"] - base["correct"], rand["correct"] - base["correct"]
    lp_s, lp_r = sink["logp"] - base["logp"], rand["logp"] - base["logp"]
    ratio = shift_s.mean() / shift_r.mean() if shift_r.mean() > 0 else float("nan")
    return dict(shift_sink=shift_s.mean().item(), shift_random=shift_r.mean().item(),
                shift_ratio=float(ratio) if np.isfinite(float(ratio)) else None,
                ddelta=dd.mean().item(), ddelta_ci=bootstrap_ci(dd, cfg.n_boot, cfg.seed),
                p_value=sign_flip_p(dd, cfg.n_perm, cfg.seed),
                align_delta_sink=acc_s.mean().item(), align_delta_sink_ci=bootstrap_ci(acc_s, cfg.n_boot, cfg.seed),
                align_p_value=sign_flip_p(acc_s, cfg.n_perm, cfg.seed),
                align_delta_random=acc_r.mean().item(),
                logprob_delta_sink=lp_s.mean().item(), logprob_delta_sink_ci=bootstrap_ci(lp_s, cfg.n_boot, cfg.seed),
                logprob_delta_random=lp_r.mean().item(),
                shift_sink_l2=l2_s.mean().item(), shift_random_l2=l2_r.mean().item(),
                ddelta_l2_ci=bootstrap_ci(l2_s - l2_r, cfg.n_boot, cfg.seed))

# %% detection


def on_shape_share(top1: torch.Tensor, n_ctx: int, on_shape: torch.Tensor) -> float | None:
    """Share of image-token top-1 sinks whose patch shows the shape in the final image.
    top1: (..., B, H) key indices; on_shape: (B, N_img) bool. None if no image token is a sink."""
    img = top1 >= n_ctx
    if not img.any():
        return None
    b = torch.arange(top1.shape[-2])[:, None].expand_as(top1)  # the sample index of each entry
    return on_shape[b[img], top1[img] - n_ctx].float().mean().item()


def detection_stats(M: torch.Tensor, n_ctx: int, on_shape: torch.Tensor | None = None, layers=None) -> dict:
    """M: incoming mass (S steps, L layers, B samples, H heads, Nk keys) from the baseline run;
    on_shape: (B, N_img) bool, which patches of each final baseline image show the shape;
    layers: where the headline overlaps are read (default: measured_layers(L))."""
    S, L, B, H, N = M.shape
    layers = measured_layers(L) if layers is None else list(layers)
    on_shape = torch.zeros(B, N - n_ctx, dtype=torch.bool) if on_shape is None else on_shape
    top1_mass, top1 = M.max(-1)  # (S, L, B, H)
    onehot = torch.nn.functional.one_hot(top1, N)  # (S, L, B, H, Nk)
    by_layer = [dict(sink_strength=(top1_mass[:, i] * N).mean().item(),
                     bos_share=(top1[:, i] == 0).float().mean().item(),
                     first_image_share=(top1[:, i] == n_ctx).float().mean().item(),
                     label_share=((top1[:, i] >= 1) & (top1[:, i] < n_ctx)).float().mean().item(),
                     image_share=(top1[:, i] >= n_ctx).float().mean().item(),
                     image_sink_on_shape=on_shape_share(top1[:, i], n_ctx, on_shape)) for i in range(L)]
    return dict(
        measured_layers=layers,
        # top-1 is the BOS / the first image token (the official "index 0"), over (step, sample, head)
        bos_overlap=(top1[:, layers] == 0).float().mean().item(),
        first_image_token_overlap=(top1[:, layers] == n_ctx).float().mean().item(),
        bos_overlap_all_layers=(top1 == 0).float().mean().item(),
        # where image-token sinks sit: on the shape or on the background, against the chance level
        image_sink_on_shape=on_shape_share(top1, n_ctx, on_shape),
        patches_on_shape=on_shape.float().mean().item(),
        sink_strength=(top1_mass * N).mean().item(),  # times the uniform mass 1 / Nk
        top1_label_share=((top1 >= 1) & (top1 < n_ctx)).float().mean().item(),
        top1_image_share=(top1 >= n_ctx).float().mean().item(),
        # movement: how often the top-1 changes between consecutive steps, how many positions
        # one trajectory visits, and how many positions the samples use at one (step, layer, head)
        top1_switch_rate=(top1[1:] != top1[:-1]).float().mean().item() if S > 1 else 0.0,
        top1_positions_per_trajectory=onehot.amax(0).sum(-1).float().mean().item(),
        top1_positions_across_samples=onehot.amax(2).sum(-1).float().mean().item(),
        detection_by_layer=by_layer)


# %% experiment


def sample_with(model, cfg, y: torch.Tensor, hook) -> torch.Tensor:
    """Samples for labels y with the hook on every attention call; the noise comes from cfg.seed,
    so every run is paired with the baseline seed by seed."""
    with attention_hook(model, hook):
        return sample_labels(model, y, cfg.sample_steps, cfg.cfg_scale, seed=cfg.seed + 1, batch=len(y))


def seed_of(cfg, *tags) -> int:
    """A stable seed per (run seed, tags): the random control of each setting is reproducible."""
    return cfg.seed * 1_000_003 + zlib.crc32(repr(tags).encode())


def make_claims(res: dict) -> list:
    """One entry per headline claim the run tests; `reproduced` is computed from the criterion."""
    claims = []

    def add(*args):  # ok None: the toy cannot test it (the note says why)
        claims.append(config.claim_entry(res, *args))

    for k, paper in (("1", "LPIPS 0.347 vs 0.053 (6.5x); DDelta +0.295 [0.265, 0.323]"),
                     ("5", "LPIPS 0.436 vs 0.104 (4.2x); DDelta +0.332 [0.308, 0.358]")):
        e = res["by_selection"]["union"]["by_k"].get(k)
        if e is None:
            continue
        ok = e["shift_ratio"] is not None and e["shift_ratio"] >= 3 and e["ddelta"] > 0 and e["p_holm"] < 0.05
        if e["keys_removed_share"] > 0.5:  # sink and random sets then share most keys: no test of the claim
            ok = None
        add(f"removing the sinks (union protocol, k = {k}) shifts the image several times more than as many "
            "random keys", paper, f"by_selection.union.by_k.{k}.shift_ratio",
            "shift ratio >= 3 and DDelta > 0 with Holm-adjusted p < 0.05 (testable while the budget removes at "
            "most half the keys)", ok,
            f"feature distance {e['shift_sink']:.3f} vs {e['shift_random']:.3f}; removes "
            f"{e['keys_removed_share']:.0%} of the keys (SD3: {int(k) * SD3_HEADS / SD3_KEYS:.1%})")
    for sel, k, paper in (("per_head", "1", "CLIP-T 95% CI contains 0 (553 GenEval prompts, top-1 per head)"),
                          ("per_head", "5", "CLIP-T 95% CI contains 0 (553 GenEval prompts, top-5 per head)"),
                          ("union", "1", "CLIP-T DDelta not significant (union, k = 1)")):
        e = res["by_selection"][sel]["by_k"].get(k)
        if e is None:
            continue
        lo, hi = e["align_delta_sink_ci"]
        add(f"alignment is unchanged when the sinks are removed ({sel}, k = {k})", paper,
            f"by_selection.{sel}.by_k.{k}.align_delta_sink", "accuracy change: 95% CI contains 0 and |change| <= 0.05",
            lo <= 0 <= hi and abs(e["align_delta_sink"]) <= 0.05,
            f"CI [{lo:+.3f}, {hi:+.3f}], baseline accuracy {res['baseline_accuracy']:.3f}")
    e = res["multi_layer"]
    lo, hi = e["align_delta_sink_ci"]
    add(f"alignment is unchanged when the top-1 sinks are removed at several layers ({res['selection']})",
        "CLIP-T 95% CI contains 0 (layers 6, 12, 18, top-1)", "multi_layer.align_delta_sink",
        "accuracy change: 95% CI contains 0 and |change| <= 0.05", lo <= 0 <= hi and abs(e["align_delta_sink"]) <= 0.05,
        f"layers {e['layers']}, CI [{lo:+.3f}, {hi:+.3f}]")
    for key, what in (("bos_overlap", "the BOS (index 0 of our [context ; image] keys)"),
                      ("first_image_token_overlap", "the first image token (index 0 of the official [image ; text])")):
        add(f"the top-1 sink is almost never {what}", "< 0.2% (layers 6, 12, 18)", key, "share < 0.002",
            res[key] < PAPER["index0_overlap_below"],
            f"at layers {res['measured_layers']}; layer 0: {res['bos_overlap_by_layer'][0]:.3f} (BOS); "
            f"chance 1/{res['n_keys']} = {1 / res['n_keys']:.3f}")
    return claims


def figures(out, cfg, M, layer, n_ctx, trip, res):
    S, _, _, H, N = M.shape
    names = ["BOS"] + [f"lab{i}" for i in range(1, n_ctx)] + [f"img{i}" for i in range(N - n_ctx)]
    fig, axes = plt.subplots(2, H, figsize=(2.6 * H, 2 + 0.14 * N), squeeze=False)
    for h in range(H):  # row 0: one sample (sinks move); row 1: the mean over samples
        for r, (mass, what) in enumerate([(M[:, layer, 0, h], "seed 0"), (M[:, layer, :, h].mean(1), "mean")]):
            ax = axes[r, h]
            im = ax.imshow(mass.T.numpy() * N, aspect="auto", cmap="magma", interpolation="nearest")
            ax.set_title(f"head {h}, {what}", fontsize=8)
            ax.set_yticks(range(N), names if h == 0 else [""] * N, fontsize=5)
            ax.set_xlabel("step (t = 1 -> 0)", fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(f"incoming mass x Nk (1 = uniform), layer {layer}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fig_heatmap.png", dpi=120)
    plt.close(fig)

    panels = [("baseline", trip[0]), (f"top-{H} sinks removed", trip[1]), (f"{H} random keys removed", trip[2])]
    save_image_panels(panels,
                      out / "fig_triplets.png", nrow=(cfg.n_show + 1) // 2, scale=0.35,
                      title=f"same noise and label; union k = 1 (k*H keys, every head, every row) at layer {layer}")

    def ci_err(rows, key):  # (2, n) error bars from [lo, hi] CIs
        return np.array([[r[key] - r[key + "_ci"][0], r[key + "_ci"][1] - r[key]] for r in rows]).T

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for j, (sel, col) in enumerate((("per_head", "C0"), ("union", "C3"))):  # top row: the two protocols against k
        by_k = res["by_selection"][sel]["by_k"]
        ks, rows = np.array([int(k) for k in by_k], dtype=float), list(by_k.values())
        axes[0, 0].plot(ks, [r["shift_sink"] for r in rows], "o-", color=col, label=f"{sel}: sinks")
        axes[0, 0].plot(ks, [r["shift_random"] for r in rows], "o--", color=col, alpha=0.5, label=f"{sel}: random")
        ks_j = ks * 1.04 ** (j - 0.5)  # side by side, so the error bars do not hide each other
        axes[0, 1].errorbar(ks_j, [r["align_delta_sink"] for r in rows], yerr=ci_err(rows, "align_delta_sink"),
                            fmt="o-", color=col, capsize=2, label=f"{sel}: sinks (dashed: random)")
        axes[0, 1].plot(ks_j, [r["align_delta_random"] for r in rows], "o--", color=col, alpha=0.5)
    axes[0, 0].set(xscale="log", xlabel="k (budget per head; union: k*H keys in every head)",
                   ylabel="feature distance to baseline", title=f"perceptual shift at layer {layer} (LPIPS stand-in)")
    axes[0, 1].set(xscale="log", xlabel="k", ylabel="accuracy change vs baseline",
                   title="alignment (CLIP-T stand-in), 95% CI")
    for ax in axes[0, :2]:  # plain k ticks on the log axis
        ax.set_xticks(ks, [str(int(k)) for k in ks])
        ax.minorticks_off()
    other = {f"{p}, k = {k}": e for p, by_k in res["by_path"].items() for k, e in by_k.items() if k == "1"}
    other.update({f"{p}, BOS (fixed)": e for p, e in res["fixed_bos"].items()})
    other[f"score, {res['query_rows_compare']['other']} rows"] = res["query_rows_compare"]["entry"]
    xs = np.arange(len(other))
    axes[0, 2].bar(xs - 0.2, [e["shift_sink"] for e in other.values()], 0.4, label="chosen keys removed")
    axes[0, 2].bar(xs + 0.2, [e["shift_random"] for e in other.values()], 0.4, label="as many random keys")
    axes[0, 2].set(xticks=xs, ylabel="feature distance to baseline",
                   title=f"other edits ({cfg.selection}, layer {layer})")
    axes[0, 2].set_xticklabels(list(other), rotation=30, ha="right", fontsize=7)
    by_layer = res["by_layer"]
    names = [str(r["layer"]) for r in by_layer] + ["+".join(map(str, res["multi_layer"]["layers"]))]
    rows, xs = [*by_layer, res["multi_layer"]], np.arange(len(by_layer) + 1)
    axes[1, 0].bar(xs - 0.2, [r["shift_sink"] for r in rows], 0.4, label="top-1 sink removed")
    axes[1, 0].bar(xs + 0.2, [r["shift_random"] for r in rows], 0.4, label="1 random key removed")
    axes[1, 0].set(ylabel="feature distance to baseline", title=f"per layer, k = 1, score path ({cfg.selection})")
    axes[1, 1].bar(xs, [r["align_delta_sink"] for r in rows], 0.5, yerr=ci_err(rows, "align_delta_sink"),
                   capsize=2, color="C1", label="sink removed")
    axes[1, 1].set(ylabel="accuracy change vs baseline", title="alignment per layer, 95% CI")
    for ax in axes[1, :2]:
        ax.set(xticks=xs, xticklabels=names, xlabel="layer")
        ax.axhline(0, color="k", lw=0.8)
    xs = np.arange(len(by_layer))  # shares get their own axis (0..1), apart from accuracy changes
    for j, (key, lab) in enumerate((("bos_share", "BOS"), ("label_share", "label tokens"),
                                    ("image_share", "image tokens"), ("first_image_share", "first image token"))):
        axes[1, 2].bar(xs + 0.2 * (j - 1.5), [r[key] for r in by_layer], 0.2, label=lab)
    axes[1, 2].set(xticks=xs, xticklabels=[str(r["layer"]) for r in by_layer], xlabel="layer", ylim=(0, 1),
                   ylabel="share of top-1 sinks", title="what the top-1 sink is, per layer")
    axes[0, 1].axhline(0, color="k", lw=0.8)
    for ax in axes.flat:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "fig_shift_alignment.png", dpi=120)
    plt.close(fig)


# %% run


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    out = run_dir(cfg, "attention_sinks")
    base_cfg = pretrain.Config(**pretrain.PRESETS[cfg.preset], device=cfg.device)  # the shared base model
    model, _ = pretrain.base_model(base_cfg, device)
    evaluator, _ = get_evaluator(base_cfg.dataset, base_cfg.size, device, base_cfg.eval_steps, base_cfg.seed)
    depth, H, n_ctx = len(model.blocks), model.blocks[0].attn.H, model.n_ctx
    n_keys = n_ctx + (model.img_size // model.P) ** 2
    assert (depth, H, n_keys) == base_shape(cfg.preset), "Config.validate checked another shape"
    layer = depth // 2 if cfg.layer == -1 else cfg.layer
    ks, sel, rows = int_list(cfg.ks, "--ks"), cfg.selection, cfg.query_rows
    other_rows = "image" if rows == "all" else "all"
    y = torch.arange(cfg.n_samples) % model.n_classes  # balanced labels, paired with the noise by index

    # Baseline: the same hook with nothing removed, recording the incoming mass of every call.
    rec = SinkHook(n_ctx, record=True)
    base = measures(evaluator, sample_with(model, cfg, y, rec), y)
    M = torch.stack(rec.masses).reshape(cfg.sample_steps, depth, *rec.masses[0].shape)  # (S, L, B, H, Nk)
    if cfg.cfg_scale != 1.0:
        M = M[:, :, :cfg.n_samples]  # the conditional half of each CFG batch
    on_shape = patchify(base["x"], model.P).amax(-1) > 0  # (B, N_img): a patch with a coloured pixel
    detection = detection_stats(M, n_ctx, on_shape)
    multi = tuple(detection["measured_layers"])  # the paper's multi-layer run: layers 6, 12, 18 of 24

    cache, effects = {}, {}

    def effect(layers: tuple, k: int, path: str, selection: str, rows: str) -> dict:
        runs = {}
        for control in ("sink", "random"):
            key = (layers, k, path, selection, rows, control)
            if key not in cache:
                hook = SinkHook(n_ctx, layers, k, path, control, selection, rows, cfg.mask_value, seed_of(cfg, *key))
                cache[key] = measures(evaluator, sample_with(model, cfg, y, hook), y)
            runs[control] = cache[key]
        share = k * (H if selection == "union" else 1) / n_keys  # per head: each head loses k of Nk keys
        return dict(paired_effect(base, runs["sink"], runs["random"], cfg), keys_removed_share=share)

    at = (layer,)
    paths = PATHS if rows == "image" else PATHS[:3]  # with every row masked, "both" equals the score path (tested)
    settings = [(at, k, "score", s, rows) for s in ("per_head", "union") for k in ks]
    settings += [(at, k, p, sel, rows) for p in paths[1:] for k in ks]
    settings += [(at, 1, p, "fixed", rows) for p in ("value_zero", "value_mean")]
    settings += [(at, 1, "score", sel, other_rows)] + [((i,), 1, "score", sel, rows) for i in range(depth)]
    settings += [(multi, 1, "score", sel, rows), (at, 1, "score", "union", rows)]  # the last: the triplet figure
    for s in tqdm(list(dict.fromkeys(settings)), desc="interventions", mininterval=1.0):
        effects[s] = effect(*s)
    # Holm-Bonferroni over every test the run reports: DDelta and accuracy change of each setting.
    tests = [(e, p) for e in effects.values() for p in ("p_value", "align_p_value")]
    for (e, p), adj in zip(tests, holm([e[p] for e, p in tests])):
        e[p.replace("p_value", "p_holm")] = adj

    by_selection = {s: dict(by_k={str(k): effects[(at, k, "score", s, rows)] for k in ks})
                    for s in ("per_head", "union")}
    by_path = {p: {str(k): effects[(at, k, p, sel, rows)] for k in ks} for p in paths}
    by_layer = [dict(layer=i, **effects[((i,), 1, "score", sel, rows)], **detection["detection_by_layer"][i])
                for i in range(depth)]
    trip = [r["x"][:cfg.n_show] for r in (base, cache[(at, 1, "score", "union", rows, "sink")],
                                          cache[(at, 1, "score", "union", rows, "random")])]
    bos_by_layer = [d["bos_share"] for d in detection["detection_by_layer"]]
    results = dict(
        bos_overlap=detection["bos_overlap"], first_image_token_overlap=detection["first_image_token_overlap"],
        measured_layers=detection["measured_layers"], bos_overlap_by_layer=bos_by_layer,
        bos_overlap_layer0=bos_by_layer[0], bos_overlap_at_layer=bos_by_layer[layer],
        bos_overlap_all_layers=detection["bos_overlap_all_layers"],
        first_image_token_overlap_by_layer=[d["first_image_share"] for d in detection["detection_by_layer"]],
        sink_strength=detection["sink_strength"], n_samples=cfg.n_samples,
        by_selection=by_selection, selection=sel, query_rows=rows,
        query_rows_compare=dict(other=other_rows, entry=effects[(at, 1, "score", sel, other_rows)]),
        by_path=by_path, fixed_bos={p: effects[(at, 1, p, "fixed", rows)] for p in ("value_zero", "value_mean")},
        by_layer=by_layer, multi_layer=dict(layers=list(multi), **effects[(multi, 1, "score", sel, rows)]),
        detection={k: v for k, v in detection.items() if k not in ("bos_overlap", "first_image_token_overlap",
                                                                     "measured_layers", "sink_strength")},
        layer=layer, n_keys=n_keys, heads=H, cfg_scale=cfg.cfg_scale, sampling_runs=1 + len(cache),
        baseline_accuracy=base["correct"].mean().item(),
        tests=dict(family_size=len(tests), correction="Holm-Bonferroni over the DDelta and accuracy-change sign-flip "
                                                      "tests of every setting above (p_holm, align_p_holm)"),
        paper=PAPER,
        metric_note="shift: paired evaluator-feature distance (LPIPS stand-in; *_l2: pixel RMS); align: evaluator "
                    "accuracy change vs the seed-paired baseline (CLIP-T stand-in); logprob: label log-probability",
        device=str(device))
    results["claims"] = make_claims(results)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    save_json(out / "results.json", results)
    figures(out, cfg, M, layer, n_ctx, trip, results)

    print_table([(s, k, f"{r['keys_removed_share']:.2f}", r["shift_sink"], r["shift_random"], r["shift_ratio"],
                  r["ddelta"], r["p_holm"], r["align_delta_sink"], r["align_p_holm"])
                 for s, d in by_selection.items() for k, r in d["by_k"].items()],
                ("protocol", "k", "keys", "shift sink", "shift rand", "ratio", "DDelta", "p_holm", "d acc sink",
                 "p_holm acc"))
    print()
    print_table([(str(r["layer"]), r["shift_sink"], r["shift_random"], r["align_delta_sink"], r["label_share"],
                  r["bos_share"]) for r in by_layer]
                + [("+".join(map(str, multi)), results["multi_layer"]["shift_sink"],
                    results["multi_layer"]["shift_random"], results["multi_layer"]["align_delta_sink"], "", "")],
                (f"layer (k=1, {sel})", "shift sink", "shift rand", "d acc sink", "top1 label", "top1 BOS"))
    print()
    print_table([(c["claim"][:70], f"{c['ours']:.4g}", c["reproduced"]) for c in results["claims"]],
                ("claim", "ours", "reproduced"))
    print()
    print_table([(f"bos_overlap (layers {results['measured_layers']})", results["bos_overlap"]),
                 ("bos_overlap, layer 0", results["bos_overlap_layer0"]),
                 ("first_image_token_overlap", results["first_image_token_overlap"]),
                 ("sink_strength (x uniform)", results["sink_strength"]),
                 ("top-1 switch rate across steps", detection["top1_switch_rate"]),
                 ("baseline accuracy", results["baseline_accuracy"]), ("seconds", results["seconds"])])
    print(f"wrote {out}/results.json and figures")
    return results


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python attention_sinks.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
