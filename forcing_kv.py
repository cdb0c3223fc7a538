"""Forcing-KV: hybrid KV-cache compression for autoregressive video diffusion.
Ji, Zhong, et al. (2026), arXiv 2605.09681. Official code: zju-jiyicheng/Forcing-KV. Long-form notes,
the official budgets, findings and every deviation: docs/forcing_kv.md.

Claim. In a chunk-wise autoregressive video DiT (Self Forcing, LongLive) some attention heads look at
the last few frames (static), others further back (dynamic). Static heads keep the sink frame and the
newest frame; dynamic heads also a one-frame buffer of the segments that changed most in the frames
just evicted. Generation speeds up, more so as frames get more tokens, with the video kept. Tested at
equal bytes: against uniform windows, and against dynamic heads keeping the newest evicted tokens.

Paper -> code (the method first, then the experiment)
    head score s = mass(last 4 key frames) / mass(key frames [3:]) . `head_scores`, `calibrate`, `type_heads`
    static heads and layer 0: sink + 1 recent frame (+ the chunk) .. `CompressedCache.commit`
    dynamic heads: + 1 frame's worth of lowest-similarity segments . `segment_scores`, `CompressedCache.choose`
    the choice scored on layer 1, shared by every layer ............ `CompressedCache.commit`
    per-head variable-length attention ............................. `CompressedCache.attend`, common/varlen_*
    Self Forcing's preallocated cache (the reference) .............. `FullCache`
    Self Forcing rollout: S steps, then a clean pass ............... `rollout` (no cache at all: `rollout_reference`)
    chunk-causal video DiT, rotary frame index, teacher forcing .... `VideoDiT`, `rotary`, `train_video_model`

Budgets (official configs; frames of N tokens): the sink frame, 1 recent frame, for dynamic heads 1 frame's
    worth of segments (4 per frame here, 6 there) refilled at every step from the 3 frames it evicts (so it
    reaches 2-6 frames back); heads grouped after AR step 1. Score: AR step 4, 15 key frames, [3:].
The task (common/data.py `visiting_shapes`): the label's shape, and a visitor of another colour that
    enters after the sink frame and blinks out for 1-3 frames: redrawing it needs 2-4 frames back.

Conventions (common/flow.py): t = 0 data, t = 1 noise, x_t = (1 - t) x + t eps, target eps - x, as in
    Self Forcing and Wan. F = 3 frames per chunk, S Euler steps, N tokens per frame, H heads, L layers.

Run
    python forcing_kv.py                     # cpu preset, 2 CPU cores: training 683 s once (cached), then 100 s
    python forcing_kv.py --preset gpu        # GPU (not measured yet)
    python forcing_kv.py --preset smoke      # seconds, what the tests run
    python forcing_kv.py --bench true        # one chunk-attention call: full SDPA / gather + SDPA / fused kernel
    python forcing_kv.py --attention triton  # generation through the fused kernel (CUDA; TRITON_INTERPRET=1 on CPU)
"""

# %% imports
import dataclasses
import time

import torch
import torch.nn.functional as F
from einops import rearrange
from matplotlib import colors, patches
from tqdm import tqdm

from common import config, dit
from common import data as data_mod
from common import varlen_attention as va
from common.config import BaseConfig, UserError, cli, field, int_list, print_table, resolve_device, run_dir, save_json
from common.dit import SIZES, attention_ref
from common.flow import interpolate, velocity_target
from common.plot import grid as image_grid
from common.plot import plt, save_curves, save_fig
from common.sampler import autocast
from common.stats import bootstrap_ci, paired_ci, rank_corr
from common.train import EMA, load_or_train, make_optimizer, optimizer_step
from common.video_dit import FRAMES_PER_CHUNK, PATCH, VideoDiT, rotary, teacher_forcing  # noqa: F401 (the tests)

# %% config and presets

