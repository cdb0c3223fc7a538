"""TinyDiT: a small Diffusion Transformer (Peebles & Xie 2023) conditioned the way SD3 is.

    image (B, C, H, W) -> patches (B, N, P*P*C) -> tokens (B, N, D) + 2-D sin-cos positions
    context tokens (B, L+1, D): a BOS token at index 0, then L label tokens (the "prompt")
    joint attention over [context ; image] tokens in every block; adaLN-Zero modulation from
    c = embed(t) + pooled label embedding; output: the velocity of the image tokens only.

Two conditioning paths at once, as in SD3 (pooled text vector in adaLN + text tokens in joint
attention): a probe showed that a label reaching the model through a single token vanishes when
that one key is masked, which SD3 does not suffer. Label index `n_classes` is the null label
(CFG dropout). `time_cond=False` removes the time input entirely (time_blind_fm.py).

Every attention call goes through one hook: `hook(q, k, v, layer) -> out`, with q, k, v of shape
(B, H, N, Dh) and out (B, H, Nq, Dh). Without a hook, SDPA runs. A hook can record attention
probabilities, edit scores or values of chosen keys, or attend to cached keys/values with its
own mask -- without editing this file. `attention_ref` is the explicit softmax(q k^T / sqrt(Dh)) v
that such hooks build on; a test checks it against SDPA.
"""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

VERSION = 2  # part of every checkpoint key: bump it whenever the architecture or the init changes

# Size presets: width D, depth, heads H. Small on purpose: everything must train on a laptop CPU.
SIZES = {
    "xs": dict(width=64, depth=2, heads=4),
    "s": dict(width=96, depth=4, heads=4),
    "m": dict(width=128, depth=6, heads=4),
    "l": dict(width=256, depth=8, heads=8),
}


def attention_ref(q, k, v, mask=None, return_probs=False):
    """The obvious attention: softmax(q k^T / sqrt(Dh) + mask) v.
    q: (B, H, Nq, Dh), k, v: (B, H, Nk, Dh); mask: bool (True = attend) or additive float,
    broadcastable to (B, H, Nq, Nk)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Nq, Nk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1)
    out = probs @ v  # (B, H, Nq, Dh)
    return (out, probs) if return_probs else out


def attention(q, k, v, mask=None):
    """The fast path: PyTorch's fused scaled-dot-product attention (same maths as attention_ref)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def patchify(x: torch.Tensor, P: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C) with N = (H/P)(W/P), row-major over patches."""
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=P, q=P)


def unpatchify(tokens: torch.Tensor, P: int, C: int, H: int) -> torch.Tensor:
    """(B, N, P*P*C) -> (B, C, H, W), the inverse of patchify for square images."""
    return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=H // P, p=P, q=P, c=C)


