"""Forcing-KV: hybrid KV-cache compression for autoregressive video diffusion.
Ji, Zhong, et al. (2026), arXiv 2605.09681. Official code: zju-jiyicheng/Forcing-KV.

Claim reproduced
    In a chunk-wise autoregressive video DiT (Self Forcing / LongLive), attention heads split into
    *static* heads that look at the last few frames and *dynamic* heads that look far back. Keep the
    sink + the most recent frame for static heads, plus a small buffer of the most-changing (lowest
    key similarity) segments of the frames just evicted for dynamic heads: the cache shrinks and
    generation speeds up, more so as frames get more tokens, with the video nearly unchanged.

Paper -> code
    chunk-causal video DiT, rotary frame index ..... `VideoDiT`, `rotary`, `teacher_forcing`
    teacher forcing on clean context ............... `train_video_model`
    Self Forcing rollout: S steps, then a clean pass  `rollout` (`rollout_reference`: no cache at all)
    Self Forcing's preallocated cache .............. `FullCache` (attends over the filled slice)
    head score s = mass(last 4) / mass([3:]) ....... `FullCache(record=True)`, `calibrate`, `type_heads`
    static heads: sink + 1 recent frame (+ chunk) .. `CompressedCache.commit` (layer 0 too, untyped)
    dynamic heads: + lowest-similarity segments .... `segment_scores`, `CompressedCache.choose`
    per-head variable-length attention .............. `CompressedCache.attend` -> common/varlen_attention.py

The official budgets (configs/forcing-kv/*.yaml, wan/modules/causal_model_forcingkv.py), in frames
    of N tokens: `sink_size: 1`; one recent frame (`spatial_context_length = temporal_context_length
    = 1`); dynamic heads add one frame's worth of segments (`dynamic_context_length: 1`: 0.33 of the
    3 frames evicted per step, each cut into `num_frame_patch: 6` segments; ours: SEGMENTS = 4),
    refilled every step. Layer 0 is never head-grouped: it keeps the sink + the recent frame. Heads
    are grouped after AR step `ar_start: 1` (AR_START), so the buffer first fills at step 2.
The official score (configs_head/*.json, "naive_sink_3_thr08"): the chunk's attention mass on the
    last 4 key frames over the mass on key frames [3:] (the first chunk left out), recorded at AR
    step 4 with 15 key frames (12 cached + the chunk's 3): no preference scores 4 / (15 - 3) = 0.33.
A model whose heads can specialise: 24-frame training clips, as long as its rollouts (Self Forcing:
    21); rotary frame index (Wan); each chunk denoised against nearly clean earlier chunks.

Conventions (common/flow.py): t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, target eps - x, as
    in Self Forcing and Wan. F frames per chunk, S Euler steps, N tokens per frame, H heads, L layers.

Deviations. Pixel-space moving shapes (16 px, patch 4), not Wan2.1 latents; teacher forcing (CausVid),
    not Self Forcing / DMD distillation; 4 segments per frame, not 6; segments chosen per video (the
    official code: batch element 0, at batch 1), on layer-1 keys of its dynamic heads (all its heads
    if none), shared by all layers, as the official code; the score pools the S denoising steps of AR
    step 4 over the calibration videos (*reconstructed*: which calls the official profile used). The
    official head_profile.py says SKIP_FIRST_K = 1 where the shipped head files say [3:]: we follow
    the files. Trained at 16 px only: larger frames run the same weights to measure cost.

Run
    python forcing_kv.py                     # cpu preset, 2 CPU cores: training 670 s once (cached), then 100 s
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

from common import config, dit
from common import data as data_mod
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
RESTART = 0.25  # share of training chunks denoised without context: more first chunks (one per 24 frames)
TIMING_REPEATS = 3  # frames per second: the best of 3 rollouts per cache
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the static share at each (the sweep rolls out 0.6-0.9)
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
    attention: str = field("auto", "compressed-cache attention: torch, triton (fused kernel), auto (triton on CUDA)",
                           choices=("auto", "torch", "triton"))
    bench: bool = field(False, "only benchmark one chunk-attention call (full, gather + SDPA, fused): bench.json")

    def validate(self):
        calib, total = FRAMES_PER_CHUNK * (CALIB_STEP + 1), FRAMES_PER_CHUNK * self.chunks
        for bad, msg in [
            (any(s % 8 for s in [self.size, *int_list(self.sizes, "--sizes", 8)]),
             f"--size and --sizes must be multiples of 8 (patch {PATCH}, {SEGMENTS} segments per frame)"),
            (self.train_frames % 3 or self.train_frames < calib,
             f"--train-frames must be whole chunks of 3, at least the {calib} frames of a calibration rollout"),
            (self.chunks < 2, "--chunks must be >= 2: a cache needs a chunk to remember"),
            (self.recent > total - 2, f"--recent {self.recent} leaves nothing to evict: at most {total - 2}"),
            (self.buffer > 3, f"--buffer {self.buffer}: it is refilled from the 3 frames evicted per step, so <= 3"),
            (not 0 < self.threshold < 1, f"--threshold must lie in (0, 1), got {self.threshold}"),
            (self.n_calib < 2 or self.sample_steps < 2, "--n-calib and --sample-steps must be >= 2 (pairs)")]:
            if bad:
                raise UserError(msg)


PRESETS = {
    "smoke": dict(sizes="8,16", size=8, model="xs", train_frames=15, steps=6, batch=2, chunks=4, sample_steps=2,
                  n_videos=2, n_calib=2),
    "cpu": dict(),
    "gpu": dict(sizes="16,32,64,96", steps=4000, batch=32, n_videos=16, n_calib=16),
}


# %% model: a chunk-causal video DiT with rotary frame positions


def rotary(x, frames):
    """x (B, H, L, Dh), frames (L,) the frame index of each token: channel pair i (a, b) turns by the
    angle frames * 10000^(-2i/Dh), so q . k depends on the frame offset only (Wan's temporal RoPE)."""
    ang = frames.float()[:, None] * 10000 ** (-torch.arange(0, x.shape[-1], 2, device=x.device) / x.shape[-1])
    cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)  # (L, Dh)
    return (x * cos + torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2) * sin).to(x.dtype)


