"""Forcing-KV: hybrid KV-cache compression for autoregressive video diffusion.
Ji, Zhong, et al. (2026), arXiv 2605.09681. Official code: zju-jiyicheng/Forcing-KV.

Claim reproduced
    In a chunk-wise autoregressive video DiT (Self Forcing / LongLive), attention heads split into
    *static* heads that look at the last few frames and *dynamic* heads that look far back. Keep
    only sink + recent frames for static heads, and add a small buffer of the most-changing
    (lowest key similarity) segments of evicted frames for dynamic heads: the cache shrinks and
    generation speeds up, more so as frames get more tokens, with the video nearly unchanged.

Paper -> code
    chunk-causal video DiT, teacher forcing ........ `VideoDiT`, `block_causal_mask`, `train_video_model`
    Self Forcing rollout: S steps, then a clean pass  `rollout` (`rollout_reference`: no cache at all)
    head score s = mass(last 4) / mass(after sink) . `RecordingCache`, `calibrate`, `type_heads` (s >= 0.8)
    static heads: sink + recent frames .............. `CompressedCache.commit` (whole frames)
    dynamic heads: + lowest-similarity segments ..... `segment_scores`, `CompressedCache.commit`
    per-head variable-length attention .............. `attend` -> common/varlen_attention.py (reference,
                                                      gather + SDPA per head group, fused Triton kernel)

Conventions (common/flow.py): t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, target eps - x;
    the paper (Self Forcing, Wan) uses the same direction. F frames per chunk, S Euler steps per
    chunk, N tokens per frame, H heads, L layers.

Levers for a good video (the issue's gate), and why: the class label conditions every token (as a
    text prompt does in Self Forcing), so identity comes from the prompt and the cache carries
    position and motion; and per-chunk independent logit-normal times in training (Diffusion
    Forcing's noisy context), with a quarter of the chunks clean, so the model sees both the clean
    context it gets at generation and corrupted context that teaches it not to copy drift forward.
    A random frame-index offset in training covers the frame indices of long rollouts.

Deviations from the paper. Pixel-space moving shapes (16 px, patch 4) instead of Wan2.1 latents;
    teacher forcing with noisy context instead of Self Forcing / DMD distillation; one frame of
    sink (LongLive keeps 3); segments are one row of patches; the segment choice is scored on
    layer 1 keys averaged over heads and shared by all layers (the official code scores at layer
    1 too; *reconstructed*: the exact averaging); layer 0 stays uncompressed in every compressed
    cache, the window included. The model is trained at 16 px only: the larger frame sizes run
    the same weights on a larger token grid to measure cost (bytes, frames per second); their
    quality numbers come from a regime the model was never trained in.

Measured (cpu preset; README): every compressed cache holds 0.41x the full cache's bytes after
    24 frames; Forcing-KV is 0.60x / 0.97x / 1.39x as fast as the full cache at 16 / 32 / 64 px and
    1.6 dB closer to it (PSNR) than a window of the same size; lowest-similarity segments beat random
    and highest-similarity ones. Not reproduced: no head scores >= 0.8 here, so all are dynamic.

Run
    python forcing_kv.py                     # cpu preset: training 659 s once (cached), then 138 s (2 CPU cores)
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
from common.train import EMA, load_or_train, make_optimizer, optimizer_step
from common.varlen_attention import resolve_impl, run_bench, varlen_attention, varlen_attention_ref

# %% config and presets


@dataclasses.dataclass
class Config(BaseConfig):
    size: int = field(16, "frame side (px) of training and of the quality measurements")
    sizes: str = field("16,32,64", "frame sizes for the cost scaling (tokens per frame grow 16x from 16 to 64 px)")
    model: str = field("s", "DiT size (width, depth, heads; common/dit.py SIZES)", choices=tuple(SIZES))
    train_frames: int = field(9, "frames per training clip (3 chunks): rollouts run longer, to show drift")
    steps: int = field(1600, "optimizer steps (659 s on 2 CPU cores at batch 32)")
    batch: int = field(32, "training clips per step")
    lr: float = field(2e-3, "AdamW learning rate (the base model's: tiny model, short run)")
    chunks: int = field(8, "chunks per rollout (F = 3 frames each); longer than the training clips")
    sample_steps: int = field(4, "Euler steps per chunk (Self Forcing uses 4)")
    n_videos: int = field(8, "videos per cache and size (identical noise for every cache)")
    n_calib: int = field(8, "calibration rollouts for the offline head typing")
    threshold: float = field(0.8, "head score at or above which a head is static (the paper's 0.8)")
    recent: int = field(3, "most recent whole frames every compressed head keeps (one chunk)")
    buffer: int = field(1, "frames' worth of evicted segments each dynamic head keeps (about one in the paper)")
    attention: str = field("auto", "compressed-cache attention: torch, triton (fused kernel) or auto (triton on "
                           "CUDA when present, torch otherwise)", choices=("auto", "torch", "triton"))
    bench: bool = field(False, "only benchmark one chunk-attention call (full SDPA, gather + SDPA, fused kernel) "
                        "at several frame sizes and cache lengths; writes bench.json and fig_bench.png")

    def validate(self):
        for s in [self.size, *int_list(self.sizes, "--sizes", 8)]:
            if s < 8 or s % PATCH:
                raise UserError(f"frame sizes must be >= 8 and divisible by the patch size {PATCH}, got {s}")
        if self.train_frames % FRAMES_PER_CHUNK:
            raise UserError(f"--train-frames must be a multiple of {FRAMES_PER_CHUNK} (whole chunks)")
        if self.chunks < 2:
            raise UserError("--chunks must be >= 2: a cache needs a chunk to remember")
        if not 0 < self.threshold < 1:
            raise UserError(f"--threshold must lie in (0, 1), got {self.threshold}")


PRESETS = {
    "smoke": dict(sizes="8,16", size=8, model="xs", train_frames=6, steps=6, batch=4, chunks=4, sample_steps=2,
                  n_videos=2, n_calib=2),
    "cpu": dict(),
    "gpu": dict(sizes="16,32,64,96", steps=6000, batch=64, n_videos=16, n_calib=16),
}
PATCH = 4  # 16 tokens per 16 px frame, 256 at 64 px
FRAMES_PER_CHUNK = 3  # F: Self Forcing's chunk of 3 latent frames
MAX_FRAME = 48  # training clips start at a random frame index below MAX_FRAME - train_frames
SINK = 0  # the sink is the first frame
TIMING_REPEATS = 3  # frames per second: the best of 3 rollouts per cache


# %% data: moving shapes


def fold(x, lo, hi):
    """Reflect x into [lo, hi]: an object moving at constant velocity bouncing off two walls."""
    span = hi - lo
    y = torch.remainder(x - lo, 2 * span)
    return lo + span - (y - span).abs()


def moving_shapes(n: int, frames: int, size: int, g: torch.Generator):
    """n videos (n, frames, 3, size, size) in [-1, 1] and labels (n,) = 3 * shape + colour.
    One or two objects of one shape and colour per video (the identity a long rollout must keep),
    each with its own radius, start and constant velocity, bouncing off the frame's edges."""
    shape, colour = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    two = torch.rand(n, generator=g) < 0.5
    r = size * (0.13 + 0.08 * torch.rand(n, 2, generator=g))  # (n, 2) pixels
    lo, hi = 1.25 * r + 1, size - 1.25 * r - 1  # keep the triangle apex inside
    start = lo[..., None] + (hi - lo)[..., None] * torch.rand(n, 2, 2, generator=g)  # (n, obj, xy)
    angle = 2 * math.pi * torch.rand(n, 2, generator=g)
    speed = size * (0.03 + 0.05 * torch.rand(n, 2, generator=g))  # 0.5-1.3 px per frame at 16 px
    vel = speed[..., None] * torch.stack([angle.cos(), angle.sin()], -1)
    f = torch.arange(frames, dtype=torch.float32)[:, None, None, None]  # (T, 1, 1, 1)
    pos = fold(start + f * vel, lo[..., None], hi[..., None])  # (T, n, obj, xy)
    video = -torch.ones(frames, n, 3, size, size)
    for j in range(2):
        for t in range(frames):
            img = data_mod.render_shapes(shape, colour, pos[t, :, j, 0], pos[t, :, j, 1], r[:, j], size)
            keep = (two | (j == 0))[:, None, None, None]
            video[t] = torch.where(keep, torch.maximum(video[t], img), video[t])
    return video.transpose(0, 1).contiguous(), 3 * shape + colour


