"""Attention of a chunk's queries over per-head, variable-length (compressed) key/value caches.

A compressed KV cache (forcing_kv.py) keeps a different number of tokens for every (batch, head):
static heads keep a few whole frames, dynamic heads keep more. It is stored *packed*: all kept keys
of all (b, h) pairs one after another in one (T, Dh) tensor, with `offsets[b, h]` and
`lengths[b, h]` saying where each pair's run starts and how long it is. No padding, no mask: the
memory held is exactly the tokens kept.

    q:                  (B, H, Nq, Dh)   the current chunk's queries
    k_packed, v_packed: (T, Dh)          every (b, h) pair's cached keys/values, back to back
    offsets, lengths:   (B, H) int       pair (b, h) owns rows offsets[b, h] : offsets[b, h] + lengths[b, h]
    k_new, v_new:       (B, H, Nn, Dh)   the chunk's own keys/values (attended by every query)
    -> out:             (B, H, Nq, Dh)   softmax(q [k_cache; k_new]^T / sqrt(Dh)) [v_cache; v_new]

In the order of Triton's tutorials: the reference (`varlen_attention_ref`, a loop over pairs), the
vectorised PyTorch path (`varlen_attention_grouped`: gather + SDPA per group of equal lengths, what
the official Forcing-KV code does per head type; `varlen_groups` is its bookkeeping, which a cache
computes once when it commits, not at every call), the fused kernel (`_varlen_attention_kernel`: online
softmax straight over the packed runs, no gathered copy), the launcher (`varlen_attention`,
`resolve_impl`), then the benchmark (`bench`, `run_bench`). The tests are in tests/test_varlen_attention.py.
Triton is optional: this module imports without it, and the kernel also runs on the CPU under
Triton's interpreter (TRITON_INTERPRET=1), which is how CI checks it (slowly; no speed claims).
"""

from __future__ import annotations  # keeps `tl.constexpr` annotations unevaluated when triton is absent

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.config import UserError, print_table
from common.dit import attention_ref

try:  # the fused path is optional: CUDA builds of torch ship triton, CPU-only installs may not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None


# %% 1. The reference, and the vectorised PyTorch path

def varlen_attention_ref(q, k_packed, v_packed, offsets, lengths, k_new, v_new):
    """The reference: for each (b, h), slice its cached run, append the chunk's own keys/values and
    run plain softmax attention. Slow (a Python loop over B * H pairs) and obviously right."""
    B, H, Nq, Dh = q.shape
    assert k_packed.shape == v_packed.shape and k_packed.shape[1] == Dh, "packed K/V must be (T, Dh)"
    assert offsets.shape == lengths.shape == (B, H), "offsets and lengths must be (B, H)"
    assert k_new.shape[:2] == (B, H) and k_new.shape == v_new.shape, "k_new, v_new must be (B, H, Nn, Dh)"
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            s, n = int(offsets[b, h]), int(lengths[b, h])
            k = torch.cat([k_packed[s:s + n], k_new[b, h]])  # (n + Nn, Dh)
            v = torch.cat([v_packed[s:s + n], v_new[b, h]])
            out[b, h] = attention_ref(q[b, h][None, None], k[None, None], v[None, None])[0, 0]
    return out


def varlen_groups(offsets, lengths, device=None) -> list:
    """The grouped path's bookkeeping, done once per cache layout (a cache calls it when it commits,
    not per attention call): for each distinct run length n, the pairs that have it (flat indices
    b * H + h, ascending) and where their runs lie. -> [(n, sel (G,), rows)]: rows is the int start
    row when the G runs lie back to back in sel order (as a cache packs them; the gather is then a
    view), else a (G, n) index tensor. offsets, lengths: (B, H) host tensors (device ones cost a sync)."""
    lens, offs = lengths.reshape(-1).tolist(), offsets.reshape(-1).tolist()
    groups = []
    for n in sorted(set(lens)):
        pairs = [i for i, m in enumerate(lens) if m == n]
        starts = [offs[i] for i in pairs]
        back_to_back = all(s == starts[0] + j * n for j, s in enumerate(starts))
        rows = starts[0] if back_to_back else (torch.tensor(starts, device=device)[:, None]
                                               + torch.arange(n, device=device))
        groups.append((n, torch.tensor(pairs, device=device), rows))
    return groups