SEGMENTS = 4  # segments per frame for the dynamic buffer (official num_frame_patch: 6); one row at 16 px
AR_START = 1  # heads are grouped after this AR step's clean pass (official `ar_start: 1`, Self Forcing)
CALIB_STEP, SKIP_FRAMES, LAST_FRAMES = 4, 3, 4  # the official score: AR step 4, key frames [3:], last 4
CONTEXT_NOISE = 0.1  # training context chunks sit at t ~ U(0, 0.1): nearly clean, as at generation
RESTART = 0.25  # share of training chunks denoised without context: more first chunks (one per 24 frames)
TIMING_REPEATS, N_BOOT = 3, 2000  # frames per second: the best of 3 rollouts per cache; bootstrap resamples
KINDS = {"layer0": 0, "static": 1, "dynamic": 2}  # layer 0 is untyped; it keeps what static heads keep
UNIFORM = {"sink + W recent frames": ["sink+1", "sink+2", "sink+3", "sink+4"], "W recent frames": ["1 recent",
           "2 recent", "3 recent", "4 recent"]}  # the uniform caches, W = 1..4 (`variants`), two curves of bytes
GATE = dict(colour=0.95, area=0.3, visitor=0.75)  # the full-cache video must pass these (`full_gate`)


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
    n_videos: int = field(32, "videos per cache for quality (identical noise for every cache); intervals over them")
    draws: int = field(3, "draws of every random ablation (random head split, random segments)", min=1)
    n_calib: int = field(8, "calibration rollouts for the offline head typing")
    threshold: float = field(0.8, "head score at or above which a head is static (the paper's 0.8)")
    buffer: int = field(1, "frames' worth of evicted segments each dynamic head keeps (official: 1)", min=0)
    attention: str = field("auto", "compressed-cache attention: torch, triton (fused kernel), auto (CUDA: the kernel, "
                           "checked against torch on its first call)", choices=("auto", "torch", "triton"))
    bench: bool = field(False, "only benchmark one chunk-attention call (full, gather + SDPA, fused): bench.json")

    def validate(self):
        calib = FRAMES_PER_CHUNK * (CALIB_STEP + 1)
        for bad, msg in [
            (any(s % 8 for s in [self.size, *int_list(self.sizes, "--sizes", 8)]),
             f"--size and --sizes must be multiples of 8 (patch {PATCH}, {SEGMENTS} segments per frame)"),
            (self.train_frames % 3 or self.train_frames < calib,
             f"--train-frames must be whole chunks of 3, at least the {calib} frames of a calibration rollout"),
            (self.chunks < 2, "--chunks must be >= 2: a cache needs a chunk to remember"),
            (self.buffer > 3, f"--buffer {self.buffer}: it is refilled from the 3 frames evicted per step, so <= 3"),
            (not 0 < self.threshold < 1, f"--threshold must lie in (0, 1), got {self.threshold}"),
            (self.n_calib < 2 or self.sample_steps < 2 or self.n_videos < 2,
             "--n-calib, --sample-steps and --n-videos must be >= 2 (pairs)")]:
            if bad:
                raise UserError(msg)


PRESETS = {
    "smoke": dict(sizes="8,16", size=8, model="xs", train_frames=15, steps=6, batch=2, chunks=4, sample_steps=2,
                  n_videos=3, draws=2, n_calib=2),
    "cpu": dict(),
    "gpu": dict(sizes="16,32,64,96", steps=4000, batch=32, n_videos=64, n_calib=16),
}


# %% the method, 1: offline head typing


def head_scores(mass):
    """mass (L, S, n, H, key frames): the attention mass of the chunk's queries on each key frame, per layer,
    denoising step, video and head -> s (L, H) pooled, and per video (n, L, H) and per step (S, L, H):
    s = mass(last LAST_FRAMES key frames) / mass(key frames [SKIP_FRAMES:]), the official geometry."""
    last, valid = mass[..., -LAST_FRAMES:].sum(-1), mass[..., SKIP_FRAMES:].sum(-1)  # (L, S, n, H)
    return (last.sum((1, 2)) / valid.sum((1, 2)), (last.sum(1) / valid.sum(1)).transpose(0, 1),
            (last.sum(2) / valid.sum(2)).transpose(0, 1))


def type_heads(score, threshold: float):
    """(L, H) scores -> (L, H) kinds: static where s >= threshold, dynamic otherwise; layer 0 untyped."""
    kinds = torch.where(score >= threshold, KINDS["static"], KINDS["dynamic"])
    kinds[0] = KINDS["layer0"]
    return kinds


def typed_rank_corr(scores) -> float:
    """scores (n, L, H) over n draws: how alike the draws order the typed heads (layers >= 1)."""
    return rank_corr(scores[:, 1:])


# %% the method, 2: the caches (full, and compressed: Forcing-KV, its ablations, uniform windows)