# %% model: a chunk-causal video DiT


def sincos_1d(idx: torch.Tensor, D: int) -> torch.Tensor:
    """Fixed sinusoidal features of integer frame indices (T,) -> (T, D); defined for any index,
    so rollouts longer than anything seen in training still run."""
    freqs = 1.0 / 10000 ** (torch.arange(D // 2, device=idx.device) / (D // 2))
    ang = idx.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], 1)


def block_causal_mask(frames: int, N: int, device=None) -> torch.Tensor:
    """(T N, T N) bool, True = attend: a token sees every token of its own chunk and of earlier
    chunks (the mask of the whole-clip teacher-forcing pass and of the no-cache reference)."""
    chunk = torch.arange(frames, device=device).repeat_interleave(N) // FRAMES_PER_CHUNK
    return chunk[:, None] >= chunk[None, :]


class VideoDiT(nn.Module):
    """Frames -> patches + 2-D sin-cos positions + a frame-index embedding; common/dit.py Blocks with
    a per-token condition c = embed(t of the token's frame) + embed(label); every attention call
    goes through `hook(q, k, v, layer)`, which is where a KV cache plugs in."""

    def __init__(self, width=96, depth=4, heads=4, n_classes=9, channels=3):
        super().__init__()
        D, self.C, self.H, self.depth = width, channels, heads, depth
        self.patch_embed = nn.Linear(PATCH * PATCH * channels, D)
        self.frame_embed = nn.Linear(D, D)  # learned map of sinusoidal frame-index features
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

    def forward(self, x, t, y, frame0: int = 0, hook=None):
        """x: (B, T, C, S, S) frames frame0 .. frame0 + T - 1 at per-frame times t (B, T); y: (B,).
        -> velocity (B, T, C, S, S). Without a hook, the T frames attend block-causally."""
        B, T, C, S, _ = x.shape
        N, D = (S // PATCH) ** 2, self.final.in_features
        tok = self.patch_embed(patchify(x.flatten(0, 1), PATCH)).view(B, T, N, D)  # (B, T, N, D)
        tok = tok + sincos_2d(S // PATCH, D).to(x.device)  # where in the frame
        frames = torch.arange(frame0, frame0 + T, device=x.device)
        tok = tok + self.frame_embed(sincos_1d(frames, D))[:, None]  # which frame
        c = self.t_embed(timestep_embedding(t.flatten(), D)).view(B, T, 1, D) + self.y_embed(y)[:, None, None]
        h, c = tok.flatten(1, 2), c.expand(B, T, N, D).flatten(1, 2)  # (B, T N, D) both
        if hook is None:
            mask = block_causal_mask(T, N, x.device)
            hook = lambda q, k, v, layer: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        for i, blk in enumerate(self.blocks):
            h = blk(h, c, hook, i)
        shift, scale = self.final_ada(c).chunk(2, -1)
        out = self.final(modulate(self.final_norm(h), shift, scale))  # (B, T N, P P C)
        return rearrange(out, "b (t h w) (p q c) -> b t c (h p) (w q)", t=T, h=S // PATCH, p=PATCH, q=PATCH)


def make_model(cfg) -> VideoDiT:
    torch.manual_seed(cfg.seed)
    return VideoDiT(**SIZES[cfg.model])


def train_video_model(cfg, device) -> tuple[VideoDiT, dict]:
    """Teacher forcing on whole clips in one pass (block-causal mask), with Diffusion Forcing's
    independent per-chunk times: each chunk is noised to its own logit-normal t, and a quarter of
    the chunks are clean (t = 0, the context seen at generation; no loss on them)."""
    model = make_model(cfg)
    key = dict(kind="forcing_kv", version=1, data_version=data_mod.VERSION, model_version=dit.VERSION,
               **{k: getattr(cfg, k) for k in ("size", "model", "train_frames", "steps", "batch", "lr", "seed")})

    def fit(model):
        model.to(device).train()
        g = torch.Generator().manual_seed(cfg.seed)
        opt, ema = make_optimizer(model, cfg.lr), EMA(model, 0.999)
        n_chunks = cfg.train_frames // FRAMES_PER_CHUNK
        bar = tqdm(range(cfg.steps), desc="video model", mininterval=2.0)
        for _ in bar:
            x, y = moving_shapes(cfg.batch, cfg.train_frames, cfg.size, g)
            t = torch.sigmoid(torch.randn(cfg.batch, n_chunks, generator=g))  # per-chunk logit-normal times
            clean = torch.rand(cfg.batch, n_chunks, generator=g) < 0.25
            t = torch.where(clean, 0.0, t).repeat_interleave(FRAMES_PER_CHUNK, 1)  # (B, T)
            frame0 = int(torch.randint(0, MAX_FRAME - cfg.train_frames + 1, (1,), generator=g))
            eps = torch.randn(x.shape, generator=g)
            x, y, t, eps = x.to(device), y.to(device), t.to(device), eps.to(device)
            xt = interpolate(x.flatten(0, 1), eps.flatten(0, 1), t.flatten()).view_as(x)
            v = model(xt, t, y, frame0)
            per_frame = (v - velocity_target(x, eps)).pow(2).flatten(2).mean(2)  # (B, T)
            weight = (t > 0).float()
            loss = (per_frame * weight).sum() / weight.sum().clamp(min=1)
            optimizer_step(loss, model, opt, ema)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        ema.copy_to(model)

    info = load_or_train("forcing_kv", key, model, fit)
    return model.to(device).eval(), info


# %% attention over a per-head, variable-length cache


def attend(q, k_packed, v_packed, offsets, lengths, k_new, v_new, impl: str = "torch"):
    """The one attention call of every compressed cache: `reference` (a loop over (b, h) pairs),
    `torch` (gather + SDPA per group of equal-length heads, what the official code does) or
    `triton` (the fused kernel); all three live in common/varlen_attention.py."""
    if impl == "reference":
        return varlen_attention_ref(q, k_packed, v_packed, offsets, lengths, k_new, v_new)
    return varlen_attention(q, k_packed, v_packed, offsets, lengths, k_new, v_new, impl=impl)


# %% KV caches: full, and compressed (window, Forcing-KV and its ablations)


class FullCache:
    """Self Forcing's growing cache: every frame's keys/values, contiguous per layer (B, H, L, Dh)."""

    def __init__(self, depth: int):
        self.k, self.v, self.frames, self.phase = [None] * depth, [None] * depth, [], -1

    def attend(self, q, k, v, layer):
        if self.k[layer] is None:
            return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2))

    def commit(self, new: dict, frame0: int):
        """Append the clean pass's keys/values {layer: (k, v) (B, H, F N, Dh)} of frames frame0 ..."""
        for layer, (k, v) in new.items():
            self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], 2)
            self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], 2)
        self.frames += list(range(frame0, frame0 + FRAMES_PER_CHUNK))

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v if t is not None)


