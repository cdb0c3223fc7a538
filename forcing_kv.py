"""Forcing-KV: hybrid KV-cache compression for autoregressive video diffusion.
Ji, Zhong, et al. (2026), arXiv 2605.09681. Official code: zju-jiyicheng/Forcing-KV.

Claim reproduced
    In a chunk-wise autoregressive video DiT (Self Forcing / LongLive), attention heads split into
    *static* heads that look at the last few frames and *dynamic* heads that look far back. Keep
    only the sink + the most recent frame for static heads, and add a small buffer of the
    most-changing (lowest key similarity) segments of the frames just evicted for dynamic heads: the
    cache shrinks and generation speeds up, more so as frames get more tokens, the video nearly unchanged.

Paper -> code
    chunk-causal video DiT, rotary frame positions . `VideoDiT`, `rotary`, `teacher_forcing_mask`
    teacher forcing on clean context ............... `train_video_model`
    Self Forcing rollout: S steps, then a clean pass  `rollout` (`rollout_reference`: no cache at all)
    Self Forcing's preallocated cache .............. `FullCache` (attends over the filled slice)
    head score s = mass(last 4) / mass(frames [3:]) . `RecordingCache`, `calibrate`, `type_heads` (s >= 0.8)
    static heads: sink + 1 recent frame (+ chunk) .. `CompressedCache.commit` (layer 0 too, untyped)
    dynamic heads: + lowest-similarity segments .... `segment_scores`, `CompressedCache.commit` (refilled
                                                      every step from that step's evicted frames)
    per-head variable-length attention .............. `attend` -> common/varlen_attention.py (reference,
                                                      gather + SDPA per head group, fused Triton kernel)

The official budgets (configs/forcing-kv/*.yaml, wan/modules/causal_model_forcingkv.py), in frames of
    N tokens: `sink_size: 1` (one frame), `spatial_context_length = temporal_context_length = 1`
    (one recent frame), `dynamic_context_length: 1` (a buffer of one frame's worth of segments:
    `sim_retention_ratio: 0.33` of the 3 frames evicted per step, cut into `num_frame_patch: 6`
    segments each; ours: SEGMENTS = 4, the rows of a 16 px frame). Layer 0 is never head-grouped
    and keeps the sink + the recent frame in every head. Heads are grouped after the clean pass of
    AR step `ar_start: 1`, so the buffer is first filled when step 2 commits (AR_START).
The official score geometry (configs_head/*.json, "naive_sink_3_thr08"): the attention mass of the
    chunk's queries on the last LAST_FRAMES = 4 key frames over the mass on key frames [3:] (the
    first chunk, sink included, left out: SKIP_FRAMES), recorded at AR step CALIB_STEP = 4 (15 key
    frames: 12 cached + the chunk's 3). A head with no preference scores 4 / (15 - 3) = 0.33.

Conventions (common/flow.py): t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, target eps - x;
    the paper (Self Forcing, Wan) uses the same direction. F frames per chunk, S Euler steps per
    chunk, N tokens per frame, H heads, L layers.

A model whose heads can specialise: it is trained on 24-frame clips, as long as the rollouts it
    generates (Self Forcing trains on its 21-frame rollouts); its frame index is relative (rotary on
    q and k, as Wan; positions inside a frame stay absolute); and every chunk is denoised against a
    nearly clean copy of the earlier chunks (t <= CONTEXT_NOISE), the context it gets at generation.

Deviations from the paper. Pixel-space moving shapes (16 px, patch 4) instead of Wan2.1 latents;
    teacher forcing (CausVid) instead of Self Forcing / DMD distillation; 4 segments per frame
    instead of 6; the segment choice is made per video (the official code scores batch element 0,
    at batch 1) on layer-1 keys of the dynamic heads and shared by all layers, as the official code
    does (layer 1 has no dynamic head: all its heads); the head score pools the S denoising steps of
    AR step 4 over the calibration videos (*reconstructed*: which calls of that step the official
    profile used). The official head_profile.py has SKIP_FIRST_K = 1 where the shipped head files
    say [3:]; we follow the head files. The model is trained at 16 px only: the larger frame sizes
    run the same weights on a larger token grid to measure cost (bytes, frames per second).

Run
    python forcing_kv.py                     # cpu preset: training once (cached), then the measurements
    python forcing_kv.py --preset gpu        # GPU (not measured yet)
    python forcing_kv.py --preset smoke      # seconds, what the tests run
    python forcing_kv.py --bench true        # chunk-attention benchmark: full SDPA / gather + SDPA / fused kernel
    python forcing_kv.py --attention triton  # generation through the fused kernel (CUDA; TRITON_INTERPRET=1 on CPU)
"""

# %% imports
import dataclasses
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from common import data as data_mod
from common import dit
from common.config import BaseConfig, UserError, cli, field, int_list, print_table, resolve_device, run_dir, save_json
from common.dit import SIZES, Block, attention_ref, modulate, patchify, sincos_2d, timestep_embedding
from common.flow import interpolate, velocity_target
from common.plot import plt, save_curves, save_image_panels
from common.sampler import autocast
from common.train import EMA, load_or_train, make_optimizer, optimizer_step
from common.varlen_attention import resolve_impl, run_bench, varlen_attention, varlen_attention_ref, varlen_groups

# %% config and presets

PATCH = 4  # 16 tokens per 16 px frame, 256 at 64 px
FRAMES_PER_CHUNK = 3  # F: Self Forcing's chunk of 3 latent frames
SEGMENTS = 4  # segments per frame for the dynamic buffer (official num_frame_patch: 6); one row at 16 px
AR_START = 1  # heads are grouped after this AR step's clean pass (official `ar_start: 1`, Self Forcing)
CALIB_STEP, SKIP_FRAMES, LAST_FRAMES = 4, 3, 4  # the official score: AR step 4, key frames [3:], last 4
CONTEXT_NOISE = 0.1  # training context chunks sit at t ~ U(0, 0.1): nearly clean, as at generation
TIMING_REPEATS = 3  # frames per second: the best of 3 rollouts per cache
KINDS = {"layer0": 0, "static": 1, "dynamic": 2}  # layer 0 is untyped; it keeps what static heads keep