def varlen_attention_grouped(q, k_packed, v_packed, offsets, lengths, k_new, v_new, groups=None):
    """Gather + SDPA per group of pairs with equal cache length (the official code's way: one group
    per head type). Vectorised, but it materialises a gathered, concatenated K/V copy per group.
    groups: `varlen_groups(offsets, lengths)`, precomputed by the caller; built here when None."""
    B, H, Nq, Dh = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, so o_ below is a view
    q_, kn, vn, o_ = (x.reshape(B * H, 1, -1, Dh) for x in (q, k_new, v_new, out))  # (B*H, 1, N, Dh) views
    for n, sel, rows in (varlen_groups(offsets, lengths, q.device) if groups is None else groups):
        if isinstance(rows, int):  # back to back: the cached runs are a view, (G, n, Dh)
            kc, vc = (x[rows:rows + len(sel) * n].view(len(sel), n, Dh) for x in (k_packed, v_packed))
        else:
            kc, vc = k_packed[rows], v_packed[rows]  # (G, n, Dh): the gather
        k = torch.cat([kc[:, None], kn[sel]], dim=2)  # (G, 1, n + Nn, Dh): the copy
        v = torch.cat([vc[:, None], vn[sel]], dim=2)
        o_[sel] = F.scaled_dot_product_attention(q_[sel], k, v)
    return out


# %% 2. The fused kernel: one program per (b, h, block of queries)

def _jit(fn):  # without triton the kernel is still defined (and readable), it just cannot be launched
    return triton.jit(fn) if triton is not None else fn