class FullCache:
    """Self Forcing's cache: per layer one buffer (B, H, frames N, Dh) in the model's dtype. Each call writes
    the chunk's keys/values after the filled part (the clean pass's stay) and attends over the filled slice,
    a view: the cache is never copied. record=True: also keep the attention mass of the chunk's queries on
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
                              the last step: select 'low' (Forcing-KV) the lowest key similarity to the
                              next frame, 'high' the highest, 'random', 'newest' the newest tokens.
    Packed per layer as common/varlen_attention.py documents, one block of runs [sink; buffer; recent]
    per head kind. kinds: (L, H) ints of KINDS. impl: 'torch', 'triton', 'checked' or 'reference'."""

    def __init__(self, kinds, recent=1, buffer=1, select="low", sink=True, impl="torch", seed=0):
        self.kinds, self.recent, self.buffer, self.select, self.sink = kinds, recent, buffer, select, sink
        self.impl, self.g = impl, torch.Generator().manual_seed(seed)  # g: the random-segments ablation only
        self.layers, self.phase, self.sel = [None] * kinds.shape[0], -1, None  # sel (B, nb): the buffer's segments
        self.cand = None  # (first frame, frames): where the buffer's candidates came from, for fig_method

    def attend(self, q, k, v, layer):
        """Over the cache and the chunk's own k, v: `reference` (a loop over (b, h) pairs), `torch` (gather +
        SDPA per head group, as the official code), `triton` (the fused kernel) or `checked` (see there)."""
        c = self.layers[layer]
        if c is None:
            return F.scaled_dot_product_attention(q, k, v)
        if self.impl == "reference":
            return va.varlen_attention_ref(q, *c["kv"], c["offsets"], c["lengths"], k, v)
        return va.varlen_attention(q, *c["kv"], c["offsets"], c["lengths"], k, v, self.impl, c["groups"])

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
                        self.cand = (frame0 + FRAMES_PER_CHUNK - stream.shape[-2] // N, n_cand // N)
                    if kind == KINDS["dynamic"] and self.sel is not None:
                        cand = stream[..., :n_cand, :].unflatten(-2, (-1, seg))  # (2, B, G, segments, seg, Dh)
                        buf = cand.take_along_dim(self.sel[None, :, None, :, None, None], 3).flatten(-3, -2)
                run = torch.cat([sink, buf, stream[..., n_cand:, :]], -2)  # (2, B, G, n, Dh)
                blocks.append((heads, run, sink.shape[-2], buf.shape[-2]))
            self.pack(layer, blocks, kn.device)

    def choose(self, chain, N: int, nb: int):
        """chain (B, G, (f + 1) N, Dh): layer-1 keys of f candidate frames and the next -> (B, nb) kept segments."""
        score = segment_scores(chain, N)  # (B, f SEGMENTS), oldest segment first
        if self.select == "newest":  # the equal-byte control: the newest evicted tokens, no choice
            return torch.arange(score.shape[1] - nb, score.shape[1], device=score.device).expand(len(score), -1)
        if self.select == "random":
            score = torch.rand(score.shape, generator=self.g).to(score.device)
        return score.topk(nb, dim=1, largest=self.select == "high").indices.sort(1).values

    def pack(self, layer: int, blocks: list, device):
        """blocks [(heads, runs (2, B, G, n, Dh), sink and buffer lengths)] -> the layer's packed k, v (2, T,
        Dh), runs (b, head)-major and back to back; offsets, lengths (B, H) int32, built on the host (the
        grouped path's layout, `varlen_groups`) and copied to the device (the kernel reads them there): on
        CUDA a sync, once per layer per chunk; no attention call syncs."""
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
                                  groups=None if self.impl == "triton" else va.varlen_groups(offsets, lengths, device))

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


# %% the experiment, 1: a chunk-causal video DiT (common/video_dit.py) trained with teacher forcing


def make_model(cfg) -> VideoDiT:
    torch.manual_seed(cfg.seed)
    return VideoDiT(**SIZES[cfg.model])