def sincos_2d(grid: int, D: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (DiT, MAE): half the channels code the row, half the
    column. -> (grid*grid, D)."""
    assert D % 4 == 0, f"width D={D} must be divisible by 4 for the 2-D sin-cos embedding"
    freqs = 1.0 / 10000 ** (torch.arange(D // 4) / (D // 4))
    pos = torch.arange(grid).float()
    ang = pos[:, None] * freqs[None]  # (grid, D/4)
    emb1d = torch.cat([ang.sin(), ang.cos()], 1)  # (grid, D/2)
    rows = emb1d[:, None, :].expand(grid, grid, D // 2)
    cols = emb1d[None, :, :].expand(grid, grid, D // 2)
    return torch.cat([rows, cols], -1).reshape(grid * grid, D)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as DiT scales its integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    ang = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], -1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, D: int, H: int):
        super().__init__()
        assert D % H == 0, f"width D={D} must be divisible by heads H={H}"
        self.H = H
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x, hook=None, layer: int = 0):
        q, k, v = rearrange(self.qkv(x), "b n (three h dh) -> three b h n dh", three=3, h=self.H)
        out = hook(q, k, v, layer) if hook is not None else attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(rearrange(out, "b h n dh -> b n (h dh)"))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: c sets a shift, scale and gate for both the
    attention and the MLP branch; the gates start at zero so every block starts as identity."""

    def __init__(self, D: int, H: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, H)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(D, mlp_ratio * D), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * D, D))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c, hook=None, layer: int = 0):
        """x: (B, N, D); c: (B, D), or (B, N, D) for a per-token condition (e.g. per-frame t)."""
        mod = self.ada(c)
        mod = mod[:, None] if mod.dim() == 2 else mod  # (B, 1 or N, 6D)
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, -1)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), hook, layer)
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class TinyDiT(nn.Module):
    def __init__(self, img_size=16, channels=3, patch=2, width=96, depth=4, heads=4,
                 n_classes=9, label_tokens=4, time_cond=True, mlp_ratio=4):
        super().__init__()
        if img_size % patch:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch}")
        # One seed for all weights, drawn before any module is built: the init then does not
        # depend on which modules exist, so a time-blind net shares every other weight with its
        # time-conditioned twin built from the same seed.
        init_seed = int(torch.randint(0, 2**62, (1,)))
        self.img_size, self.C, self.P = img_size, channels, patch
        self.n_classes, self.time_cond = n_classes, time_cond
        self.null_label = n_classes  # the extra embedding row used for CFG dropout
        D, L = width, label_tokens if n_classes > 0 else 0
        self.n_ctx = 1 + L  # BOS + label tokens, always at the front of the sequence
        self.patch_embed = nn.Linear(patch * patch * channels, D)
        self.register_buffer("pos", sincos_2d(img_size // patch, D), persistent=False)
        self.bos = nn.Parameter(torch.zeros(1, 1, D))
        self.c0 = nn.Parameter(torch.zeros(D))  # the condition when nothing else is given
        if n_classes > 0:
            self.y_pooled = nn.Embedding(n_classes + 1, D)  # adaLN path
            self.y_tokens = nn.Embedding(n_classes + 1, L * D)  # in-context path
            self.ctx_pos = nn.Parameter(torch.zeros(1, 1 + L, D))
        self.blocks = nn.ModuleList([Block(D, heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final = nn.Linear(D, patch * patch * channels)
        if time_cond:  # registered last, so it is initialised last (see init_seed)
            self.t_embed = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.attn_hook = None  # see module docstring; set with `with attention_hook(model, fn):`
        self._init_weights(torch.Generator().manual_seed(init_seed))

    def _init_weights(self, g: torch.Generator):
        """All init decisions in one place (DiT): xavier linears, small embeddings, and zeros
        for every adaLN modulation and the output layer, so an untrained model predicts v = 0."""
        nn.init.normal_(self.bos, std=0.02, generator=g)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=g)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02, generator=g)
        if self.time_cond:
            for lin in (self.t_embed[0], self.t_embed[2]):
                nn.init.normal_(lin.weight, std=0.02, generator=g)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        for lin in (self.final_ada[-1], self.final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def condition(self, t, y=None, batch: int | None = None):
        """c = c0 + embed(t) + pooled label -> (B, D). A time-blind model never reads t."""
        B = batch if batch is not None else (t.shape[0] if t is not None else y.shape[0])
        c = self.c0.expand(B, -1)
        if self.time_cond:
            c = c + self.t_embed(timestep_embedding(t, c.shape[-1]))
        if self.n_classes > 0:
            c = c + self.y_pooled(self._labels(y, B, c.device))
        return c

    def _labels(self, y, batch: int, device) -> torch.Tensor:
        """y, or the null label for every example when y is None."""
        return torch.full((batch,), self.null_label, device=device, dtype=torch.long) if y is None else y

    def context(self, y, batch: int) -> torch.Tensor:
        """[BOS ; label tokens] -> (B, 1 + L, D); a missing y means the null label."""
        bos = self.bos.expand(batch, -1, -1)
        if self.n_classes == 0:
            return bos
        labels = self.y_tokens(self._labels(y, batch, bos.device)).reshape(batch, self.n_ctx - 1, -1)  # (B, L, D)
        return torch.cat([bos, labels], 1) + self.ctx_pos

    def forward(self, x, t=None, y=None):
        """x: (B, C, H, W) state at time t (B,); y: (B,) labels or None. -> velocity (B, C, H, W)."""
        B = x.shape[0]
        assert x.shape[1:] == (self.C, self.img_size, self.img_size), f"bad input shape {tuple(x.shape)}"
        tokens = self.patch_embed(patchify(x, self.P)) + self.pos  # (B, N, D)
        c = self.condition(t, y, batch=B)  # (B, D)
        h = torch.cat([self.context(y, B), tokens], 1)  # (B, n_ctx + N, D)
        for i, blk in enumerate(self.blocks):
            h = blk(h, c, self.attn_hook, i)
        mod = self.final_ada(c)  # (B, 2D), or (B, n_ctx + N, 2D) for a per-token condition
        shift, scale = (mod[:, None] if mod.dim() == 2 else mod[:, self.n_ctx:]).chunk(2, -1)
        out = self.final(modulate(self.final_norm(h[:, self.n_ctx:]), shift, scale))  # (B, N, P*P*C)
        return unpatchify(out, self.P, self.C, self.img_size)


@contextlib.contextmanager
def attention_hook(model: TinyDiT, hook):
    """Route every attention call of `model` through `hook(q, k, v, layer)` inside the block."""
    old, model.attn_hook = model.attn_hook, hook
    try:
        yield model
    finally:
        model.attn_hook = old


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