@_jit
def _varlen_attention_kernel(Q, KC, VC, Offsets, Lengths, KN, VN, Out, sm_scale, H, Nq, Nn,
                             sqb, sqh, sqm, skc, snb, snh, snn, svb, svh, svn, sob, soh, som,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Flash-attention's online softmax over one pair's keys, read in BLOCK_N tiles: first its packed
    cached run, then the chunk's own keys. Both are one *virtual* sequence of n + Nn keys: tile
    column j comes from the cache if j < n, else from k_new[j - n]; two masked loads, never a copy.
    The last dimension is contiguous (stride 1) in every tensor; BLOCK_D pads HEAD_DIM to a power of 2."""
    pid_bh, pid_m = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: every pointer offset below
    b, h = pid_bh // H, pid_bh % H  # is computed in 64 bits, so caches past 2^31 elements address right
    start, n = tl.load(Offsets + pid_bh).to(tl.int64), tl.load(Lengths + pid_bh)  # this pair's run
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,) query indices
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims[None, :] < HEAD_DIM  # (1, BLOCK_D): the padding of a non-power-of-2 head dim
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :], mask=(rows[:, None] < Nq) & d_ok,
                other=0.0)  # (BLOCK_M, BLOCK_D)
    qk_scale = sm_scale * 1.4426950408889634  # 1/sqrt(Dh) times log2(e): exp2 below is exp
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v
    k_base, v_base = b * snb + h * snh, b * svb + h * svh  # the chunk's own keys and values: own strides
    for j0 in range(0, n + Nn, BLOCK_N):  # every tile holds >= 1 real key, so m_i is finite after it
        cols = j0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) positions in the virtual sequence
        in_cache, in_new = cols < n, (cols >= n) & (cols < n + Nn)  # the ragged tail is in neither
        c_ptr = (start + cols)[:, None] * skc + dims[None, :]  # (BLOCK_N, BLOCK_D)
        kn_ptr = k_base + (cols - n)[:, None] * snn + dims[None, :]
        vn_ptr = v_base + (cols - n)[:, None] * svn + dims[None, :]
        c_ok, n_ok = in_cache[:, None] & d_ok, in_new[:, None] & d_ok
        k = tl.where(c_ok, tl.load(KC + c_ptr, mask=c_ok, other=0.0), tl.load(KN + kn_ptr, mask=n_ok, other=0.0))
        v = tl.where(c_ok, tl.load(VC + c_ptr, mask=c_ok, other=0.0), tl.load(VN + vn_ptr, mask=n_ok, other=0.0))
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        s = tl.where((in_cache | in_new)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + b * sob + h * soh + rows[:, None] * som + dims[None, :], out.to(Out.dtype.element_ty),
             mask=(rows[:, None] < Nq) & d_ok)


# %% 3. The launcher

def _interpreting() -> bool:
    """Triton reads TRITON_INTERPRET once, when it is imported: set it before (tests/conftest.py does)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_grid(B: int, H: int, Nq: int, block_m: int = 64) -> tuple:
    """(BLOCK_M, grid): B * H pairs in grid dimension 0 (CUDA allows 2^31 - 1 there, 65,535 in the others),
    the query blocks in dimension 1. tl.dot needs tiles of >= 16 rows."""
    BLOCK_M = min(block_m, max(16, triton.next_power_of_2(Nq)))
    return BLOCK_M, (B * H, triton.cdiv(Nq, BLOCK_M))


def varlen_attention_triton(q, k_packed, v_packed, offsets, lengths, k_new, v_new, block_m=64, block_n=64):
    """Launch the fused kernel. Same arguments and result as the reference. No gathered or concatenated
    K/V copy; the kernel reads q, k_new, v_new and out through their strides, so an input is copied only
    when its last dimension is not contiguous, or when k_packed and v_packed have different strides."""
    B, H, Nq, Dh = q.shape
    Nn = k_new.shape[2]
    assert k_packed.shape == v_packed.shape and k_packed.shape[1] == Dh and offsets.shape == lengths.shape == (B, H)
    assert k_new.shape == v_new.shape == (B, H, Nn, Dh) and Nn >= 1, "the chunk attends at least to itself"
    assert q.dtype == k_packed.dtype == v_packed.dtype == k_new.dtype == v_new.dtype, (
        f"one dtype for the queries, the cache and the new K/V, got {q.dtype}, {k_packed.dtype}, {k_new.dtype}")
    q, k_packed, v_packed, k_new, v_new = (x if x.stride(-1) == 1 else x.contiguous()
                                           for x in (q, k_packed, v_packed, k_new, v_new))
    if k_packed.stride() != v_packed.stride():  # one row stride is passed for both
        k_packed, v_packed = k_packed.contiguous(), v_packed.contiguous()
    # A cache stores offsets/lengths as int32 on the device when it commits: then these are no-ops.
    offsets, lengths = offsets.to(q.device, torch.int32).contiguous(), lengths.to(q.device, torch.int32).contiguous()
    out = torch.empty_like(q)  # q's strides (empty_like keeps a dense layout)
    BLOCK_M, grid = launch_grid(B, H, Nq, block_m)
    _varlen_attention_kernel[grid](
        q, k_packed, v_packed, offsets, lengths, k_new, v_new, out, 1 / math.sqrt(Dh), H, Nq, Nn,
        *q.stride()[:3], k_packed.stride(0), *k_new.stride()[:3], *v_new.stride()[:3], *out.stride()[:3],
        HEAD_DIM=Dh, BLOCK_D=max(16, triton.next_power_of_2(Dh)), BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None)  # fp32: exact products, no TF32 rounding
    return out


def resolve_impl(name: str, device) -> str:
    """--attention {auto,torch,triton} -> 'torch', 'triton' or 'checked'. auto: 'checked' (the kernel,
    checked on its first call) where it can run compiled (CUDA and triton), else 'torch'; asking for
    triton where it cannot run is a UserError."""
    device = torch.device(device)
    if name == "torch":
        return "torch"
    if name == "auto":
        return "checked" if device.type == "cuda" and triton is not None else "torch"
    if name != "triton":
        raise UserError(f"--attention must be auto, torch or triton; got {name!r}")
    if triton is None:
        raise UserError("--attention triton needs the triton package (pip install triton); use --attention torch")
    if device.type != "cuda" and not _interpreting():
        raise UserError("--attention triton needs a CUDA device (or TRITON_INTERPRET=1 to run it slowly on the CPU); "
                        "use --attention torch")
    return "triton"


TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}  # max abs difference, fused vs torch
CHECK = {}  # (device, dtype) -> the first call's check: path, max_abs_diff, tolerance (one per process)


def checked_attention(*args, groups=None):
    """impl 'checked', what auto picks on CUDA: the first call per (device, dtype) runs the fused kernel and
    gather + SDPA on the same inputs. Within TOLERANCE[dtype] the kernel runs from then on; beyond it (or
    not finite), one warning line and the PyTorch path. CHECK records the path and the largest difference."""
    q = args[0]
    key = (str(q.device), str(q.dtype).replace("torch.", ""))
    if key not in CHECK:
        ref = varlen_attention_grouped(*args, groups)
        diff = (varlen_attention_triton(*args).float() - ref.float()).abs().max().item()
        ok = diff <= TOLERANCE.get(q.dtype, 3e-2)  # False for NaN too
        CHECK[key] = dict(path="triton" if ok else "torch", max_abs_diff=diff, tolerance=TOLERANCE.get(q.dtype, 3e-2))
        if not ok:
            print(f"warning: the fused kernel differs from gather + SDPA by {diff:.3g} on {key}: using gather + SDPA")
        return ref
    if CHECK[key]["path"] == "triton":
        return varlen_attention_triton(*args)
    return varlen_attention_grouped(*args, groups)