def train_video_model(cfg, device) -> tuple[VideoDiT, dict]:
    """Teacher forcing (CausVid's; Self Forcing's baseline), whole clips in one pass: every chunk is noised
    to its own logit-normal t and denoised against a nearly clean copy of the earlier chunks, the context
    that generation's clean pass writes (`teacher_forcing`). No copy of the last chunk: nothing sees it."""
    model = make_model(cfg)
    key = dict(kind="forcing_kv", version=3, task="visiting_shapes", data_version=data_mod.VERSION,
               model_version=dit.VERSION, context_noise=CONTEXT_NOISE, restart=RESTART,
               **{k: getattr(cfg, k) for k in ("size", "model", "train_frames", "steps", "batch", "lr", "seed")})
    T, ctx, n_chunks = cfg.train_frames, cfg.train_frames - FRAMES_PER_CHUNK, cfg.train_frames // FRAMES_PER_CHUNK

    def fit(model):
        model.to(device).train()
        g = torch.Generator().manual_seed(cfg.seed)
        opt, ema = make_optimizer(model, cfg.lr), EMA(model, 0.999)
        clean, noisy = torch.arange(ctx, device=device), torch.arange(T, device=device)
        bar = tqdm(range(cfg.steps), desc="video model", mininterval=2.0)
        for _ in bar:
            x, y, _ = data_mod.visiting_shapes(cfg.batch, T, cfg.size, g)
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


# %% the experiment, 2: generation as Self Forcing does it, and the head typing's calibration


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


def calib_inputs(cfg):
    """Labels (n,) and noise (n, T, C, S, S) of the calibration rollouts: up to AR step CALIB_STEP."""
    g, T = torch.Generator().manual_seed(cfg.seed + 1), FRAMES_PER_CHUNK * (CALIB_STEP + 1)
    y = torch.randint(0, 9, (cfg.n_calib,), generator=g)
    return y, torch.randn(cfg.n_calib, T, 3, cfg.size, cfg.size, generator=g)


@torch.inference_mode()
def calibrate(model, cfg, device):
    """Full-cache calibration rollouts up to AR step CALIB_STEP -> `head_scores` of the recorded attention
    mass, and the mass itself (L, S, n, H, key frames)."""
    (y, noise), T = calib_inputs(cfg), FRAMES_PER_CHUNK * (CALIB_STEP + 1)
    cache = FullCache(model.depth, T, record=True)
    rollout(model, cache, y.to(device), noise.to(device), cfg.sample_steps)
    mass = torch.zeros(model.depth, cfg.sample_steps, cfg.n_calib, model.H, T)
    for layer, step, m in cache.records:
        mass[layer, step] = m.float().cpu()
    return (*head_scores(mass), mass)


# %% the experiment, 3: every cache from the same noise, at equal bytes


def variants(cfg, kinds, impl: str) -> dict:
    """name -> [cache factories] (one per draw for the random ablations). Uniform caches: `sink+W` keeps the
    sink and W recent frames in every head, `W recent` only the W frames (W = 1..4): the curve Forcing-KV
    is placed on. `newest evicted` is the equal-byte control: Forcing-KV's bytes, no choice of segments."""
    static = torch.full_like(kinds, KINDS["static"])

    def cache(k=kinds, **kw):
        return lambda: CompressedCache(k, **{"buffer": cfg.buffer, "impl": impl, "seed": cfg.seed, **kw})

    def shuffled(d):  # the same static share (layer 0 kept), another split of the typed heads
        g, k = torch.Generator().manual_seed(cfg.seed + 10 + d), kinds.clone()
        k[1:] = kinds[1:].flatten()[torch.randperm(kinds[1:].numel(), generator=g)].view_as(kinds[1:])
        return k

    return {**{f"sink+{w}": [cache(static, recent=w, buffer=0)] for w in range(1, 5)},  # = UNIFORM
            **{f"{w} recent": [cache(static, recent=w, buffer=0, sink=False)] for w in range(1, 5)},
            "forcing_kv": [cache()], "newest evicted": [cache(select="newest")],
            "random segments": [cache(select="random", seed=cfg.seed + d) for d in range(cfg.draws)],
            "highest similarity": [cache(select="high")],
            "random heads": [cache(shuffled(d)) for d in range(cfg.draws)],
            "no sink": [cache(recent=2, sink=False)]}  # Forcing-KV's budget with a second recent frame instead


def eval_inputs(cfg, size: int, n: int, device):
    """Labels (n,) and the rollout noise (n, T, C, size, size): the same for every cache."""
    g = torch.Generator().manual_seed(cfg.seed + 3)
    return (torch.randint(0, 9, (n,), generator=g).to(device),
            torch.randn(n, cfg.chunks * FRAMES_PER_CHUNK, 3, size, size, generator=g).to(device))


