"""A chunk-causal video DiT (forcing_kv.py): the blocks of common/dit.py over the tokens of several
frames, each frame with its own time, the frame index seen through rotary q/k (Wan's temporal RoPE),
and every attention call routed through a hook, where a KV cache or a training mask plugs in.
`teacher_forcing` is the training hook: CausVid's layout [clean copy of the context; noisy clip] in one
pass, under a mask that reproduces chunk-by-chunk generation's causality."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from common.dit import Block, modulate, patchify, sincos_2d, timestep_embedding

PATCH = 4  # 16 tokens per 16 px frame, 256 at 64 px
FRAMES_PER_CHUNK = 3  # F: Self Forcing's chunk of 3 latent frames


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