def varlen_attention(q, k_packed, v_packed, offsets, lengths, k_new, v_new, impl="torch", groups=None):
    """The entry point for models: impl 'torch' (gather + SDPA per group; `groups` from `varlen_groups`,
    precomputed), 'triton' (fused kernel; offsets and lengths on q's device, int32) or 'checked'
    (`checked_attention`: the kernel, checked against 'torch' on its first call)."""
    if impl == "torch":
        return varlen_attention_grouped(q, k_packed, v_packed, offsets, lengths, k_new, v_new, groups)
    if impl == "checked":
        resolve_impl("triton", q.device)
        return checked_attention(q, k_packed, v_packed, offsets, lengths, k_new, v_new, groups=groups)
    if impl == "triton":
        resolve_impl("triton", q.device)  # one clear error instead of a crash deep inside triton
        return varlen_attention_triton(q, k_packed, v_packed, offsets, lengths, k_new, v_new)
    raise ValueError(f"impl must be 'torch' or 'triton', got {impl!r}")


# %% 4. The benchmark: time per chunk-attention call, full cache vs gather + SDPA vs fused

# (label, B, H, Dh, tokens per frame). TinyDiT-s: width 96, 4 heads of 24; frames of 16/32/64 px at
# patch 4. The last row is Wan2.1-1.3B-like at 480p (12 heads of 128, 60x104 latents / 2x2 patches).
TINY_SIZES = [("16px", 1, 4, 24, 16), ("32px", 1, 4, 24, 64), ("64px", 1, 4, 24, 256)]
GPU_SIZES = TINY_SIZES + [("480p-like", 1, 12, 128, 1560)]


def bench_case(B, H, Dh, tokens, cache_frames, chunk_frames=3, static_fraction=0.4, device="cpu",
               dtype=torch.float32, seed=0):
    """Random tensors shaped like one chunk-attention call. Full cache: cache_frames frames for every
    head. Compressed with the official Forcing-KV budgets: a random static_fraction of heads keeps the
    sink + the most recent frame, the others also a one-frame buffer of segments."""
    g = torch.Generator().manual_seed(seed)
    static = torch.rand(B, H, generator=g).argsort(1) < round(static_fraction * H)  # (B, H) head types
    lengths = torch.where(static, min(2, cache_frames) * tokens, min(3, cache_frames) * tokens)  # (B, H)
    offsets = (lengths.reshape(-1).cumsum(0) - lengths.reshape(-1)).reshape(B, H)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    Nq, T = chunk_frames * tokens, int(lengths.sum())
    return dict(q=r(B, H, Nq, Dh), k_packed=r(T, Dh), v_packed=r(T, Dh), offsets=offsets, lengths=lengths,
                k_new=r(B, H, Nq, Dh), v_new=r(B, H, Nq, Dh), k_full=r(B, H, cache_frames * tokens + Nq, Dh),
                v_full=r(B, H, cache_frames * tokens + Nq, Dh))


def _time_ms(device, fn, *args) -> float:
    """Median milliseconds per call fn(*args). On CUDA, triton's do_bench (it flushes the L2 cache
    between calls, so the K/V cannot sit in L2); on the CPU, wall-clock time after one warm-up call."""
    if device.type == "cuda" and triton is not None:
        fn(*args)  # compile first, so that do_bench's own first-call estimate is not the compile time
        return float(triton.testing.do_bench(lambda: fn(*args), warmup=25, rep=200, return_mode="median"))
    ts = []
    for _ in range(6):
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return 1e3 * sorted(ts[1:])[2]