def quality(model, cfg, kinds, impl, device) -> tuple[dict, dict]:
    """Every cache at --size, from identical noise: per-video PSNR to the full cache's video, the share of
    the visitor's returns that keep its colour (`visitor_returns`), bytes; random ablations: mean over draws."""
    y, noise = eval_inputs(cfg, cfg.size, cfg.n_videos, device)
    fc = FullCache(model.depth, noise.shape[1])
    full = rollout(model, fc, y, noise, cfg.sample_steps).cpu()
    per, videos = {"full": dict(psnr=None, visitor=data_mod.visitor_returns(full, y.cpu()), bytes=fc.nbytes())}, {}
    todo, videos["full"] = variants(cfg, kinds, impl), full
    bar = tqdm(total=sum(map(len, todo.values())) * cfg.chunks, desc=f"caches at {cfg.size}px", mininterval=2.0)
    for name, makers in todo.items():
        p, v, b = [], [], []
        for make in makers:
            cache = make()
            videos[name] = rollout(model, cache, y, noise, cfg.sample_steps, bar).cpu()
            p.append(data_mod.psnr_per_video(videos[name], full))
            v.append(data_mod.visitor_returns(videos[name], y.cpu()))
            b.append(cache.nbytes())
        per[name] = dict(psnr=torch.stack(p).mean(0), visitor=torch.stack(v).nanmean(0), bytes=sum(b) / len(b))
    bar.close()
    return per, videos


def on_uniform_curve(per: dict, name: str) -> tuple[str, torch.Tensor]:
    """Per-video PSNR of the uniform caches interpolated linearly in bytes at `name`'s bytes, on the better
    of the two curves (with and without the sink) there; outside a curve's range, its nearest end."""
    best = None
    for label, curve in UNIFORM.items():
        xs = torch.tensor([per[c]["bytes"] for c in curve], dtype=torch.float64)
        j = int((xs <= per[name]["bytes"]).sum().clamp(1, len(xs) - 1))  # between point j - 1 and point j
        w = float(((per[name]["bytes"] - xs[j - 1]) / (xs[j] - xs[j - 1])).clamp(0, 1))
        y = (1 - w) * per[curve[j - 1]]["psnr"] + w * per[curve[j]]["psnr"]
        best = max(best or (label, y), (label, y), key=lambda ly: ly[1].mean().item())
    return best


def cost(model, cfg, kinds, size: int, impl: str, device) -> dict:
    """The full cache, Forcing-KV and sink+2 at one frame size, min(4, --n-videos) videos: bytes after the
    rollout and frames per second after a warm-up (best of TIMING_REPEATS, in turn: other work only slows one)."""
    y, noise = eval_inputs(cfg, size, min(4, cfg.n_videos), device)
    v = variants(cfg, kinds, impl)
    makers = {"full": lambda: FullCache(model.depth, noise.shape[1]), **{n: v[n][0] for n in ("forcing_kv", "sink+2")}}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    seconds, nbytes = {name: [] for name in makers}, {}
    [rollout(model, make(), y, noise[:, :FRAMES_PER_CHUNK], cfg.sample_steps) for make in makers.values()]  # warm-up
    for _ in tqdm(range(TIMING_REPEATS), desc=f"timing at {size}px", leave=False):
        for name, make in makers.items():
            cache = make()
            sync()
            t0 = time.perf_counter()
            rollout(model, cache, y, noise, cfg.sample_steps)
            sync()
            seconds[name].append(time.perf_counter() - t0)
            nbytes[name] = cache.nbytes()
    return {name: dict(fps=noise.shape[0] * noise.shape[1] / min(s), speedup=min(seconds["full"]) / min(s),
                       memory_ratio=nbytes[name] / nbytes["full"]) for name, s in seconds.items()}


