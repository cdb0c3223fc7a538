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
    head score s = mass(last 4) / mass(after sink) . `head_scores`, `type_heads` (s >= 0.8: static)
    static heads: sink + recent frames .............. `CompressedCache.commit` (whole frames)
    dynamic heads: + lowest-similarity segments ..... `segment_scores`, `CompressedCache.commit`
    per-head variable-length attention .............. `attend` (common/varlen_attention.py layout)

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

Run
    python forcing_kv.py                     # cpu preset: training ~15 min once (cached), then ~10 min
    python forcing_kv.py --preset gpu        # GPU (not measured yet)
    python forcing_kv.py --preset smoke      # seconds, what the tests run
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
from common.varlen_attention import varlen_attention_ref

try:  # the fused Triton path lands in common/varlen_attention.py on its own branch (issue 10)
    from common.varlen_attention import resolve_impl, varlen_attention
except ImportError:
    resolve_impl = varlen_attention = None

# %% config and presets


@dataclasses.dataclass
class Config(BaseConfig):
    size: int = field(16, "frame side (px) of training and of the quality measurements")
    sizes: str = field("16,32,48", "frame sizes for the cost scaling (tokens per frame grow 9x from 16 to 48 px)")
    model: str = field("s", "DiT size (width, depth, heads; common/dit.py SIZES)", choices=tuple(SIZES))
    train_frames: int = field(9, "frames per training clip (3 chunks): rollouts run longer, to show drift")
    steps: int = field(2200, "optimizer steps (about 13 min on 2 CPU cores at batch 32)")
    batch: int = field(32, "training clips per step")
    lr: float = field(2e-3, "AdamW learning rate (the base model's: tiny model, short run)")
    chunks: int = field(8, "chunks per rollout (F = 3 frames each); longer than the training clips")
    sample_steps: int = field(4, "Euler steps per chunk (Self Forcing uses 4)")
    n_videos: int = field(8, "videos per cache and size (identical noise for every cache)")
    n_calib: int = field(8, "calibration rollouts for the offline head typing")
    threshold: float = field(0.8, "head score at or above which a head is static (the paper's 0.8)")
    recent: int = field(3, "most recent whole frames every compressed head keeps (one chunk)")
    buffer: int = field(1, "frames' worth of evicted segments each dynamic head keeps (about one in the paper)")
    attention: str = field("auto", "compressed-cache attention: torch, triton (fused kernel) or auto "
                                    "(triton on CUDA when present, torch otherwise)", choices=("auto", "torch", "triton"))

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
PATCH = 4  # 16 tokens per 16 px frame, 144 at 48 px
FRAMES_PER_CHUNK = 3  # F: Self Forcing's chunk of 3 latent frames
MAX_FRAME = 48  # training clips start at a random frame index below MAX_FRAME - train_frames
SINK = 0  # the sink is the first frame


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