class RecordingCache(FullCache):
    """A full cache that also records, in the denoising steps, how much attention mass the chunk's
    queries put on each cached frame, per (layer, head): the calibration of the head typing."""

    def __init__(self, depth: int, min_frames: int):
        super().__init__(depth)
        self.min_frames, self.records = min_frames, []  # (layer, step, recent (B, H), after_sink (B, H))

    def attend(self, q, k, v, layer):
        if self.k[layer] is None or len(self.frames) < self.min_frames or self.phase < 0:
            return super().attend(q, k, v, layer)
        K, V = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        out, probs = attention_ref(q, K, V, return_probs=True)  # probs (B, H, Nq, L + Nq)
        # Key frames are the cached frames and the chunk's own (Self Forcing writes the chunk into its
        # cache before attending), so "the last 4 key frames" = the chunk itself + the newest cached frame.
        mass = probs.sum(2).unflatten(-1, (len(self.frames) + FRAMES_PER_CHUNK, -1)).sum(-1)  # (B, H, frames)
        self.records.append((layer, self.phase, mass[..., -4:].sum(-1), mass[..., 1:].sum(-1)))  # the score of step 1
        return out


KINDS = {"full": 0, "static": 1, "dynamic": 2}  # layer 0 is full; compressed heads are static or dynamic