@dataclasses.dataclass
class Config(BaseConfig):
    size: int = field(16, "frame side (px) of training and of the quality measurements")
    sizes: str = field("16,32,64", "frame sizes for the cost scaling (tokens per frame grow 16x from 16 to 64 px)")
    model: str = field("s", "DiT size (width, depth, heads; common/dit.py SIZES)", choices=tuple(SIZES))
    train_frames: int = field(24, "frames per training clip: as long as the rollouts (Self Forcing: 21)")
    steps: int = field(1200, "optimizer steps")
    batch: int = field(8, "training clips per step (each a 24-frame clip plus its clean context copy)")
    lr: float = field(2e-3, "AdamW learning rate (the base model's: tiny model, short run)")
    chunks: int = field(8, "chunks per rollout (F = 3 frames each)")
    sample_steps: int = field(4, "Euler steps per chunk (Self Forcing uses 4)")
    n_videos: int = field(8, "videos per cache and size (identical noise for every cache)")
    n_calib: int = field(8, "calibration rollouts for the offline head typing")
    threshold: float = field(0.8, "head score at or above which a head is static (the paper's 0.8)")
    recent: int = field(1, "most recent whole frames every compressed head keeps (official: 1)")
    buffer: int = field(1, "frames' worth of evicted segments each dynamic head keeps (official: 1)", min=0)
    attention: str = field("auto", "compressed-cache attention: torch, triton (fused kernel) or auto (triton on "
                           "CUDA when present, torch otherwise)", choices=("auto", "torch", "triton"))
    bench: bool = field(False, "only benchmark one chunk-attention call (full SDPA, gather + SDPA, fused kernel) "
                        "at several frame sizes and cache lengths; writes bench.json and fig_bench.png")

    def validate(self):
        for s in [self.size, *int_list(self.sizes, "--sizes", 8)]:
            if s % (2 * PATCH):  # N = (s / 4)^2 tokens must split into SEGMENTS equal segments
                raise UserError(f"frame sizes must be multiples of {2 * PATCH} (patch {PATCH}, {SEGMENTS} "
                                f"segments per frame), got {s}")
        calib = FRAMES_PER_CHUNK * (CALIB_STEP + 1)
        if self.train_frames % FRAMES_PER_CHUNK or self.train_frames < calib:
            raise UserError(f"--train-frames must be whole chunks of {FRAMES_PER_CHUNK} and at least the {calib} "
                            f"frames of the calibration rollouts, got {self.train_frames}")
        if self.chunks < 2:
            raise UserError("--chunks must be >= 2: a cache needs a chunk to remember")
        if self.recent > FRAMES_PER_CHUNK * self.chunks - 2:
            raise UserError(f"--recent {self.recent}: sink + recent frames must leave something to evict in a "
                            f"{FRAMES_PER_CHUNK * self.chunks}-frame rollout (at most {3 * self.chunks - 2})")
        if self.buffer > FRAMES_PER_CHUNK:
            raise UserError(f"--buffer {self.buffer}: the buffer is refilled from the {FRAMES_PER_CHUNK} frames "
                            f"evicted per step, so at most {FRAMES_PER_CHUNK}")
        if not 0 < self.threshold < 1:
            raise UserError(f"--threshold must lie in (0, 1), got {self.threshold}")
        if self.n_calib < 2 or self.sample_steps < 2:
            raise UserError("--n-calib and --sample-steps must be >= 2: head stability compares pairs")


PRESETS = {
    "smoke": dict(sizes="8,16", size=8, model="xs", train_frames=15, steps=6, batch=2, chunks=4, sample_steps=2,
                  n_videos=2, n_calib=2),
    "cpu": dict(),
    "gpu": dict(sizes="16,32,64,96", steps=4000, batch=32, n_videos=16, n_calib=16),
}


# %% model: a chunk-causal video DiT with rotary frame positions


def rotary(frames: torch.Tensor, Dh: int):
    """Rotary tables for integer frame indices (L,) -> cos, sin (L, Dh): channel pair i turns by
    frames * 10000^(-2i/Dh), so q . k depends on the frame offset only (Wan's temporal RoPE)."""
    ang = frames.float()[:, None] * 10000 ** (-torch.arange(0, Dh, 2, device=frames.device) / Dh)
    return ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)


def rotate(x, cos, sin):
    """x (B, H, L, Dh): each channel pair (a, b) -> (a cos - b sin, b cos + a sin)."""
    turned = torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
    return (x * cos + turned * sin).to(x.dtype)


def teacher_forcing_mask(clean, noisy, N: int) -> torch.Tensor:
    """Frame indices of a clean stream (Tc,) and a noisy one (Tn,) -> (L, L) bool, True = attend, over
    [clean tokens; noisy tokens]. A clean frame sees the clean frames of its own and earlier chunks
    (what the cache holds at generation); a noisy frame sees the clean frames of earlier chunks and
    the noisy frames of its own chunk (the chunk being denoised)."""
    chunk = torch.cat([clean, noisy]) // FRAMES_PER_CHUNK
    is_clean = torch.arange(len(chunk), device=chunk.device) < len(clean)
    q, k, cq, ck = chunk[:, None], chunk[None, :], is_clean[:, None], is_clean[None, :]
    mask = (ck & ((q > k) | (cq & (q == k)))) | (~cq & ~ck & (q == k))
    return mask.repeat_interleave(N, 0).repeat_interleave(N, 1)