CLAIMS = [  # claim; the paper's number; key in results.json; criterion; gated by the full-cache video; note
    ("a share of heads is static (s >= 0.8)", "about 40% (37-43% in the head files)", "static_fraction",
     "0.15 <= {v} <= 0.85", False, "layers >= 1, scored at AR step 4 with the official geometry"),
    ("head scores are stable across samples", "stable", "head_score_rank_corr.samples", "{v} >= 0.8", False,
     "Spearman correlation of the typed heads' scores between two calibration videos, mean over pairs"),
    ("head scores are stable across denoising steps", "stable", "head_score_rank_corr.steps", "{v} >= 0.8", False,
     "the same between two denoising steps"),
    ("generation is faster at the largest frame", "1.35-1.5x at 480p", "speedup_by_size.{big}", "{v} >= 1.3", False,
     "frames per second over the preallocated full cache's"),
    ("the speed-up grows with tokens per frame", "2.82x at 1080p", "speedup_growth_min", "{v} > 1", False,
     "the smallest ratio of the speed-ups at two consecutive frame sizes"),
    ("quality per byte: above the uniform caches", "VBench kept, 30 GB less", "psnr_vs_uniform_db.ci.0", "{v} > 0",
     True, "PSNR (dB) over the better uniform curve's at Forcing-KV's bytes; lower end of the 95% interval"),
    ("the chosen segments beat the newest evicted tokens", "-", "psnr_vs_newest_db.ci.0", "{v} > 0", True,
     "equal bytes; PSNR (dB), the lower end of the 95% interval over videos"),
    ("... and bring the visitor back in its colour more often", "-", "visitor_vs_newest.ci.0", "{v} > 0", True,
     "share of the visitor's returns in its last colour; the lower end of the 95% interval"),
    ("lowest-similarity segments beat random ones", "-", "psnr_vs_random_segments_db.ci.0", "{v} > 0", True,
     "PSNR (dB), random: mean over --draws draws per video; the lower end of the 95% interval"),
]


COMPARED = dict(newest="newest evicted", random_segments="random segments", high="highest similarity",
                random_heads="random heads", sink2="sink+2", no_sink="no sink")  # paired with Forcing-KV, per video


def claims(res: dict) -> list:
    """A claim gated by the full-cache video is untestable (reproduced None) when that video fails its gate."""
    big, out = max(res["speedup_by_size"], key=int), []
    for claim, paper, key, crit, gated, note in CLAIMS:
        key, crit = key.format(big=big), crit.format(v=key.format(big=big))
        ok = None if gated and not res["full_gate"] else lambda v, c=crit, k=key: None if v != v else eval(
            c.replace(k, repr(v)))
        out.append(config.claim_entry(res, claim, paper, key, crit, ok, note))
    return out


# %% figures

NAMES = {"forcing_kv": "Forcing-KV", "sink+2": "sink + 2 recent frames"}
KEEP_COLOURS = ["#eeeeee", "#4c72b0", "#dd8452", "#55a868"]  # evicted, kept whole frame, buffered segment, chunk


def fig_method(out, model, cfg, kinds, mass, device):
    """What each kind of head keeps while calibration video 1 generates its AR step 4 chunk (frames x
    segments: kept, buffered, evicted, the chunk itself), beside the head's attention mass over the frames
    with the full cache (`calibrate`). Drawn from a Forcing-KV cache's own state after 4 chunks."""
    y, noise = calib_inputs(cfg)
    cache = CompressedCache(kinds, buffer=cfg.buffer)
    rollout(model, cache, y[:1].to(device), noise[:1, :CALIB_STEP * FRAMES_PER_CHUNK].to(device), cfg.sample_steps)
    T, s = mass.shape[-1], head_scores(mass)[0]  # heads: layer 0's first, the highest- and lowest-scored typed
    heads = [(0, 0)] + [divmod(int(i), model.H) for i in (s[1:].argmax() + model.H, s[1:].argmin() + model.H)]
    fig, axes = plt.subplots(3, 2, figsize=(10, 6.5), gridspec_kw=dict(width_ratios=(1.4, 1)))
    for (l, h), (ax1, ax2) in zip(heads, axes):
        keep = torch.zeros(SEGMENTS, T)  # 0 evicted, 1 kept whole, 2 buffered segment, 3 the chunk
        keep[:, T - FRAMES_PER_CHUNK:], keep[:, [0, T - FRAMES_PER_CHUNK - 1]] = 3, 1
        if kinds[l, h] == KINDS["dynamic"] and cache.sel is not None:
            for j in cache.sel[0].tolist():
                keep[j % SEGMENTS, cache.cand[0] + j // SEGMENTS] = 2
        ax1.imshow(keep, cmap=colors.ListedColormap(KEEP_COLOURS), vmin=-0.5, vmax=3.5, aspect="auto")
        kind = ["layer 0 (untyped)", "static head", "dynamic head"][int(kinds[l, h])]
        ax1.set(title=f"layer {l}, head {h}: {kind}, s = {s[l, h]:.2f}", ylabel="segment (row)",
                xticks=range(T), yticks=range(SEGMENTS))
        m = mass[l, :, 0, h].sum(0)
        ax2.bar(range(T), (m / m.sum()).numpy(), color="grey")
        ax2.set(title="its attention mass, full cache", xticks=range(0, T, 2), ylim=(0, 1))
    axes[-1, 0].set_xlabel("frame (12-14: the chunk being generated)")
    axes[-1, 1].set_xlabel("key frame")
    handles = [patches.Patch(color=c, label=t) for c, t in zip(KEEP_COLOURS, ("evicted", "kept whole frame",
                                                                         "buffered segment", "the chunk itself"))]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9)
    save_fig(fig, out / "fig_method.png", rect=(0, 0.05, 1, 1))