class CompressedCache:
    """A per-head, variable-length cache that really stores fewer tokens. Each layer's cache is packed
    as common/varlen_attention.py documents: k, v (T, Dh) and offsets, lengths (B, H). A head's run:
        full    (layer 0)  every frame so far;
        static             the sink frame + the `recent` newest frames (whole frames);
        dynamic            the same + the buffer: segments of evicted frames, chosen per video.
    kinds: (L, H) ints of KINDS. select: which evicted segments the buffer keeps -- 'low' (lowest key
    similarity to the next frame, Forcing-KV), 'high' or 'random' (ablations)."""

    def __init__(self, kinds, recent: int, buffer_tokens: int, seg_len: int, select="low", sink=True,
                 impl="torch", seed=0):
        self.kinds, self.recent, self.budget, self.seg_len = kinds, recent, buffer_tokens, seg_len
        self.select, self.sink, self.impl = select, sink, impl
        self.g = torch.Generator().manual_seed(seed)  # the random-segments ablation only
        self.layers = [None] * kinds.shape[0]  # per layer: dict(k, v, offsets, lengths)
        self.frames, self.whole, self.phase = [], [], -1  # all frames; frames kept whole by compressed heads
        self.buf = self.buf_score = None  # (B, nb, 2) (frame, segment) of the buffer; (B, nb) their scores

    def attend(self, q, k, v, layer):
        c = self.layers[layer]
        if c is None:
            return F.scaled_dot_product_attention(q, k, v)
        return attend(q, c["k"], c["v"], c["offsets"], c["lengths"], k, v, self.impl)

    def run(self, layer: int, b: int, h: int):
        """The cached (k, v) of pair (b, h): (n, Dh) each."""
        c = self.layers[layer]
        s, n = int(c["offsets"][b, h]), int(c["lengths"][b, h])
        return c["k"][s:s + n], c["v"][s:s + n]

    def layout(self, kind: int, b: int):
        """Where each kept piece starts in a run: {('f', frame): row, ('s', frame, seg): row}, and the
        run's length. Whole frames come first (oldest first), then a dynamic head's buffer."""
        rows, at = {}, 0
        for f in (self.frames if kind == KINDS["full"] else self.whole):
            rows[("f", f)], at = at, at + self.N
        if kind == KINDS["dynamic"] and self.buf is not None:
            for f, s in self.buf[b].tolist():
                rows[("s", f, s)], at = at, at + self.seg_len
        return rows, at

    def commit(self, new: dict, frame0: int):
        """Write a chunk's clean keys/values {layer: (k, v) (B, H, F N, Dh)} and evict: every
        compressed head drops the whole frames that left the recent window (never the sink); dynamic
        heads keep the evicted segments that changed most, up to the buffer budget (step 3)."""
        B, H, FN, Dh = new[0][0].shape
        self.N = FN // FRAMES_PER_CHUNK
        chunk = list(range(frame0, frame0 + FRAMES_PER_CHUNK))
        whole = self.whole + chunk
        keep = [f for f in whole if (self.sink and f == SINK) or f > whole[-1] - self.recent]
        evicted = [f for f in whole if f not in keep]  # the oldest non-sink frames, never the newest
        old = {(kind, b): self.layout(kind, b) for kind in KINDS.values() for b in range(B)}
        if evicted and self.budget > 0 and (self.kinds == KINDS["dynamic"]).any():
            self._update_buffer(new, evicted, chunk)
        self.frames, self.whole = self.frames + chunk, keep
        for layer, (kn, vn) in new.items():
            ks, vs, lengths = [], [], torch.zeros(B, H, dtype=torch.long)
            for b in range(B):
                for h in range(H):
                    kind = int(self.kinds[layer, h])
                    rows = self._rows(kind, b, chunk, *old[(kind, b)])
                    k_old, v_old = self.run(layer, b, h) if self.layers[layer] is not None else (kn[0, 0, :0],) * 2
                    ks.append(torch.cat([k_old, kn[b, h]])[rows])  # a copy of only the kept rows
                    vs.append(torch.cat([v_old, vn[b, h]])[rows])
                    lengths[b, h] = len(rows)
            offsets = (lengths.flatten().cumsum(0) - lengths.flatten()).view(B, H)
            self.layers[layer] = dict(k=torch.cat(ks), v=torch.cat(vs), offsets=offsets.to(kn.device),
                                      lengths=lengths.to(kn.device))

    def _rows(self, kind, b, chunk, old_rows, n_old):
        """Indices into cat([old run, new chunk]) of the rows pair (b, h) keeps: its new layout."""
        N, L = self.N, self.seg_len

        def start(f):  # first row of whole frame f, in the new chunk or in the old run
            return n_old + (f - chunk[0]) * N if f in chunk else old_rows[("f", f)]

        idx = [torch.arange(start(f), start(f) + N) for f in (self.frames if kind == KINDS["full"] else self.whole)]
        if kind == KINDS["dynamic"] and self.buf is not None:
            for f, s in self.buf[b].tolist():  # a segment is in the old buffer or in a frame just evicted
                first = old_rows[("s", f, s)] if ("s", f, s) in old_rows else start(f) + s * L
                idx.append(torch.arange(first, first + L))
        return torch.cat(idx)

    def frame_keys(self, layer: int, f: int):
        """(B, H, N, Dh) keys of a frame that every head of `layer` still holds whole."""
        c = self.layers[layer]
        pos = torch.tensor([(self.frames if kind == KINDS["full"] else self.whole).index(f)
                            for kind in self.kinds[layer].tolist()])  # (H,) frame f's place in each run
        rows = c["offsets"].cpu() + pos * self.N  # (B, H) first row of frame f in each run
        return c["k"][rows[..., None] + torch.arange(self.N)]

    def _update_buffer(self, new, evicted, chunk):
        """Score the evicted frames' segments on layer 1 (the choice is shared by every layer, as in
        the official code) and keep, per video, the budget's worth with the lowest similarity among
        them and the old buffer."""
        B = new[1][0].shape[0]

        def keys(f):  # layer-1 keys of frame f, in the new chunk or still cached whole
            i = f - chunk[0]
            return new[1][0][:, :, i * self.N:(i + 1) * self.N] if f in chunk else self.frame_keys(1, f)

        cand = torch.tensor([(f, s) for f in evicted for s in range(self.N // self.seg_len)]).expand(B, -1, -1)
        score = torch.cat([segment_scores(keys(f), keys(f + 1), self.seg_len) for f in evicted], 1).cpu()  # (B, ne)
        if self.buf is not None:
            cand, score = torch.cat([self.buf, cand], 1), torch.cat([self.buf_score, score], 1)
        if self.select == "random":
            score = torch.rand(score.shape, generator=self.g)
        order = score.argsort(1, descending=self.select == "high")[:, :self.budget // self.seg_len]  # (B, nb)
        order = order.sort(1).values  # keep the buffer oldest first
        self.buf, self.buf_score = cand.gather(1, order[..., None].expand(-1, -1, 2)), score.gather(1, order)

    def nbytes(self) -> int:
        """Bytes of every stored tensor: packed keys/values, offsets, lengths and the buffer's index."""
        n = sum(t.nbytes for c in self.layers if c is not None for t in c.values())
        return n + (self.buf.nbytes + self.buf_score.nbytes if self.buf is not None else 0)


def segment_scores(k_f, k_next, seg_len: int):
    """k_f, k_next: (B, H, N, Dh) keys of an evicted frame and of the frame after it. -> (B, N / seg_len):
    mean cosine similarity of each segment's keys to the same positions one frame later. Low
    similarity = the region changed (the moving object): what dynamic heads need to keep."""
    a, b = (rearrange(k, "b h n d -> b n (h d)") for k in (k_f, k_next))
    return F.cosine_similarity(a, b, dim=-1).unflatten(1, (-1, seg_len)).mean(-1)


# %% generation, as Self Forcing does it


@torch.inference_mode()
def rollout(model, cache, y, noise, steps: int, bar=None):
    """Chunk by chunk: S Euler steps with the cache read-only, then one clean pass at t = 0 that
    writes the chunk's keys/values. noise: (B, T, C, S, S) -> video, same shape."""
    B, T = noise.shape[:2]
    grid = torch.linspace(1, 0, steps + 1)
    chunks = []
    for c0 in range(0, T, FRAMES_PER_CHUNK):
        x = noise[:, c0:c0 + FRAMES_PER_CHUNK]  # (B, F, C, S, S)
        for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
            cache.phase = i
            x = x + (t_next - t) * model(x, t.expand(B, FRAMES_PER_CHUNK).to(x), y, c0, hook=cache.attend)
        cache.phase, new = -1, {}

        def write(q, k, v, layer, new=new):  # the clean pass attends too: the next layer's keys depend on it
            new[layer] = (k, v)
            return cache.attend(q, k, v, layer)

        model(x, torch.zeros(B, FRAMES_PER_CHUNK).to(x), y, c0, hook=write)
        cache.commit(new, c0)
        chunks.append(x)
        if bar is not None:
            bar.update(1)
    return torch.cat(chunks, 1)


@torch.inference_mode()
def rollout_reference(model, y, noise, steps: int):
    """The same generation with no cache at all: every step reruns all earlier (clean, t = 0)
    frames with the block-causal mask. Obviously right, quadratically slow."""
    B, T = noise.shape[:2]
    grid = torch.linspace(1, 0, steps + 1)
    video = noise[:, :0]
    for c0 in range(0, T, FRAMES_PER_CHUNK):
        x = noise[:, c0:c0 + FRAMES_PER_CHUNK]
        for t, t_next in zip(grid[:-1], grid[1:]):
            times = torch.cat([torch.zeros(B, c0), t.expand(B, FRAMES_PER_CHUNK)], 1).to(x)
            x = x + (t_next - t) * model(torch.cat([video, x], 1), times, y)[:, c0:]
        video = torch.cat([video, x], 1)
    return video


# %% offline head typing (PAPERS.md §2, step 1)


def calibrate(model, cfg, device):
    """Calibration rollouts with a recording full cache. -> per-(layer, head) scores (L, H), and the
    scores per calibration sample (n, L, H) and per denoising step (S, L, H) for the stability check."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    y = torch.randint(0, 9, (cfg.n_calib,), generator=g)
    noise = torch.randn(cfg.n_calib, cfg.chunks * FRAMES_PER_CHUNK, 3, cfg.size, cfg.size, generator=g)
    cache = RecordingCache(model.depth, min_frames=3 * FRAMES_PER_CHUNK)  # >= 8 frames after the sink
    rollout(model, cache, y.to(device), noise.to(device), cfg.sample_steps)
    L, S = model.depth, cfg.sample_steps
    recent, total = torch.zeros(L, S, cfg.n_calib, model.H), torch.zeros(L, S, cfg.n_calib, model.H)
    for layer, step, r, a in cache.records:
        recent[layer, step] += r.cpu()
        total[layer, step] += a.cpu()
    score = recent.sum((1, 2)) / total.sum((1, 2))  # (L, H): s = mass(last 4) / mass(after sink)
    per_sample = (recent.sum(1) / total.sum(1)).permute(1, 0, 2)  # (n, L, H)
    per_step = (recent.sum(2) / total.sum(2)).permute(1, 0, 2)  # (S, L, H)
    return score, per_sample, per_step


def type_heads(score, threshold: float):
    """(L, H) scores -> (L, H) kinds: static where s >= threshold, dynamic otherwise; layer 0 full."""
    kinds = torch.where(score >= threshold, KINDS["static"], KINDS["dynamic"])
    kinds[0] = KINDS["full"]
    return kinds


def label_agreement(scores, threshold: float) -> float:
    """scores (n, L, H) over n draws (samples or steps): the mean share of draws that give a head
    (layers >= 1) the label most draws give it. 1 = head types never change."""
    static = (scores[:, 1:] >= threshold).float().mean(0)  # (L-1, H) share of draws calling it static
    return torch.maximum(static, 1 - static).mean().item()


def make_caches(cfg, kinds, depth: int, N: int, impl: str) -> dict:
    """Every cache compared, from one set of head types. Budgets: static heads keep sink + R recent
    frames, dynamic heads also a buffer of `buffer` frames' worth of segments; the window keeps
    sink + W recent frames in every head, W chosen so that it keeps at least as many tokens."""
    seg = int(math.isqrt(N))  # a segment = one row of patches
    buf_tokens = cfg.buffer * N
    dyn = (kinds[1:] == KINDS["dynamic"]).float().mean().item()
    window = math.ceil(cfg.recent + cfg.buffer * dyn)
    shuffled = kinds.clone()
    g = torch.Generator().manual_seed(cfg.seed + 2)
    shuffled[1:] = kinds[1:].flatten()[torch.randperm(kinds[1:].numel(), generator=g)].view_as(kinds[1:])
    window_kinds = torch.where(kinds == KINDS["full"], KINDS["full"], KINDS["static"])

    def compressed(k, recent=cfg.recent, budget=buf_tokens, **kw):
        return CompressedCache(k, recent, budget, seg, impl=impl, seed=cfg.seed, **kw)

    return {"full": lambda: FullCache(depth),
            "window": lambda: compressed(window_kinds, recent=window, budget=0),
            "forcing_kv": lambda: compressed(kinds),
            "random_heads": lambda: compressed(shuffled),
            "random_segments": lambda: compressed(kinds, select="random"),
            "high_similarity": lambda: compressed(kinds, select="high"),
            "no_sink": lambda: compressed(kinds, recent=cfg.recent + 1, sink=False)}  # same budget, no sink


# %% measurements


def video_stats(video):
    """video (B, T, C, S, S) in [-1, 1] -> lit mask (B, T, S, S), centroid (B, T, 2) in frame sides,
    mean colour of the lit pixels (B, T, 3) in [0, 1], and the lit area (B, T) in frame areas."""
    lit = video.amax(2) > 0  # the background is black: a lit pixel belongs to an object
    w = lit.float()
    S = video.shape[-1]
    coords = (torch.arange(S) + 0.5) / S
    area = w.sum((2, 3)).clamp(min=1)
    centroid = torch.stack([(w.sum(2) * coords).sum(2), (w.sum(3) * coords).sum(2)], -1) / area[..., None]
    colour = ((video + 1) / 2 * w[:, :, None]).sum((3, 4)) / area[..., None]
    return lit, centroid, colour, w.mean((2, 3))


def compare(video, ref) -> dict:
    """Quality of a rollout against the full-cache rollout from the same noise (PAPERS.md §2)."""
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
    because on a shared CPU other work only ever slows a rollout down). -> (metrics, videos) by cache."""
    y, noise = eval_inputs(cfg, size, n_videos, device)
    T = noise.shape[1]
    caches = make_caches(cfg, kinds, model.depth, (size // PATCH) ** 2, impl)
    rows, videos, seconds = {}, {}, {name: [] for name in caches}
    bar = tqdm(total=len(caches) * (1 + TIMING_REPEATS * cfg.chunks), desc=f"caches at {size}px", leave=False)
    for make in caches.values():
        rollout(model, make(), y, noise[:, :FRAMES_PER_CHUNK], cfg.sample_steps, bar)  # warm-up
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
            videos[name], rows[name] = video.float().cpu(), dict(cache_bytes=cache.nbytes())  # the same each time
    for name in caches:
        rows[name]["fps"] = n_videos * T / min(seconds[name])
    bar.close()
    for name in caches:
        q = compare(videos[name], videos["full"])
        if name == "full":
            q.update(psnr=None, traj_err=0.0)  # the reference itself
        rows[name] = {**q, **rows[name]}
    return rows, videos


def threshold_sweep(model, cfg, score, full_video, full_bytes: int, impl, device) -> dict:
    """Forcing-KV at thresholds 0.6-0.9: the static share, and what it costs in PSNR and bytes."""
    y, noise = eval_inputs(cfg, cfg.size, cfg.n_videos, device)
    N, rows = (cfg.size // PATCH) ** 2, {}
    for thr in (0.6, 0.7, 0.8, 0.9):
        kinds = type_heads(score, thr)
        cache = make_caches(cfg, kinds, model.depth, N, impl)["forcing_kv"]()
        video = rollout(model, cache, y, noise, cfg.sample_steps).float().cpu()
        rows[str(thr)] = dict(static_fraction=(kinds[1:] == KINDS["static"]).float().mean().item(),
                              psnr=compare(video, full_video)["psnr"], memory_ratio=cache.nbytes() / full_bytes)
    return rows


# %% figures


def figures(out, cfg, videos, score, kinds, res):
    order = ("full", "window", "forcing_kv")
    frames = torch.cat([videos[name][i] for i in range(min(2, cfg.n_videos)) for name in order])
    save_image_panels([(" / ".join(order) + ", video 1 then 2", frames)],
                      out / "fig_filmstrip.png", nrow=cfg.chunks * FRAMES_PER_CHUNK,
                      title=f"same noise, {cfg.chunks} chunks of {FRAMES_PER_CHUNK} frames at {cfg.size}px")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.hist(score[1:].flatten().numpy(), bins=20, range=(0, 1), color="grey")
    ax1.axvline(cfg.threshold, color="k", ls="--", lw=1)
    ax1.set(xlabel="score s = mass(last 4 frames) / mass(after sink)", ylabel="heads (layers >= 1)",
            title="head scores (calibration)")
    ax2.imshow(score.numpy(), vmin=0, vmax=1, cmap="coolwarm_r")
    for (l, h), k in zip(torch.cartesian_prod(torch.arange(score.shape[0]), torch.arange(score.shape[1])).tolist(),
                         kinds.flatten().tolist()):
        ax2.text(h, l, f"{'FSD'[k]}\n{score[l, h]:.2f}", ha="center", va="center", fontsize=7)
    ax2.set(xlabel="head", ylabel="layer", title="F full (layer 0), S static, D dynamic")
    fig.tight_layout()
    fig.savefig(out / "fig_head_types.png", dpi=120)
    plt.close(fig)
    sizes = sorted(int(s) for s in res["by_size"])
    tokens = [(s // PATCH) ** 2 for s in sizes]
    curves = {}
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
    if cfg.bench:  # the kernel benchmark of issue 10 (common/varlen_attention.py); no model needed
        res = run_bench(out, device)
        print_table([(r["size"], r["cache_frames"], r["kept_fraction"], r["ms_full_sdpa"], r["ms_gather_sdpa"],
                      r.get("ms_fused", "skipped"), r.get("fused_GBps", "-")) for r in res["rows"]],
                    ("frame", "cache frames", "kept", "ms full SDPA", "ms gather+SDPA", "ms fused", "fused GB/s"))
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
    sweep = threshold_sweep(model, cfg, score, videos["full"], by_size[str(cfg.size)]["full"]["cache_bytes"],
                            impl, device)
    res = dict(
        static_fraction=(kinds[1:] == KINDS["static"]).float().mean().item(),
        head_label_agreement=dict(samples=label_agreement(per_sample, cfg.threshold),
                                  steps=label_agreement(per_step, cfg.threshold)),
        head_scores=score.tolist(), head_types=[["FSD"[k] for k in row] for row in kinds.tolist()],
        threshold_sweep=sweep,
        full_quality=full_quality(videos["full"]),
        by_size=by_size,
        speedup_by_size={s: r["forcing_kv"]["fps"] / r["full"]["fps"] for s, r in by_size.items()},
        memory_ratio_by_size={s: r["forcing_kv"]["cache_bytes"] / r["full"]["cache_bytes"] for s, r in by_size.items()},
        attention=impl, device=str(device),
        train_seconds=0.0 if info["cached"] else round(info["train_seconds"], 1),
        model_train_seconds=round(info["train_seconds"], 1),
        metric_note="psnr, traj_err (centroid distance in frame sides) against the full-cache video from the same "
                    "noise; drift: colour distance of the lit pixels to frame 0; discontinuity: largest change at a "
                    "chunk boundary over the mean frame-to-frame change; sizes above --size are cost measurements "
                    "(the model is trained at --size only)",
    )
    res["seconds"] = round(time.perf_counter() - t0, 1)
    save_json(out / "results.json", res)
    figures(out, cfg, videos, score, kinds, res)
    print_table([(f"{s}px {name}", r["psnr"] if r["psnr"] is not None else "ref", r["traj_err"], r["drift"],
                  r["discontinuity"], r["cache_bytes"] / rows["full"]["cache_bytes"], r["fps"])
                 for s, rows in by_size.items() for name, r in rows.items()],
                ("cache", "PSNR", "traj err", "drift", "discont.", "memory", "fps"))
    print()
    print_table([("static fraction", res["static_fraction"]),
                 ("label agreement (samples / steps)", f"{res['head_label_agreement']['samples']:.3f} / "
                                                       f"{res['head_label_agreement']['steps']:.3f}"),
                 ("full cache: colour kept / area drift", f"{res['full_quality']['colour_kept']:.3f} / "
                                                          f"{res['full_quality']['area_drift']:.3f}"),
                 *[(f"{s}px speed-up / memory (forcing_kv)", f"{res['speedup_by_size'][s]:.2f}x / "
                                                             f"{res['memory_ratio_by_size'][s]:.2f}") for s in by_size],
                 ("train seconds (this run)", res["train_seconds"]), ("seconds", res["seconds"])])
    print(f"wrote {out}/results.json and figures")
    return res


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python forcing_kv.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