def masked(mask):
    """An attention hook: SDPA under a fixed mask (training, and the no-cache reference)."""
    return lambda q, k, v, layer: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class VideoDiT(nn.Module):
    """Frames -> patches + 2-D sin-cos positions; common/dit.py Blocks with a per-token condition
    c = embed(t of the token's frame) + embed(label); q and k turned by the frame index (rotary)
    before every attention call, which goes through `hook(q, k, v, layer)`: where a KV cache plugs in."""

    def __init__(self, width=96, depth=4, heads=4, n_classes=9, channels=3):
        super().__init__()
        D, self.C, self.H, self.depth = width, channels, heads, depth
        self.patch_embed = nn.Linear(PATCH * PATCH * channels, D)
        self.t_embed = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embed = nn.Embedding(n_classes, D)
        self.blocks = nn.ModuleList([Block(D, heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final = nn.Linear(D, PATCH * PATCH * channels)
        for m in self.modules():  # DiT's init: xavier linears, zero adaLN and output (v = 0 at start)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for lin in [blk.ada[-1] for blk in self.blocks] + [self.final_ada[-1], self.final]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, t, y, frames, hook):
        """x: (B, T, C, S, S) at per-frame times t (B, T); frames (T,) their frame indices; y: (B,).
        -> velocity (B, T, C, S, S)."""
        B, T, C, S, _ = x.shape
        N, D = (S // PATCH) ** 2, self.final.in_features
        tok = self.patch_embed(patchify(x.flatten(0, 1), PATCH)).view(B, T, N, D)  # (B, T, N, D)
        tok = tok + sincos_2d(S // PATCH, D).to(x.device)  # where in the frame (absolute)
        c = self.t_embed(timestep_embedding(t.flatten(), D)).view(B, T, 1, D) + self.y_embed(y)[:, None, None]
        h, c = tok.flatten(1, 2), c.expand(B, T, N, D).flatten(1, 2)  # (B, T N, D) both
        cos, sin = rotary(frames.repeat_interleave(N), D // self.H)  # (T N, Dh): which frame (relative)
        roped = lambda q, k, v, layer: hook(rotate(q, cos, sin), rotate(k, cos, sin), v, layer)
        for i, blk in enumerate(self.blocks):
            h = blk(h, c, roped, i)
        shift, scale = self.final_ada(c).chunk(2, -1)
        out = self.final(modulate(self.final_norm(h), shift, scale))  # (B, T N, P P C)
        return rearrange(out, "b (t h w) (p q c) -> b t c (h p) (w q)", t=T, h=S // PATCH, p=PATCH, q=PATCH)


def make_model(cfg) -> VideoDiT:
    torch.manual_seed(cfg.seed)
    return VideoDiT(**SIZES[cfg.model])


def train_video_model(cfg, device) -> tuple[VideoDiT, dict]:
    """Teacher forcing (CausVid's, Self Forcing's baseline) on whole clips in one pass: every chunk is
    noised to its own logit-normal t and denoised against a nearly clean copy of the earlier chunks
    (`teacher_forcing_mask`), so the context looks like generation's: clean frames written by the
    clean pass. The copy of the last chunk is left out: nothing attends to it."""
    model = make_model(cfg)
    key = dict(kind="forcing_kv", version=2, data_version=data_mod.VERSION, model_version=dit.VERSION,
               context_noise=CONTEXT_NOISE,
               **{k: getattr(cfg, k) for k in ("size", "model", "train_frames", "steps", "batch", "lr", "seed")})
    T, ctx, n_chunks = cfg.train_frames, cfg.train_frames - FRAMES_PER_CHUNK, cfg.train_frames // FRAMES_PER_CHUNK

    def fit(model):
        model.to(device).train()
        g = torch.Generator().manual_seed(cfg.seed)
        opt, ema = make_optimizer(model, cfg.lr), EMA(model, 0.999)
        clean, noisy = torch.arange(ctx, device=device), torch.arange(T, device=device)
        mask = teacher_forcing_mask(clean, noisy, (cfg.size // PATCH) ** 2)
        bar = tqdm(range(cfg.steps), desc="video model", mininterval=2.0)
        for _ in bar:
            x, y = data_mod.moving_shapes(cfg.batch, T, cfg.size, g)
            t = torch.sigmoid(torch.randn(cfg.batch, n_chunks, generator=g))  # per-chunk logit-normal times
            t_ctx = CONTEXT_NOISE * torch.rand(cfg.batch, n_chunks - 1, generator=g)  # the context: nearly clean
            t = torch.cat([t_ctx, t], 1).repeat_interleave(FRAMES_PER_CHUNK, 1)  # (B, ctx + T)
            x2 = torch.cat([x[:, :ctx], x], 1)  # [clean copy; the clip], (B, ctx + T, C, S, S)
            eps = torch.randn(x2.shape, generator=g)
            x2, y, t, eps = x2.to(device), y.to(device), t.to(device), eps.to(device)
            xt = interpolate(x2.flatten(0, 1), eps.flatten(0, 1), t.flatten()).view_as(x2)
            v = model(xt, t, y, torch.cat([clean, noisy]), masked(mask))[:, ctx:]
            loss = (v - velocity_target(x2[:, ctx:], eps[:, ctx:])).pow(2).mean()
            optimizer_step(loss, model, opt, ema)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        ema.copy_to(model)

    info = load_or_train("forcing_kv", key, model, fit)
    return model.to(device).eval(), info


# %% attention over a per-head, variable-length cache


def attend(q, k_packed, v_packed, offsets, lengths, k_new, v_new, impl: str = "torch", groups=None):
    """The one attention call of every compressed cache: `reference` (a loop over (b, h) pairs),
    `torch` (gather + SDPA per group of equal-length heads, what the official code does) or
    `triton` (the fused kernel); all three live in common/varlen_attention.py."""
    if impl == "reference":
        return varlen_attention_ref(q, k_packed, v_packed, offsets, lengths, k_new, v_new)
    return varlen_attention(q, k_packed, v_packed, offsets, lengths, k_new, v_new, impl=impl, groups=groups)


# %% KV caches: full, and compressed (window, Forcing-KV and its ablations)


class FullCache:
    """Self Forcing's cache: per layer one buffer (B, H, frames N, Dh), allocated at the first call in
    the model's dtype. Each call writes the chunk's keys/values after the filled part (the clean
    pass's stay) and attends over the filled slice: no copy of the cache, ever."""

    def __init__(self, depth: int, frames: int):
        self.k, self.v, self.capacity, self.filled, self.phase = [None] * depth, [None] * depth, frames, 0, -1

    def write(self, k, v, layer):
        if self.k[layer] is None:
            shape = (*k.shape[:2], self.capacity * k.shape[2] // FRAMES_PER_CHUNK, k.shape[3])
            self.k[layer], self.v[layer] = k.new_empty(shape), v.new_empty(shape)
        end = self.filled + k.shape[2]
        assert end <= self.k[layer].shape[2], "the rollout is longer than the cache was allocated for"
        self.k[layer][:, :, self.filled:end], self.v[layer][:, :, self.filled:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attend(self, q, k, v, layer):
        return F.scaled_dot_product_attention(q, *self.write(k, v, layer))

    def commit(self, new: dict, frame0: int):
        """The clean pass has written the chunk {layer: (k, v) (B, H, F N, Dh)}: keep it."""
        self.filled += new[0][0].shape[2]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v if t is not None)


class RecordingCache(FullCache):
    """A full cache that also records, in the denoising steps of AR step CALIB_STEP, how much attention
    mass the chunk's queries put on each key frame, per (layer, head): the head-typing calibration."""

    def __init__(self, depth: int, frames: int):
        super().__init__(depth, frames)
        self.records = []  # (layer, denoising step, mass (B, H, key frames))

    def attend(self, q, k, v, layer):
        if self.phase < 0 or self.filled != CALIB_STEP * k.shape[2]:
            return super().attend(q, k, v, layer)
        K, V = self.write(k, v, layer)  # key frames: the cached ones and the chunk's own (Self Forcing)
        out, probs = attention_ref(q, K, V, return_probs=True)  # probs (B, H, Nq, keys)
        N = q.shape[2] // FRAMES_PER_CHUNK
        self.records.append((layer, self.phase, probs.sum(2).unflatten(-1, (-1, N)).sum(-1)))  # (B, H, frames)
        return out


class CompressedCache:
    """A per-head, variable-length cache that really stores fewer tokens. Per head, whole frames:
        static (and layer 0)  the sink frame + the `recent` newest frames;
        dynamic               the same + the buffer: `buffer` frames' worth of segments of the frames
                              evicted at the last step, the lowest key similarity to the next frame.
    Each layer is packed as common/varlen_attention.py documents (k, v (T, Dh) and offsets, lengths
    (B, H)), one block per head kind: block (B, G, n, Dh) holds the runs of its G heads, [sink;
    buffer; recent]. kinds: (L, H) ints of KINDS. select: which segments the buffer keeps -- 'low'
    (Forcing-KV), 'high' or 'random' (ablations)."""

    def __init__(self, kinds, recent: int, buffer: int, select="low", sink=True, impl="torch", seed=0):
        self.kinds, self.recent, self.buffer, self.select, self.sink = kinds, recent, buffer, select, sink
        self.impl = impl
        self.g = torch.Generator().manual_seed(seed)  # the random-segments ablation only
        self.layers = [None] * kinds.shape[0]  # per layer: kv (2, T, Dh), offsets, lengths, groups, blocks
        self.phase, self.sel = -1, None  # (B, nb) the buffer's segments among this step's candidates

    def attend(self, q, k, v, layer):
        c = self.layers[layer]
        if c is None:
            return F.scaled_dot_product_attention(q, k, v)
        return attend(q, c["kv"][0], c["kv"][1], c["offsets"], c["lengths"], k, v, self.impl, c["groups"])

    def cached(self, layer: int, b: int, h: int):
        """The cached (k, v) of pair (b, h): (n, Dh) each (host-side lengths: no sync)."""
        c = self.layers[layer]
        s, n = int(c["host"][0][b, h]), int(c["host"][1][b, h])
        return c["kv"][0, s:s + n], c["kv"][1, s:s + n]

    def commit(self, new: dict, frame0: int):
        """Write a chunk's clean keys/values {layer: (k, v) (B, H, F N, Dh)} and evict (step 2 and 3 of
        the method). Per head kind: the stream = [old recent frames; the chunk] (the sink frame taken
        out of the first chunk); the newest `recent` frames stay, the rest are this step's candidates,
        from which dynamic heads refill their buffer. All lengths are known on the host."""
        B, H, FN, Dh = new[0][0].shape
        N, seg = FN // FRAMES_PER_CHUNK, FN // FRAMES_PER_CHUNK // SEGMENTS
        refill = self.buffer > 0 and frame0 // FRAMES_PER_CHUNK > AR_START  # heads grouped after AR_START
        self.sel = None
        for layer, (kn, vn) in new.items():
            kv_new, old, kinds = torch.stack([kn, vn]), self.layers[layer], self.kinds[layer].tolist()
            runs, blocks = [], []
            for kind in sorted(set(kinds)):
                heads = [h for h in range(H) if kinds[h] == kind]
                fresh = kv_new[:, :, heads]  # (2, B, G, F N, Dh)
                if old is None:
                    sink, recent = fresh[..., :N if self.sink else 0, :], fresh[..., :0, :]
                    fresh = fresh[..., sink.shape[-2]:, :]
                else:
                    start, n_sink, n_buf, n_rec = next(b[1:] for b in old["blocks"] if b[0] == heads)
                    run = old["kv"][:, start:start + B * len(heads) * (n_sink + n_buf + n_rec)]
                    run = run.view(2, B, len(heads), -1, Dh)
                    sink, recent = run[..., :n_sink, :], run[..., n_sink + n_buf:, :]
                stream = torch.cat([recent, fresh], -2)  # oldest first
                n_cand = max(0, stream.shape[-2] - self.recent * N)  # the frames evicted at this step
                buf = stream[..., :0, :]
                if refill and n_cand and (kind == KINDS["dynamic"] or KINDS["dynamic"] not in kinds):
                    if layer == 1:  # scored once, on layer 1, shared by every layer (as the official code)
                        self.sel = self.choose(stream[0][..., :n_cand + N, :], N, min(self.buffer * N, n_cand) // seg)
                    if kind == KINDS["dynamic"] and self.sel is not None:
                        cand = stream[..., :n_cand, :].unflatten(-2, (-1, seg))  # (2, B, G, segments, seg, Dh)
                        idx = self.sel[None, :, None, :, None, None]
                        buf = cand.take_along_dim(idx.to(cand.device), dim=3).flatten(-3, -2)
                runs.append(torch.cat([sink, buf, stream[..., n_cand:, :]], -2))  # (2, B, G, n, Dh)
                blocks.append((heads, sum(r[0].numel() for r in runs[:-1]) // Dh, sink.shape[-2], buf.shape[-2],
                               stream.shape[-2] - n_cand))
            offsets, lengths = torch.zeros(B, H, dtype=torch.int32), torch.zeros(B, H, dtype=torch.int32)
            for heads, start, *parts in blocks:  # runs of a block are (b, head)-major, back to back
                n, G = sum(parts), len(heads)
                offsets[:, heads] = (start + (torch.arange(B)[:, None] * G + torch.arange(G)) * n).int()
                lengths[:, heads] = n
            dev = kn.device
            self.layers[layer] = dict(kv=torch.cat([r.flatten(1, 3) for r in runs], 1), blocks=blocks,
                                      offsets=offsets.to(dev), lengths=lengths.to(dev), host=(offsets, lengths),
                                      groups=varlen_groups(offsets, lengths, dev) if self.impl == "torch" else None)

    def choose(self, chain, N: int, nb: int):
        """chain (B, G, (f + 1) N, Dh): layer-1 keys of the f candidate frames and the frame after them.
        -> (B, nb) the segments (of f * SEGMENTS) the buffer keeps, oldest first."""
        score = segment_scores(chain, N)
        if self.select == "random":
            score = torch.rand(score.shape, generator=self.g).to(score.device)
        return score.topk(nb, dim=1, largest=self.select == "high").indices.sort(1).values

    def nbytes(self) -> int:
        """Bytes of every stored tensor: packed keys/values, offsets, lengths and the buffer's index."""
        n = sum(c[key].nbytes for c in self.layers if c is not None for key in ("kv", "offsets", "lengths"))
        return n + (self.sel.nbytes if self.sel is not None else 0)


def segment_scores(chain, N: int):
    """chain (B, G, (f + 1) N, Dh): keys of f frames and of the frame after them. -> (B, f SEGMENTS):
    the mean cosine similarity of each segment's keys (over all G heads) to the same positions one
    frame later. Low similarity = the region changed (the moving object): what dynamic heads keep."""
    k = rearrange(chain, "b g (f n) d -> b f n (g d)", n=N)
    sim = F.cosine_similarity(k[:, :-1], k[:, 1:], dim=-1)  # (B, f, N)
    return sim.unflatten(2, (SEGMENTS, -1)).mean(-1).flatten(1)


# %% generation, as Self Forcing does it


@torch.inference_mode()
def rollout(model, cache, y, noise, steps: int, bar=None):
    """Chunk by chunk: S Euler steps with the cache read-only, then one clean pass at t = 0 that
    writes the chunk's keys/values. noise: (B, T, C, S, S) -> video, same shape. bf16 on CUDA."""
    B, T = noise.shape[:2]
    grid, chunks = torch.linspace(1, 0, steps + 1), []
    with autocast(noise.device):
        for c0 in range(0, T, FRAMES_PER_CHUNK):
            frames = torch.arange(c0, c0 + FRAMES_PER_CHUNK, device=noise.device)
            x = noise[:, c0:c0 + FRAMES_PER_CHUNK]  # (B, F, C, S, S)
            for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
                cache.phase = i
                x = x + (t_next - t) * model(x, t.expand(B, FRAMES_PER_CHUNK).to(x), y, frames, cache.attend)
            cache.phase, new = -1, {}

            def write(q, k, v, layer, new=new):  # the clean pass attends too: the next layer's keys depend on it
                new[layer] = (k, v)
                return cache.attend(q, k, v, layer)

            model(x, torch.zeros(B, FRAMES_PER_CHUNK).to(x), y, frames, write)
            cache.commit(new, c0)
            chunks.append(x.float())
            if bar is not None:
                bar.update(1)
    return torch.cat(chunks, 1)


@torch.inference_mode()
def rollout_reference(model, y, noise, steps: int):
    """The same generation with no cache at all: every step reruns all earlier (clean, t = 0) frames
    under the teacher-forcing mask. Obviously right, quadratically slow."""
    B, T = noise.shape[:2]
    grid, video, N = torch.linspace(1, 0, steps + 1), noise[:, :0], (noise.shape[-1] // PATCH) ** 2
    for c0 in range(0, T, FRAMES_PER_CHUNK):
        x, frames = noise[:, c0:c0 + FRAMES_PER_CHUNK], torch.arange(c0 + FRAMES_PER_CHUNK)
        hook = masked(teacher_forcing_mask(frames[:c0], frames[c0:], N))
        for t, t_next in zip(grid[:-1], grid[1:]):
            times = torch.cat([torch.zeros(B, c0), t.expand(B, FRAMES_PER_CHUNK)], 1).to(x)
            x = x + (t_next - t) * model(torch.cat([video, x], 1), times, y, frames, hook)[:, c0:]
        video = torch.cat([video, x], 1)
    return video


# %% offline head typing (step 1 of the method)


def calibrate(model, cfg, device):
    """Full-cache calibration rollouts up to AR step CALIB_STEP. -> scores (L, H) pooled over videos
    and denoising steps, and per video (n, L, H) and per step (S, L, H) for the stability check."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    T = FRAMES_PER_CHUNK * (CALIB_STEP + 1)
    y = torch.randint(0, 9, (cfg.n_calib,), generator=g)
    noise = torch.randn(cfg.n_calib, T, 3, cfg.size, cfg.size, generator=g)
    cache = RecordingCache(model.depth, T)
    rollout(model, cache, y.to(device), noise.to(device), cfg.sample_steps)
    mass = torch.zeros(model.depth, cfg.sample_steps, cfg.n_calib, model.H, T)
    for layer, step, m in cache.records:
        mass[layer, step] = m.float().cpu()
    last, valid = mass[..., -LAST_FRAMES:].sum(-1), mass[..., SKIP_FRAMES:].sum(-1)  # (L, S, n, H)
    score = last.sum((1, 2)) / valid.sum((1, 2))  # s = mass(last 4 key frames) / mass(key frames [3:])
    return score, (last.sum(1) / valid.sum(1)).transpose(0, 1), (last.sum(2) / valid.sum(2)).transpose(0, 1)


def type_heads(score, threshold: float):
    """(L, H) scores -> (L, H) kinds: static where s >= threshold, dynamic otherwise; layer 0 untyped."""
    kinds = torch.where(score >= threshold, KINDS["static"], KINDS["dynamic"])
    kinds[0] = KINDS["layer0"]
    return kinds


def label_agreement(scores, threshold: float) -> float:
    """scores (n, L, H) over n draws: the mean share of draws that give a head (layers >= 1) the label
    most draws give it. 1 = labels never change (also trivially when all heads sit on one side)."""
    static = (scores[:, 1:] >= threshold).float().mean(0)
    return torch.maximum(static, 1 - static).mean().item()


def rank_corr(scores) -> float:
    """scores (n, L, H) over n draws (videos or denoising steps): Spearman's correlation of the typed
    heads' (layers >= 1) scores between two draws, averaged over all pairs. 1 = every draw orders the
    heads the same way; about 0 = the order is noise."""
    r = scores[:, 1:].flatten(1).argsort(1).argsort(1).float()  # (n, heads) ranks
    r = r - r.mean(1, keepdim=True)
    r = r / r.norm(dim=1, keepdim=True)
    n = r.shape[0]
    return (((r @ r.T).sum() - n) / (n * (n - 1))).item()


def make_caches(cfg, kinds, depth: int, frames: int, impl: str) -> dict:
    """Every cache compared, from one set of head types. The window keeps sink + W recent frames in
    every head, W chosen so that it keeps at least as many tokens as Forcing-KV."""
    dyn = (kinds[1:] == KINDS["dynamic"]).float().mean().item()
    window = math.ceil(cfg.recent + cfg.buffer * dyn)
    shuffled = kinds.clone()
    g = torch.Generator().manual_seed(cfg.seed + 2)
    shuffled[1:] = kinds[1:].flatten()[torch.randperm(kinds[1:].numel(), generator=g)].view_as(kinds[1:])

    def compressed(k, recent=cfg.recent, buffer=cfg.buffer, **kw):
        return lambda: CompressedCache(k, recent, buffer, impl=impl, seed=cfg.seed, **kw)

    return {"full": lambda: FullCache(depth, frames),
            "window": compressed(torch.full_like(kinds, KINDS["static"]), recent=window, buffer=0),
            "forcing_kv": compressed(kinds), "random_heads": compressed(shuffled),
            "random_segments": compressed(kinds, select="random"), "high_similarity": compressed(kinds, select="high"),
            "no_sink": compressed(kinds, recent=cfg.recent + 1, sink=False)}  # the same budget, no sink


# %% measurements


def video_stats(video):
    """video (B, T, C, S, S) in [-1, 1] -> lit mask (B, T, S, S), centroid (B, T, 2) in frame sides,
    mean colour of the lit pixels (B, T, 3) in [0, 1], and the lit area (B, T) in frame areas."""
    lit = video.amax(2) > 0  # the background is black: a lit pixel belongs to an object
    w = lit.float()
    coords = (torch.arange(video.shape[-1]) + 0.5) / video.shape[-1]
    area = w.sum((2, 3)).clamp(min=1)
    centroid = torch.stack([(w.sum(2) * coords).sum(2), (w.sum(3) * coords).sum(2)], -1) / area[..., None]
    colour = ((video + 1) / 2 * w[:, :, None]).sum((3, 4)) / area[..., None]
    return lit, centroid, colour, w.mean((2, 3))


def compare(video, ref) -> dict:
    """Quality of a rollout against the full-cache rollout from the same noise."""
    mse = (video - ref).pow(2).flatten(1).mean(1)
    _, c, col, _ = video_stats(video)
    _, c_ref, _, _ = video_stats(ref)
    step = (video[:, 1:] - video[:, :-1]).abs().flatten(2).mean(2)  # (B, T-1) frame-to-frame change
    boundary = step[:, FRAMES_PER_CHUNK - 1::FRAMES_PER_CHUNK]  # transitions from one chunk into the next
    return dict(psnr=(10 * torch.log10(4 / mse.clamp(min=1e-12))).mean().item(),  # range 2 ([-1, 1])
                traj_err=(c - c_ref).norm(dim=-1).mean().item(),  # in frame sides
                drift=(col - col[:, :1]).norm(dim=-1).mean().item(),  # colour distance to frame 0
                discontinuity=(boundary.amax(1) / step.mean(1)).mean().item())


def full_quality(video) -> dict:
    """The gate before any cache comparison: does the full-cache video keep its object?"""
    _, _, col, area = video_stats(video)
    dominant = col.argmax(-1)  # (B, T)
    first, last = area[:, :FRAMES_PER_CHUNK].mean(), area[:, -FRAMES_PER_CHUNK:].mean()
    return dict(colour_kept=(dominant == dominant[:, :1]).float().mean().item(),
                area_drift=((last - first) / first).item())


def eval_inputs(cfg, size: int, n: int, device):
    """Labels (n,) and the rollout noise (n, T, C, size, size): the same for every cache."""
    g = torch.Generator().manual_seed(cfg.seed + 3)
    y = torch.randint(0, 9, (n,), generator=g)
    return y.to(device), torch.randn(n, cfg.chunks * FRAMES_PER_CHUNK, 3, size, size, generator=g).to(device)


def measure_size(model, cfg, kinds, size: int, impl: str, device, n_videos: int) -> tuple[dict, dict]:
    """Every cache at one frame size, from identical noise: quality against the full cache, bytes at
    the end, frames per second after a warm-up (the best of TIMING_REPEATS rollouts, taken in turn,
    because on a shared machine other work only ever slows a rollout down). -> (metrics, videos)."""
    y, noise = eval_inputs(cfg, size, n_videos, device)
    T = noise.shape[1]
    caches = make_caches(cfg, kinds, model.depth, T, impl)
    rows, videos, seconds = {}, {}, {name: [] for name in caches}
    bar = tqdm(total=len(caches) * (1 + TIMING_REPEATS * cfg.chunks), desc=f"caches at {size}px", leave=False)
    for name, make in caches.items():
        warm = FullCache(model.depth, FRAMES_PER_CHUNK) if name == "full" else make()
        rollout(model, warm, y, noise[:, :FRAMES_PER_CHUNK], cfg.sample_steps, bar)
    for _ in range(TIMING_REPEATS):
        for name, make in caches.items():
            cache = make()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            video = rollout(model, cache, y, noise, cfg.sample_steps, bar)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - t0)
            videos[name], rows[name] = video.cpu(), dict(cache_bytes=cache.nbytes())  # the same each time
    bar.close()
    for name in caches:
        q = compare(videos[name], videos["full"])
        if name == "full":
            q.update(psnr=None, traj_err=0.0)  # the reference itself
        rows[name] = {**q, **rows[name], "fps": n_videos * T / min(seconds[name])}
    return rows, videos


def threshold_sweep(model, cfg, score, full_video, full_bytes: int, impl, device) -> dict:
    """Forcing-KV at thresholds 0.6-0.9: the static share, and what it costs in PSNR and bytes."""
    y, noise = eval_inputs(cfg, cfg.size, cfg.n_videos, device)
    rows = {}
    for thr in (0.6, 0.7, 0.8, 0.9):
        kinds = type_heads(score, thr)
        cache = make_caches(cfg, kinds, model.depth, noise.shape[1], impl)["forcing_kv"]()
        video = rollout(model, cache, y, noise, cfg.sample_steps).cpu()
        rows[str(thr)] = dict(static_fraction=(kinds[1:] == KINDS["static"]).float().mean().item(),
                              psnr=compare(video, full_video)["psnr"], memory_ratio=cache.nbytes() / full_bytes)
    return rows


def claims(res: dict) -> list:
    """The paper's headline claims that this run tests, each decided by its criterion on a stored number."""
    big = max(res["speedup_by_size"], key=int)
    table = [  # (claim, the paper's number, key in results.json, criterion on {v})
        ("a share of heads is static (s >= 0.8)", "about 40% (37-43% in the shipped head files)",
         "static_fraction", "0.15 <= {v} <= 0.85"),
        ("head scores are stable across samples", "stable (no number)", "head_score_rank_corr.samples", "{v} >= 0.8"),
        ("head scores are stable across denoising steps", "stable (no number)", "head_score_rank_corr.steps",
         "{v} >= 0.8"),
        ("the cache shrinks", "0.7x (30% less memory)", "memory_ratio_max", "{v} <= 0.7"),
        ("generation speeds up at the largest frame", "1.35-1.5x at 480p", f"speedup_by_size.{big}", "{v} >= 1.3"),
        ("the speed-up grows with tokens per frame", "1.5x at 480p -> 2.82x at 1080p", "speedup_growth_min",
         "{v} > 1"),
        ("quality kept: better than a window of the same bytes (PSNR vs full, dB)", "VBench 84.41 -> 84.60",
         "psnr_gain_over_window_db", "{v} >= 0"),
        ("lowest-similarity segments beat random and highest (PSNR, dB)", "the method's choice",
         "segment_choice_gain_db", "{v} > 0"),
    ]
    out = []
    for claim, paper, key, crit in table:
        v = res
        for part in key.split("."):
            v = v[part]
        out.append(dict(claim=claim, paper=paper, ours=v, key=key, criterion=crit.format(v=key),
                        reproduced=bool(eval(crit.format(v=repr(v)))), note=f"cpu preset toy, {res['device']}"))
    return out


# %% figures


def figures(out, cfg, videos, score, kinds, res):
    order = ("full", "window", "forcing_kv")
    frames = torch.cat([videos[name][i] for i in range(min(2, cfg.n_videos)) for name in order])
    save_image_panels([(" / ".join(order) + ", video 1 then 2", frames)], out / "fig_filmstrip.png",
                      nrow=cfg.chunks * FRAMES_PER_CHUNK,
                      title=f"same noise, {cfg.chunks} chunks of {FRAMES_PER_CHUNK} frames at {cfg.size}px")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.hist(score[1:].flatten().numpy(), bins=20, range=(0, 1), color="grey")
    ax1.axvline(cfg.threshold, color="k", ls="--", lw=1, label=f"threshold {cfg.threshold}")
    ax1.axvline(res["score_uniform_reference"], color="tab:blue", lw=1, label="no preference: 4 / 12")
    ax1.set(xlabel="s = mass(last 4 key frames) / mass(key frames [3:])", ylabel="heads (layers >= 1)",
            title=f"head scores at AR step {CALIB_STEP}")
    ax1.legend(fontsize=7)
    ax2.imshow(score.numpy(), vmin=0, vmax=1, cmap="coolwarm_r")
    for (l, h), k in zip(torch.cartesian_prod(torch.arange(score.shape[0]), torch.arange(score.shape[1])).tolist(),
                         kinds.flatten().tolist()):
        ax2.text(h, l, f"{'LSD'[k]}\n{score[l, h]:.2f}", ha="center", va="center", fontsize=7)
    ax2.set(xlabel="head", ylabel="layer", title="L layer 0 (untyped), S static, D dynamic")
    fig.tight_layout()
    fig.savefig(out / "fig_head_types.png", dpi=120)
    plt.close(fig)
    sizes = sorted(int(s) for s in res["by_size"])
    tokens, curves = [(s // PATCH) ** 2 for s in sizes], {}
    for name in ("forcing_kv", "window"):
        rows = [res["by_size"][str(s)] for s in sizes]
        curves[f"speed-up, {name} / full"] = (tokens, [r[name]["fps"] / r["full"]["fps"] for r in rows])
        curves[f"memory, {name} / full"] = (tokens, [r[name]["cache_bytes"] / r["full"]["cache_bytes"] for r in rows])
    save_curves(curves, out / "fig_scaling.png", "tokens per frame", "ratio to the full cache",
                f"after {cfg.chunks * FRAMES_PER_CHUNK} frames (sizes {', '.join(map(str, sizes))} px)", logx=True)


# %% run


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    impl = resolve_impl(cfg.attention, device)
    out = run_dir(cfg, "forcing_kv")
    if cfg.bench:  # the kernel benchmark (common/varlen_attention.py); no model needed
        res = run_bench(out, device)
        print_table([(r["size"], r["cache_frames"], r["kept_fraction"], r["ms_full_sdpa"], r["ms_gather_sdpa"],
                      r.get("ms_fused", "skipped"), r.get("fused_TFLOPs", "-")) for r in res["rows"]],
                    ("frame", "cache frames", "kept", "ms full SDPA", "ms gather+SDPA", "ms fused", "fused TFLOP/s"))
        print(f"{res['device']}: {res['fused_note']}\nwrote {out}/bench.json and fig_bench.png")
        return res
    model, info = train_video_model(cfg, device)
    score, per_sample, per_step = calibrate(model, cfg, device)
    kinds = type_heads(score, cfg.threshold)
    by_size, videos = {}, None
    for size in sorted(set(int_list(cfg.sizes, "--sizes", 8)) | {cfg.size}):
        # Quality is measured at --size, where the model was trained; the larger sizes measure cost,
        # and two videos are enough for bytes and frames per second.
        n = cfg.n_videos if size == cfg.size else min(2, cfg.n_videos)
        by_size[str(size)], v = measure_size(model, cfg, kinds, size, impl, device, n)
        videos = v if size == cfg.size else videos
    rows = by_size[str(cfg.size)]
    speedup = {s: r["forcing_kv"]["fps"] / r["full"]["fps"] for s, r in by_size.items()}
    memory = {s: r["forcing_kv"]["cache_bytes"] / r["full"]["cache_bytes"] for s, r in by_size.items()}
    ordered = [speedup[s] for s in sorted(speedup, key=int)]
    res = dict(
        static_fraction=(kinds[1:] == KINDS["static"]).float().mean().item(),
        static_fraction_by_threshold={f"{thr:.1f}": (score[1:] >= thr).float().mean().item()
                                      for thr in torch.arange(0.3, 0.95, 0.1).tolist()},
        score_uniform_reference=LAST_FRAMES / (FRAMES_PER_CHUNK * (CALIB_STEP + 1) - SKIP_FRAMES),
        score_geometry=dict(ar_step=CALIB_STEP, key_frames=FRAMES_PER_CHUNK * (CALIB_STEP + 1),
                            skipped=SKIP_FRAMES, last=LAST_FRAMES),
        head_score_rank_corr=dict(samples=rank_corr(per_sample), steps=rank_corr(per_step)),
        head_label_agreement=dict(samples=label_agreement(per_sample, cfg.threshold),
                                  steps=label_agreement(per_step, cfg.threshold)),
        head_scores=score.tolist(), head_types=[["LSD"[k] for k in row] for row in kinds.tolist()],
        threshold_sweep=threshold_sweep(model, cfg, score, videos["full"], rows["full"]["cache_bytes"], impl, device),
        full_quality=full_quality(videos["full"]),
        by_size=by_size, speedup_by_size=speedup, memory_ratio_by_size=memory, memory_ratio_max=max(memory.values()),
        speedup_growth_min=min(b / a for a, b in zip(ordered[:-1], ordered[1:])) if len(ordered) > 1 else 1.0,
        window_memory_over_forcing_kv=rows["window"]["cache_bytes"] / rows["forcing_kv"]["cache_bytes"],
        psnr_gain_over_window_db=rows["forcing_kv"]["psnr"] - rows["window"]["psnr"],
        segment_choice_gain_db=rows["forcing_kv"]["psnr"] - max(rows[k]["psnr"] for k in ("random_segments",
                                                                                          "high_similarity")),
        attention=impl, device=str(device),
        train_seconds=0.0 if info["cached"] else round(info["train_seconds"], 1),
        model_train_seconds=round(info["train_seconds"], 1),
        metric_note="psnr, traj_err (centroid distance in frame sides) against the full-cache video from the same "
                    "noise; drift: colour distance of the lit pixels to frame 0; discontinuity: largest change at a "
                    "chunk boundary over the mean frame-to-frame change; sizes above --size are cost measurements "
                    "(the model is trained at --size only)",
    )
    res["claims"] = claims(res)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    save_json(out / "results.json", res)
    figures(out, cfg, videos, score, kinds, res)
    print_table([(f"{s}px {name}", r["psnr"] if r["psnr"] is not None else "ref", r["traj_err"], r["drift"],
                  r["discontinuity"], r["cache_bytes"] / rows_["full"]["cache_bytes"], r["fps"])
                 for s, rows_ in by_size.items() for name, r in rows_.items()],
                ("cache", "PSNR", "traj err", "drift", "discont.", "memory", "fps"))
    print()
    print_table([(c["claim"], c["paper"], c["ours"], c["criterion"], c["reproduced"]) for c in res["claims"]],
                ("claim", "paper", "ours", "criterion", "reproduced"))
    print()
    print_table([("head scores (layers >= 1) min / max", f"{score[1:].min():.2f} / {score[1:].max():.2f} (no "
                                                         f"preference: {res['score_uniform_reference']:.2f})"),
                 ("full cache: colour kept / area drift", f"{res['full_quality']['colour_kept']:.3f} / "
                                                          f"{res['full_quality']['area_drift']:.3f}"),
                 ("train seconds (this run)", res["train_seconds"]), ("seconds", res["seconds"])])
    print(f"wrote {out}/results.json and figures")
    return res


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python forcing_kv.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