def figures(out, cfg, videos, score, kinds, res):
    rows, T = ("full", "sink+2", "newest evicted", "forcing_kv"), videos["full"].shape[1]
    strip = torch.cat([image_grid(videos[n][i], nrow=T) for i in range(2) for n in rows], 0)
    fig, ax = plt.subplots(figsize=(0.45 * T + 2, 0.45 * 2 * len(rows) + 0.8))
    ax.imshow(strip.numpy(), interpolation="nearest")
    ax.set(yticks=[strip.shape[0] / (2 * len(rows)) * (i + 0.5) for i in range(2 * len(rows))], xticks=[],
           yticklabels=[f"video {i + 1}: {NAMES.get(n, n)}" for i in range(2) for n in rows],
           title=f"frames 1-{T}, the same noise in every cache")
    save_fig(fig, out / "fig_filmstrip.png")
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    im = ax.imshow(score.numpy(), vmin=0, vmax=1, cmap="coolwarm_r")
    for (l, h), k in zip(torch.cartesian_prod(*map(torch.arange, score.shape)).tolist(), kinds.flatten().tolist()):
        ax.text(h, l, f"{'LSD'[k]}\n{score[l, h]:.2f}", ha="center", va="center", fontsize=8)
    ax.set(xlabel="head", ylabel="layer", xticks=range(score.shape[1]), yticks=range(score.shape[0]),
           title="head score s (L untyped, S static, D dynamic)")
    fig.colorbar(im, ax=ax, label=f"s (static at >= {cfg.threshold})")
    save_fig(fig, out / "fig_head_types.png")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    curve = res["bytes_curve"]  # the uniform caches first: sink + W, then W recent (W = 1..4); then the others
    groups = [(curve[:4], "sink + W recent frames, W = 1-4", "o-"), (curve[4:8], "W recent frames, W = 1-4", "o-")]
    groups += [([e], NAMES.get(e["name"], e["name"]), "*" if e["name"] == "forcing_kv" else "s") for e in curve[8:]]
    for pts, label, fmt in groups:
        ax.errorbar([p["memory"] for p in pts], [p["psnr"] for p in pts], [[p["psnr"] - p["psnr_ci"][0] for p in pts],
                    [p["psnr_ci"][1] - p["psnr"] for p in pts]], fmt=fmt, ms=11 if fmt == "*" else 4, capsize=2,
                    label=label)
    ax.set(xlabel="cache bytes / the full cache's", ylabel="PSNR to the full-cache video (dB)",
           title=f"{cfg.n_videos} videos, 95% intervals over videos")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_fig(fig, out / "fig_bytes.png")
    sizes = sorted(res["by_size"], key=int)
    save_curves({f"{what}, {NAMES.get(n, n)} / full": ([(int(s) // PATCH) ** 2 for s in sizes],
                 [res["by_size"][s][n][k] for s in sizes]) for n in ("forcing_kv", "sink+2") for what, k in
                 (("speed-up", "speedup"), ("memory", "memory_ratio"))}, out / "fig_scaling.png", "tokens per frame",
                "ratio to the full cache", f"after {cfg.chunks * FRAMES_PER_CHUNK} frames", logx=True)


# %% run


def run(cfg: Config) -> dict:
    t0, device = time.perf_counter(), resolve_device(cfg.device)
    impl = va.resolve_impl(cfg.attention, device)
    out = run_dir(cfg, "forcing_kv")
    if cfg.bench:  # the kernel benchmark (common/varlen_attention.py); no model needed
        return va.run_bench(out, device)
    model, info = train_video_model(cfg, device)
    score, per_sample, per_step, mass = calibrate(model, cfg, device)
    kinds = type_heads(score, cfg.threshold)
    per, videos = quality(model, cfg, kinds, impl, device)
    sizes = sorted({*int_list(cfg.sizes, "--sizes", 8), cfg.size})
    by_size = {str(s): cost(model, cfg, kinds, s, impl, device) for s in sizes}
    speedup = {s: r["forcing_kv"]["speedup"] for s, r in by_size.items()}
    fkv, full = per["forcing_kv"], per["full"]  # the gate: can the full cache do the task?
    fq = dict(data_mod.object_kept(videos["full"]), visitor_returns_kept=full["visitor"].nanmean().item())
    caches = {n: dict(name=n, bytes=p["bytes"], memory=p["bytes"] / full["bytes"], psnr=p["psnr"].mean().item(),
                      psnr_ci=bootstrap_ci(p["psnr"], N_BOOT, cfg.seed), visitor_returns_kept=p["visitor"].nanmean()
                      .item()) for n, p in per.items() if n != "full"}
    curve, uniform = on_uniform_curve(per, "forcing_kv")
    res = dict(
        static_fraction=(kinds[1:] == KINDS["static"]).float().mean().item(),
        static_fraction_by_threshold={str(x): (score[1:] >= x - 1e-9).float().mean().item() for x in (.6, .7, .8, .9)},
        score_uniform_reference=LAST_FRAMES / (FRAMES_PER_CHUNK * (CALIB_STEP + 1) - SKIP_FRAMES),
        head_score_rank_corr=dict(samples=typed_rank_corr(per_sample), steps=typed_rank_corr(per_step)),
        head_scores=score.tolist(), head_types=[["LSD"[k] for k in row] for row in kinds.tolist()],
        full_quality=fq, full_gate=fq["colour_kept"] >= GATE["colour"] and abs(fq["area_drift"]) <= GATE["area"]
        and fq["visitor_returns_kept"] >= GATE["visitor"],
        bytes_curve=list(caches.values()), by_cache=caches,  # one list for the figure, one dict for look-ups
        memory_ratio=fkv["bytes"] / full["bytes"],  # budget arithmetic: reported, not a claim
        psnr_vs_uniform_db=dict(paired_ci(fkv["psnr"], uniform, N_BOOT, cfg.seed), curve=curve),
        **{f"psnr_vs_{k}_db": paired_ci(fkv["psnr"], per[n]["psnr"], N_BOOT, cfg.seed) for k, n in COMPARED.items()},
        **{f"visitor_vs_{k}": paired_ci(fkv["visitor"], per[n]["visitor"], N_BOOT, cfg.seed)
           for k, n in COMPARED.items()},
        by_size=by_size, speedup_by_size=speedup, speedup_growth_min=min(
            [speedup[str(b)] / speedup[str(a)] for a, b in zip(sizes[:-1], sizes[1:])], default=1.0),
        kernel_check=next((dict(v, dtype=k[1]) for k, v in va.CHECK.items()), None) if impl == "checked" else None,
        attention=impl, device=str(device), train_seconds=0.0 if info["cached"] else round(info["train_seconds"], 1),
        model_train_seconds=round(info["train_seconds"], 1))
    res["claims"] = claims(res)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    save_json(out / "results.json", res)
    fig_method(out, model, cfg, kinds, mass, device)
    figures(out, cfg, videos, score, kinds, res)
    print_table([(e["name"], e["memory"], e["psnr"], e["psnr_ci"], e["visitor_returns_kept"])
                 for e in res["bytes_curve"]], ("cache", "bytes / full", "PSNR (dB)", "95% interval", "visitor kept"))
    print_table([(c["claim"], c["paper"], c["ours"], c["criterion"], c["reproduced"]) for c in res["claims"]] + [
        ("full-cache gate: colour kept, area drift, visitor", "", [fq[k] for k in fq], str(GATE), res["full_gate"])],
        ("claim", "paper", "ours", "criterion", "reproduced"))
    print(f"{res['seconds']} s (training: {res['train_seconds']} s); wrote {out}/results.json and figures")
    return res


def main(argv=None):
    return cli(run, Config, PRESETS, argv, prog="python forcing_kv.py", description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