def bench(device, sizes=TINY_SIZES, cache_frames=(8, 16, 24), seed=0, fused=None) -> dict:
    """Time (1) full-cache SDPA, (2) gather + SDPA per head group, (3) the fused kernel. fused=None:
    (3) only where it runs compiled (CUDA); fused=True under the interpreter is for tests only."""
    from tqdm import tqdm

    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 is what video models run in on GPUs
    compiled = cuda and triton is not None and not _interpreting()
    fused = compiled if fused is None else fused
    rows = []
    for (label, B, H, Dh, tokens), C in tqdm([(s, c) for s in sizes for c in cache_frames], desc="bench"):
        a = bench_case(B, H, Dh, tokens, C, device=device, dtype=dtype, seed=seed)
        args = [a[k] for k in ("q", "k_packed", "v_packed", "offsets", "lengths", "k_new", "v_new")]
        groups = varlen_groups(a["offsets"], a["lengths"], device)  # once per layout, as a cache does
        Nq = a["q"].shape[2]
        flop = 4 * Nq * Dh * int((a["lengths"] + Nq).sum())  # q k^T and p v over every pair's keys
        row = dict(size=label, B=B, H=H, Dh=Dh, tokens_per_frame=tokens, cache_frames=C,
                   kept_fraction=round(int(a["lengths"].sum()) / (B * H * C * tokens), 4),
                   ms_full_sdpa=_time_ms(device, F.scaled_dot_product_attention, a["q"], a["k_full"], a["v_full"]),
                   ms_gather_sdpa=_time_ms(device, varlen_attention_grouped, *args, groups))
        row["gather_TFLOPs"] = flop / (row["ms_gather_sdpa"] * 1e-3) / 1e12
        if fused:
            args[3:5] = [x.to(device, torch.int32) for x in args[3:5]]  # the kernel reads them on the device
            row["ms_fused"] = _time_ms(device, varlen_attention_triton, *args)
            n_read_write = 2 * (a["q"].numel() + a["k_packed"].numel() + a["k_new"].numel())  # q+out, K+V, new K+V
            row["fused_GBps"] = n_read_write * a["q"].element_size() / (row["ms_fused"] * 1e-3) / 1e9
            row["fused_TFLOPs"] = flop / (row["ms_fused"] * 1e-3) / 1e12  # compute-bound rows: read this
            row["speedup_fused_vs_gather"] = row["ms_gather_sdpa"] / row["ms_fused"]
            err = varlen_attention_triton(*args).float() - varlen_attention_grouped(*args, groups).float()
            row["max_abs_err_fused_vs_gather"] = float(err.abs().max())
        rows.append(row)
    note = "fused kernel timed"
    if not fused:
        note = ("fused kernel skipped: it needs CUDA (the CPU interpreter only checks correctness, see "
                "tests/test_varlen_attention.py; no speed claims)")
    elif not compiled:
        note = "fused kernel run in Triton's interpreter: its times are not speed measurements"
    return dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", dtype=str(dtype).replace("torch.", ""),
                fused_note=note, rows=rows)


def plot_bench(result: dict, path) -> None:
    """Milliseconds per call against tokens per frame, at the longest cache, one line per method."""
    from common.plot import plt  # the non-interactive backend

    C = max(r["cache_frames"] for r in result["rows"])
    rows = [r for r in result["rows"] if r["cache_frames"] == C]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, name in [("ms_full_sdpa", "full cache, SDPA"), ("ms_gather_sdpa", "compressed, gather + SDPA"),
                      ("ms_fused", "compressed, fused kernel")]:
        if key in rows[0]:
            ax.plot([r["tokens_per_frame"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=name)
    ax.set(xscale="log", yscale="log", xlabel="tokens per frame", ylabel="ms per attention call",
           title=f"{result['device']}, {result['dtype']}, cache of {C} frames")
    ax.set_xticks([r["tokens_per_frame"] for r in rows], [str(r["tokens_per_frame"]) for r in rows])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(out_dir, device, sizes=None, cache_frames=(8, 16, 24)) -> dict:
    """What `forcing_kv.py --bench` calls: bench, then <out_dir>/bench.json, fig_bench.png and a table."""
    device = torch.device(device)
    sizes = sizes or (GPU_SIZES if device.type == "cuda" else TINY_SIZES)
    result = bench(device, sizes, cache_frames)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_bench(result, out / "fig_bench.png")
    print_table([(r["size"], r["cache_frames"], r["kept_fraction"], r["ms_full_sdpa"], r["ms_gather_sdpa"],
                  r.get("ms_fused", "skipped"), r.get("fused_TFLOPs", "-")) for r in result["rows"]],
                ("frame", "cache frames", "kept", "ms full SDPA", "ms gather+SDPA", "ms fused", "fused TFLOP/s"))
    print(f"{result['device']}: {result['fused_note']}\nwrote {out}/bench.json and fig_bench.png")
    return result