def teacher_forcing(clean, noisy, N: int, restart=None):
    """An attention hook: SDPA over [clean; noisy] tokens (frame indices (Tc,), (Tn,)). A clean frame sees the
    clean frames of its own and earlier chunks (the cache at generation); a noisy frame, those of earlier
    chunks and its own chunk's noisy ones -- none of the context if restart (B, chunks) marks its chunk."""
    chunk = torch.cat([clean, noisy]) // FRAMES_PER_CHUNK
    is_clean = torch.arange(len(chunk), device=chunk.device) < len(clean)
    q, k, cq, ck = chunk[:, None], chunk[None, :], is_clean[:, None], is_clean[None, :]
    mask = (ck & ((q > k) | (cq & (q == k)))) | (~cq & ~ck & (q == k))  # (frames, frames)
    if restart is not None:
        alone = F.pad(restart[:, noisy // FRAMES_PER_CHUNK - noisy[0] // FRAMES_PER_CHUNK], (len(clean), 0))
        mask = (mask & ~(alone[:, :, None] & ck))[:, None]  # (B, 1, frames, frames)
    mask = mask.repeat_interleave(N, -2).repeat_interleave(N, -1)
    return lambda q, k, v, layer: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class VideoDiT(nn.Module):
    """Patches + 2-D sin-cos positions; common/dit.py Blocks, condition c = embed(t of the frame) + embed(label)
    per token; every attention call (q, k turned by `rotary`) goes through `hook`: where a cache plugs in."""

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
        pos = frames.repeat_interleave(N)  # (T N,): which frame, seen by attention as an offset (rotary)
        roped = lambda q, k, v, layer: hook(rotary(q, pos), rotary(k, pos), v, layer)
        for i, blk in enumerate(self.blocks):
            h = blk(h, c, roped, i)
        shift, scale = self.final_ada(c).chunk(2, -1)
        out = self.final(modulate(self.final_norm(h), shift, scale))  # (B, T N, P P C)
        return rearrange(out, "b (t h w) (p q c) -> b t c (h p) (w q)", t=T, h=S // PATCH, p=PATCH, q=PATCH)


def make_model(cfg) -> VideoDiT:
    torch.manual_seed(cfg.seed)
    return VideoDiT(**SIZES[cfg.model])


def train_video_model(cfg, device) -> tuple[VideoDiT, dict]:
    """Teacher forcing (CausVid's; Self Forcing's baseline), whole clips in one pass: every chunk is noised
    to its own logit-normal t and denoised against a nearly clean copy of the earlier chunks, the context
    that generation's clean pass writes (`teacher_forcing`). No copy of the last chunk: nothing sees it."""
    model = make_model(cfg)
    key = dict(kind="forcing_kv", version=2, data_version=data_mod.VERSION, model_version=dit.VERSION,
               context_noise=CONTEXT_NOISE, restart=RESTART,
               **{k: getattr(cfg, k) for k in ("size", "model", "train_frames", "steps", "batch", "lr", "seed")})
    T, ctx, n_chunks = cfg.train_frames, cfg.train_frames - FRAMES_PER_CHUNK, cfg.train_frames // FRAMES_PER_CHUNK

    def fit(model):
        model.to(device).train()
        g = torch.Generator().manual_seed(cfg.seed)
        opt, ema = make_optimizer(model, cfg.lr), EMA(model, 0.999)
        clean, noisy = torch.arange(ctx, device=device), torch.arange(T, device=device)
        bar = tqdm(range(cfg.steps), desc="video model", mininterval=2.0)
        for _ in bar:
            x, y = data_mod.moving_shapes(cfg.batch, T, cfg.size, g)
            t = torch.sigmoid(torch.randn(cfg.batch, n_chunks, generator=g))  # per-chunk logit-normal times
            restart = torch.rand(cfg.batch, n_chunks, generator=g) < RESTART
            t_ctx = CONTEXT_NOISE * torch.rand(cfg.batch, n_chunks - 1, generator=g)  # the context: nearly clean
            t = torch.cat([t_ctx, t], 1).repeat_interleave(FRAMES_PER_CHUNK, 1)  # (B, ctx + T)
            x2 = torch.cat([x[:, :ctx], x], 1)  # [clean copy; the clip], (B, ctx + T, C, S, S)
            eps = torch.randn(x2.shape, generator=g)
            x2, y, t, eps = x2.to(device), y.to(device), t.to(device), eps.to(device)
            xt = interpolate(x2.flatten(0, 1), eps.flatten(0, 1), t.flatten()).view_as(x2)
            hook = teacher_forcing(clean, noisy, (cfg.size // PATCH) ** 2, restart.to(device))
            v = model(xt, t, y, torch.cat([clean, noisy]), hook)[:, ctx:]
            loss = (v - velocity_target(x2[:, ctx:], eps[:, ctx:])).pow(2).mean()
            optimizer_step(loss, model, opt, ema)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        ema.copy_to(model)

    info = load_or_train("forcing_kv", key, model, fit)
    return model.to(device).eval(), info


# %% KV caches: full, and compressed (window, Forcing-KV and its ablations)


class FullCache:
    """Self Forcing's cache: per layer one buffer (B, H, frames N, Dh) in the model's dtype. Each call
    writes the chunk's keys/values after the filled part (the clean pass's stay) and attends over the
    filled slice: no copy, ever. record=True: also keep the attention mass of the chunk's queries on
    each key frame in the denoising steps of AR step CALIB_STEP, per (layer, head) (`calibrate`)."""

    def __init__(self, depth: int, frames: int, record=False):
        self.k, self.v, self.capacity, self.filled, self.phase = [None] * depth, [None] * depth, frames, 0, -1
        self.records = [] if record else None  # (layer, denoising step, mass (B, H, key frames))

    def write(self, k, v, layer):
        if self.k[layer] is None:
            shape = (*k.shape[:2], self.capacity * k.shape[2] // FRAMES_PER_CHUNK, k.shape[3])
            self.k[layer], self.v[layer] = k.new_empty(shape), v.new_empty(shape)
        end = self.filled + k.shape[2]
        assert end <= self.k[layer].shape[2], "the rollout is longer than the cache was allocated for"
        self.k[layer][:, :, self.filled:end], self.v[layer][:, :, self.filled:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attend(self, q, k, v, layer):
        K, V = self.write(k, v, layer)  # key frames: the cached ones and the chunk's own (Self Forcing)
        if self.records is None or self.phase < 0 or self.filled != CALIB_STEP * k.shape[2]:
            return F.scaled_dot_product_attention(q, K, V)
        out, probs = attention_ref(q, K, V, return_probs=True)  # probs (B, H, Nq, keys)
        N = q.shape[2] // FRAMES_PER_CHUNK
        self.records.append((layer, self.phase, probs.sum(2).unflatten(-1, (-1, N)).sum(-1)))  # (B, H, frames)
        return out

    def commit(self, new: dict, frame0: int):
        """The clean pass has written the chunk {layer: (k, v) (B, H, F N, Dh)}: keep it."""
        self.filled += new[0][0].shape[2]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v if t is not None)


class CompressedCache:
    """A per-head, variable-length cache that really stores fewer tokens. Per head, whole frames:
        static (and layer 0)  the sink frame + the `recent` newest frames;
        dynamic               the same + `buffer` frames' worth of segments of the frames evicted at
                              the last step, those with the lowest key similarity to the next frame.
    Packed per layer as common/varlen_attention.py documents, one block of runs [sink; buffer; recent]
    per head kind. kinds: (L, H) ints of KINDS; select: 'low' (Forcing-KV), 'high' or 'random'."""

    def __init__(self, kinds, recent: int, buffer: int, select="low", sink=True, impl="torch", seed=0):
        self.kinds, self.recent, self.buffer, self.select, self.sink = kinds, recent, buffer, select, sink
        self.impl, self.g = impl, torch.Generator().manual_seed(seed)  # g: the random-segments ablation only
        self.layers, self.phase, self.sel = [None] * kinds.shape[0], -1, None  # sel (B, nb): the buffer's segments

    def attend(self, q, k, v, layer):
        """Over the cache and the chunk's own k, v: impl `reference` (a loop over (b, h) pairs), `torch`
        (gather + SDPA per head group, as the official code) or `triton` (the fused kernel)."""
        c = self.layers[layer]
        if c is None:
            return F.scaled_dot_product_attention(q, k, v)
        if self.impl == "reference":
            return varlen_attention_ref(q, *c["kv"], c["offsets"], c["lengths"], k, v)
        return varlen_attention(q, *c["kv"], c["offsets"], c["lengths"], k, v, self.impl, c["groups"])

    def commit(self, new: dict, frame0: int):
        """Write a chunk's clean keys/values {layer: (k, v) (B, H, F N, Dh)} and evict (steps 2 and 3).
        Per head kind, the stream [recent frames; the chunk] (the sink taken out of the first chunk):
        its newest `recent` frames stay, the others are this step's candidates for the buffer."""
        H, N = new[0][0].shape[1], new[0][0].shape[2] // FRAMES_PER_CHUNK
        seg = N // SEGMENTS  # tokens per segment
        refill, self.sel = self.buffer > 0 and frame0 // FRAMES_PER_CHUNK > AR_START, None  # grouped after AR_START
        for layer, (kn, vn) in new.items():
            kinds, old, blocks = self.kinds[layer].tolist(), self.layers[layer], []
            for i, kind in enumerate(sorted(set(kinds))):  # the same blocks, in the same order, every step
                heads = [h for h in range(H) if kinds[h] == kind]
                fresh, n0 = torch.stack([kn, vn])[:, :, heads], N * self.sink  # (2, B, G, F N, Dh)
                if old is None:  # the first chunk: its first frame is the sink
                    sink, recent, fresh = fresh[..., :n0, :], fresh[..., :0, :], fresh[..., n0:, :]
                else:
                    _, run, n_sink, n_buf = old["blocks"][i]  # run (2, B, G, n, Dh)
                    sink, recent = run[..., :n_sink, :], run[..., n_sink + n_buf:, :]
                stream = torch.cat([recent, fresh], -2)  # oldest first
                n_cand = max(0, stream.shape[-2] - self.recent * N)  # tokens of the frames evicted now
                buf = stream[..., :0, :]
                if refill and n_cand and (kind == KINDS["dynamic"] or KINDS["dynamic"] not in kinds):
                    if layer == 1:  # scored once, on layer 1, shared by every layer (as the official code)
                        self.sel = self.choose(stream[0][..., :n_cand + N, :], N, min(self.buffer * N, n_cand) // seg)
                    if kind == KINDS["dynamic"] and self.sel is not None:
                        cand = stream[..., :n_cand, :].unflatten(-2, (-1, seg))  # (2, B, G, segments, seg, Dh)
                        buf = cand.take_along_dim(self.sel[None, :, None, :, None, None], 3).flatten(-3, -2)
                run = torch.cat([sink, buf, stream[..., n_cand:, :]], -2)  # (2, B, G, n, Dh)
                blocks.append((heads, run, sink.shape[-2], buf.shape[-2]))
            self.pack(layer, blocks, kn.device)

    def pack(self, layer: int, blocks: list, device):
        """blocks [(heads, runs (2, B, G, n, Dh), sink and buffer lengths)] -> the layer's packed k, v (2, T,
        Dh), runs (b, head)-major and back to back; offsets, lengths (B, H) int32 on the device (the
        kernel) and on the host (the grouped path's layout): no host sync at any attention call."""
        kv, H = torch.cat([run.flatten(1, 3) for _, run, *_ in blocks], 1), self.kinds.shape[1]
        B, start, views = blocks[0][1].shape[1], 0, []
        offsets, lengths = torch.zeros(B, H, dtype=torch.int32), torch.zeros(B, H, dtype=torch.int32)
        for heads, run, *parts in blocks:
            _, _, G, n, Dh = run.shape
            offsets[:, heads] = start + n * torch.arange(B * G, dtype=torch.int32).view(B, G)
            lengths[:, heads] = n
            views.append((heads, kv[:, start:start + B * G * n].view(2, B, G, n, Dh), *parts))
            start += B * G * n
        self.layers[layer] = dict(kv=kv, blocks=views, offsets=offsets.to(device), lengths=lengths.to(device),
                                  host=(offsets, lengths),
                                  groups=varlen_groups(offsets, lengths, device) if self.impl == "torch" else None)

    def choose(self, chain, N: int, nb: int):
        """chain (B, G, (f + 1) N, Dh): layer-1 keys of f candidate frames and the next -> (B, nb) kept segments."""
        score = segment_scores(chain, N)
        if self.select == "random":
            score = torch.rand(score.shape, generator=self.g).to(score.device)
        return score.topk(nb, dim=1, largest=self.select == "high").indices.sort(1).values

    def nbytes(self) -> int:
        """Bytes of every stored tensor: packed keys/values, offsets, lengths and the buffer's index."""
        n = sum(c[key].nbytes for c in self.layers if c is not None for key in ("kv", "offsets", "lengths"))
        return n + (self.sel.nbytes if self.sel is not None else 0)


def segment_scores(chain, N: int):
    """chain (B, G, (f + 1) N, Dh): keys of f frames and the next -> (B, f SEGMENTS): each segment's mean
    cosine similarity (keys of all G heads) to the same tokens one frame later. Low = it moved."""
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
        hook = teacher_forcing(frames[:c0], frames[c0:], N)
        for t, t_next in zip(grid[:-1], grid[1:]):
            times = torch.cat([torch.zeros(B, c0), t.expand(B, FRAMES_PER_CHUNK)], 1).to(x)
            x = x + (t_next - t) * model(torch.cat([video, x], 1), times, y, frames, hook)[:, c0:]
        video = torch.cat([video, x], 1)
    return video


# %% offline head typing (step 1 of the method)


def calibrate(model, cfg, device):
    """Full-cache calibration rollouts up to AR step CALIB_STEP. -> scores (L, H) pooled over videos
    and denoising steps, and per video (n, L, H) and per step (S, L, H) for the stability check."""
    g, T = torch.Generator().manual_seed(cfg.seed + 1), FRAMES_PER_CHUNK * (CALIB_STEP + 1)
    y = torch.randint(0, 9, (cfg.n_calib,), generator=g)
    noise = torch.randn(cfg.n_calib, T, 3, cfg.size, cfg.size, generator=g)
    cache = FullCache(model.depth, T, record=True)
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
    """scores (n, L, H) over n draws: the mean share that give a head (layers >= 1) its majority label."""
    static = (scores[:, 1:] >= threshold).float().mean(0)
    return torch.maximum(static, 1 - static).mean().item()


def rank_corr(scores) -> float:
    """scores (n, L, H) over n draws (videos or steps): Spearman's correlation of the typed heads' scores
    between two draws, mean over pairs. 1 = every draw orders the heads alike; about 0 = noise."""
    r = scores[:, 1:].flatten(1).argsort(1).argsort(1).float()  # (n, heads) ranks
    r = (r - r.mean(1, keepdim=True)) / (r - r.mean(1, keepdim=True)).norm(dim=1, keepdim=True)
    return (((r @ r.T).sum() - len(r)) / (len(r) * (len(r) - 1))).item()  # the off-diagonal mean


def make_caches(cfg, kinds, depth: int, frames: int, impl: str) -> dict:
    """Every cache compared, from one set of head types. The window keeps sink + W recent frames in every
    head, W the fewest that hold Forcing-KV's tokens; no_buffer keeps only what static heads keep."""
    dyn = (kinds[1:] == KINDS["dynamic"]).float().mean().item()
    window, static = math.ceil(cfg.recent + cfg.buffer * dyn), torch.full_like(kinds, KINDS["static"])
    g, shuffled = torch.Generator().manual_seed(cfg.seed + 2), kinds.clone()
    while torch.equal(shuffled, kinds) and len(kinds[1:].unique()) > 1:  # the same static share, another split
        shuffled[1:] = kinds[1:].flatten()[torch.randperm(kinds[1:].numel(), generator=g)].view_as(kinds[1:])

    def compressed(k, recent=cfg.recent, buffer=cfg.buffer, **kw):
        return lambda: CompressedCache(k, recent, buffer, impl=impl, seed=cfg.seed, **kw)

    return {"full": lambda: FullCache(depth, frames),
            "window": compressed(static, recent=window, buffer=0), "no_buffer": compressed(static, buffer=0),
            "forcing_kv": compressed(kinds), "random_heads": compressed(shuffled),
            "random_segments": compressed(kinds, select="random"), "high_similarity": compressed(kinds, select="high"),
            "no_sink": compressed(kinds, recent=cfg.recent + 1, sink=False)}  # the same budget, no sink


# %% measurements


def eval_inputs(cfg, size: int, n: int, device):
    """Labels (n,) and the rollout noise (n, T, C, size, size): the same for every cache."""
    g = torch.Generator().manual_seed(cfg.seed + 3)
    return (torch.randint(0, 9, (n,), generator=g).to(device),
            torch.randn(n, cfg.chunks * FRAMES_PER_CHUNK, 3, size, size, generator=g).to(device))


def measure_size(model, cfg, kinds, size: int, impl: str, device, n_videos: int) -> tuple[dict, dict]:
    """Every cache at one size, same noise: quality against the full cache; bytes at the end and frames per
    second after a warm-up (best of TIMING_REPEATS in turn: other work only slows one), also over full's."""
    y, noise = eval_inputs(cfg, size, n_videos, device)
    caches, T = make_caches(cfg, kinds, model.depth, noise.shape[1], impl), noise.shape[1]
    rows, videos, seconds = {}, {}, {name: [] for name in caches}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    bar = tqdm(total=len(caches) * (1 + TIMING_REPEATS * cfg.chunks), desc=f"caches at {size}px", leave=False)
    for name, make in caches.items():
        warm = FullCache(model.depth, FRAMES_PER_CHUNK) if name == "full" else make()
        rollout(model, warm, y, noise[:, :FRAMES_PER_CHUNK], cfg.sample_steps, bar)
    for _ in range(TIMING_REPEATS):
        for name, make in caches.items():
            cache = make()
            sync()
            t0 = time.perf_counter()
            video = rollout(model, cache, y, noise, cfg.sample_steps, bar)
            sync()
            seconds[name].append(time.perf_counter() - t0)
            videos[name], rows[name] = video.cpu(), dict(cache_bytes=cache.nbytes())  # the same each time
    bar.close()
    for name in caches:
        q = data_mod.compare_videos(videos[name], videos["full"], FRAMES_PER_CHUNK)
        if name == "full":
            q["psnr"] = None  # the reference itself
        rows[name] = {**q, **rows[name], "fps": n_videos * T / min(seconds[name]), "speedup": min(seconds["full"])
                      / min(seconds[name]), "memory_ratio": rows[name]["cache_bytes"] / rows["full"]["cache_bytes"]}
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
                              psnr=data_mod.compare_videos(video, full_video)["psnr"],
                              memory_ratio=cache.nbytes() / full_bytes)
    return rows


CLAIMS = [  # claim; the paper's number; key of ours in results.json; criterion, decided in code; note
    ("a share of heads is static (s >= 0.8)", "about 40% (37-43% in the shipped head files)", "static_fraction",
     "0.15 <= {v} <= 0.85", "layers >= 1, scored at AR step 4 with the official geometry"),
    ("head scores are stable across samples", "stable (no number)", "head_score_rank_corr.samples", "{v} >= 0.8",
     "Spearman correlation of the heads' scores between two calibration videos, mean over pairs"),
    ("head scores are stable across denoising steps", "stable (no number)", "head_score_rank_corr.steps",
     "{v} >= 0.8", "the same between two of the denoising steps"),
    ("the cache shrinks", "0.7x (30% less memory)", "memory_ratio_max", "{v} <= 0.7",
     "bytes after the rollout over the preallocated full cache's, the largest over frame sizes"),
    ("generation is faster at the largest frame", "1.35-1.5x at 480p", "speedup_by_size.{big}", "{v} >= 1.3",
     "frames per second over the preallocated full cache's, at the largest frame size"),
    ("the speed-up grows with tokens per frame", "1.5x at 480p, 2.82x at 1080p", "speedup_growth_min", "{v} > 1",
     "the smallest ratio of the speed-ups at two consecutive frame sizes"),
    ("quality kept: beats a window of at least its bytes", "VBench 84.41 -> 84.60", "psnr_gain_over_window_db",
     "{v} >= 0", "PSNR (dB) to the full-cache video, at the training frame size"),
    ("lowest-similarity segments are the ones to keep", "the method's choice", "segment_choice_gain_db", "{v} > 0",
     "PSNR (dB) over the better of random and highest-similarity segments"),
]


def claims(res: dict) -> list:
    big = max(res["speedup_by_size"], key=int)
    return [config.claim_entry(res, claim, paper, key.format(big=big), crit.format(v=key.format(big=big)),
                        lambda v, crit=crit: eval(crit.format(v=repr(v))), note)
            for claim, paper, key, crit, note in CLAIMS]


# %% figures


def figures(out, cfg, videos, score, kinds, res):
    order = ("full", "window", "forcing_kv")
    frames = torch.cat([videos[name][i] for i in range(min(2, cfg.n_videos)) for name in order])
    save_image_panels([(" / ".join(order) + ", video 1 then 2", frames)], out / "fig_filmstrip.png",
                      nrow=cfg.chunks * FRAMES_PER_CHUNK, title=f"same noise, {cfg.chunks} chunks at {cfg.size}px")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.hist(score[1:].flatten().numpy(), bins=20, range=(0, 1), color="grey")
    ax1.axvline(cfg.threshold, color="k", ls="--", lw=1, label=f"threshold {cfg.threshold}")
    ax1.axvline(res["score_uniform_reference"], color="tab:blue", lw=1, label="no preference: 4 / 12")
    ax1.set(xlabel="s = mass(last 4 key frames) / mass(key frames [3:])", ylabel="heads (layers >= 1)",
            title=f"head scores at AR step {CALIB_STEP}")
    ax1.legend(fontsize=7)
    ax2.imshow(score.numpy(), vmin=0, vmax=1, cmap="coolwarm_r")
    for (l, h), k in zip(torch.cartesian_prod(*map(torch.arange, score.shape)).tolist(), kinds.flatten().tolist()):
        ax2.text(h, l, f"{'LSD'[k]}\n{score[l, h]:.2f}", ha="center", va="center", fontsize=7)
    ax2.set(xlabel="head", ylabel="layer", title="L layer 0 (untyped), S static, D dynamic")
    fig.tight_layout()
    fig.savefig(out / "fig_head_types.png", dpi=120)
    plt.close(fig)
    sizes = sorted(res["by_size"], key=int)
    tokens, rows = [(int(s) // PATCH) ** 2 for s in sizes], [res["by_size"][s] for s in sizes]
    curves = {f"{what}, {name} / full": (tokens, [r[name][key] / r["full"][key] for r in rows])
              for name in ("forcing_kv", "window") for what, key in (("speed-up", "fps"), ("memory", "cache_bytes"))}
    save_curves(curves, out / "fig_scaling.png", "tokens per frame", "ratio to the full cache",
                f"after {cfg.chunks * FRAMES_PER_CHUNK} frames (sizes {', '.join(sizes)} px)", logx=True)


# %% run


def run(cfg: Config) -> dict:
    t0, device = time.perf_counter(), resolve_device(cfg.device)
    impl = resolve_impl(cfg.attention, device)
    out = run_dir(cfg, "forcing_kv")
    if cfg.bench:  # the kernel benchmark (common/varlen_attention.py); no model needed
        return run_bench(out, device)
    model, info = train_video_model(cfg, device)
    score, per_sample, per_step = calibrate(model, cfg, device)
    kinds = type_heads(score, cfg.threshold)
    by_size, videos = {}, {}
    for size in sorted(set(int_list(cfg.sizes, "--sizes", 8)) | {cfg.size}):  # other sizes: cost, 2 videos
        by_size[str(size)], videos[size] = measure_size(model, cfg, kinds, size, impl, device,
                                                        cfg.n_videos if size == cfg.size else min(2, cfg.n_videos))
    videos, q = videos[cfg.size], by_size[str(cfg.size)]  # q: the quality rows
    speedup, memory = ({s: r["forcing_kv"][key] for s, r in by_size.items()} for key in ("speedup", "memory_ratio"))
    ordered, psnr = [speedup[s] for s in sorted(speedup, key=int)], {name: r["psnr"] for name, r in q.items()}
    res = dict(
        static_fraction=(kinds[1:] == KINDS["static"]).float().mean().item(),
        static_fraction_by_threshold={f"{x:.1f}": (score[1:] >= x - 1e-9).float().mean().item() for x in THRESHOLDS},
        score_uniform_reference=LAST_FRAMES / (FRAMES_PER_CHUNK * (CALIB_STEP + 1) - SKIP_FRAMES),
        head_score_rank_corr=dict(samples=rank_corr(per_sample), steps=rank_corr(per_step)),
        head_label_agreement=dict(samples=label_agreement(per_sample, cfg.threshold),
                                  steps=label_agreement(per_step, cfg.threshold)),
        head_scores=score.tolist(), head_types=[["LSD"[k] for k in row] for row in kinds.tolist()],
        threshold_sweep=threshold_sweep(model, cfg, score, videos["full"], q["full"]["cache_bytes"], impl, device),
        full_quality=data_mod.object_kept(videos["full"], FRAMES_PER_CHUNK),  # the gate for what follows
        by_size=by_size, speedup_by_size=speedup, memory_ratio_by_size=memory, memory_ratio_max=max(memory.values()),
        speedup_growth_min=min([b / a for a, b in zip(ordered[:-1], ordered[1:])], default=1.0),
        window_memory_over_forcing_kv=q["window"]["cache_bytes"] / q["forcing_kv"]["cache_bytes"],
        psnr_gain_over_window_db=psnr["forcing_kv"] - psnr["window"],
        segment_choice_gain_db=psnr["forcing_kv"] - max(psnr["random_segments"], psnr["high_similarity"]),
        attention=impl, device=str(device), train_seconds=0.0 if info["cached"] else round(info["train_seconds"], 1),
        model_train_seconds=round(info["train_seconds"], 1),
        metric_note="psnr, traj_err, drift, discontinuity: common/data.py compare_videos, against the full-cache "
                    "video from the same noise; sizes above --size measure cost (the model is trained at --size)")
    res["claims"] = claims(res)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    save_json(out / "results.json", res)
    figures(out, cfg, videos, score, kinds, res)
    print_table([(f"{s}px {name}", "ref" if r["psnr"] is None else r["psnr"], r["traj_err"], r["drift"],
                  r["discontinuity"], r["cache_bytes"] / rows["full"]["cache_bytes"], r["fps"])
                 for s, rows in by_size.items() for name, r in rows.items()],
                ("cache", "PSNR", "traj err", "drift", "discont.", "memory", "fps"))
    fq = res["full_quality"]
    print_table([(c["claim"], c["paper"], c["ours"], c["criterion"], c["reproduced"]) for c in res["claims"]] + [
        ("full-cache gate: colour kept, area drift", "", f"{fq['colour_kept']:.3f}, {fq['area_drift']:.3f}",
         ">= 0.95, |.| <= 0.3", fq["colour_kept"] >= 0.95 and abs(fq["area_drift"]) <= 0.3)],
        ("claim", "paper", "ours", "criterion", "reproduced"))
    print(f"{res['seconds']} s (training: {res['train_seconds']} s); wrote {out}/results.json and figures")
    return res


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python forcing_kv.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
