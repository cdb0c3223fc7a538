"""The fused varlen-attention kernel and the grouped PyTorch path against the loop reference.

Without CUDA the kernel runs under Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1
before anything imports triton. Setting it here would be too late: triton reads it once, at import,
and test modules collected before this one (test_forcing_kv.py) import triton through
common/varlen_attention.py. Plain `python -m pytest` therefore checks the kernel on a CPU-only
machine; with CUDA the same tests check the compiled kernel. Shapes stay tiny: the interpreter is slow.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common.varlen_attention as va
from common.config import UserError

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
KERNEL_DEVICE = "cpu" if INTERPRETED else "cuda"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (INTERPRETED or torch.cuda.is_available()),
    reason="the fused path needs triton, and CUDA or TRITON_INTERPRET=1 set before triton is imported")
ATOL_FP32 = 1e-5  # the tolerance: max abs error in fp32 against the reference


def make_case(lengths, Nq=6, Nn=5, Dh=24, seed=0, gaps=True, dtype=torch.float32):
    """Random tensors for per-(b, h) cache lengths (a (B, H) list). The runs are packed in a shuffled
    order with NaN rows between them, so a kernel that reads outside its own run fails loudly."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    B, H = lengths.shape
    order = torch.randperm(B * H, generator=g).tolist()  # storage order differs from (b, h) order
    offsets, pos = torch.zeros(B * H, dtype=torch.long), 0
    for i in order:
        pos += 2 if gaps else 0  # NaN rows between runs
        offsets[i], pos = pos, pos + int(lengths.reshape(-1)[i])
    T = pos + (2 if gaps else 0)
    k_packed, v_packed = torch.full((T, Dh), float("nan")), torch.full((T, Dh), float("nan"))
    for i in range(B * H):
        s, n = int(offsets[i]), int(lengths.reshape(-1)[i])
        k_packed[s:s + n], v_packed[s:s + n] = torch.randn(2, n, Dh, generator=g)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    args = (r(B, H, Nq, Dh), k_packed, v_packed, offsets.reshape(B, H), lengths, r(B, H, Nn, Dh), r(B, H, Nn, Dh))
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in args)


def max_err(a, b):
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


# %% the references agree with each other


def test_reference_equals_plain_attention_over_concatenated_keys():
    q, kp, vp, off, lens, kn, vn = make_case([[3, 0]], gaps=False)
    out = va.varlen_attention_ref(q, kp, vp, off, lens, kn, vn)
    s0 = int(off[0, 0])
    k, v = torch.cat([kp[s0:s0 + 3], kn[0, 0]]), torch.cat([vp[s0:s0 + 3], vn[0, 0]])
    expected = torch.softmax(q[0, 0] @ k.T / 24 ** 0.5, -1) @ v
    assert max_err(out[0, 0], expected) <= ATOL_FP32
    assert max_err(out[0, 1], torch.softmax(q[0, 1] @ kn[0, 1].T / 24 ** 0.5, -1) @ vn[0, 1]) <= ATOL_FP32


@pytest.mark.parametrize("lengths", [[[0, 1, 7], [7, 7, 30]], [[5, 5, 5, 5]], [[0, 0], [0, 0]]])
def test_grouped_gather_sdpa_equals_reference(lengths):
    args = make_case(lengths)
    assert max_err(va.varlen_attention_grouped(*args), va.varlen_attention_ref(*args)) <= ATOL_FP32
    assert max_err(va.varlen_attention(*args, impl="torch"), va.varlen_attention_ref(*args)) <= ATOL_FP32


def test_precomputed_groups_back_to_back_runs_are_views_and_agree():
    """A cache packs each head kind's runs back to back: varlen_groups then slices instead of gathering."""
    lengths = torch.tensor([[3, 5, 3], [3, 5, 3]])
    order = [0, 2, 3, 5, 1, 4]  # the length-3 runs first, (b, h)-major, then the length-5 runs
    offsets, pos = torch.zeros(6, dtype=torch.long), 0
    for i in order:
        offsets[i], pos = pos, pos + int(lengths.reshape(-1)[i])
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    args = (r(2, 3, 4, 8), r(pos, 8), r(pos, 8), offsets.view(2, 3), lengths, r(2, 3, 2, 8), r(2, 3, 2, 8))
    groups = va.varlen_groups(args[3], lengths)
    assert [(n, rows) for n, _, rows in groups] == [(3, 0), (5, 12)]  # both back to back: int start rows
    assert max_err(va.varlen_attention_grouped(*args, groups), va.varlen_attention_ref(*args)) <= ATOL_FP32
    shuffled = va.varlen_groups(torch.tensor([[0, 3, 11], [14, 17, 25]]), lengths)  # runs in (b, h) order
    assert all(torch.is_tensor(rows) for _, _, rows in shuffled)  # not back to back: gathered


def test_launcher_refuses_a_cache_of_another_dtype():
    q, kp, vp, off, lens, kn, vn = make_case([[3, 2]])
    with pytest.raises(AssertionError, match="one dtype"):
        va.varlen_attention_triton(q, kp.half(), vp.half(), off, lens, kn, vn)


# %% the fused kernel equals the reference


CASES = {  # name: (lengths (B, H), Nq, Nn, Dh, BLOCK_N)
    "zero_one_and_tails_B2": ([[0, 1, 17], [16, 33, 64]], 6, 5, 24, 16),
    "very_uneven_heads": ([[0, 150, 1, 2]], 5, 3, 16, 16),
    "long_and_short_dh32": ([[70, 3], [1, 0]], 9, 7, 32, 64),
    "dh64_more_queries_than_a_block": ([[40, 5]], 20, 4, 64, 16),
    "dh40_not_a_power_of_two": ([[9, 31, 0]], 4, 18, 40, 16),
}


@needs_triton
@pytest.mark.parametrize("name", CASES)
def test_kernel_equals_reference_fp32(name):
    lengths, Nq, Nn, Dh, block_n = CASES[name]
    args = make_case(lengths, Nq=Nq, Nn=Nn, Dh=Dh, seed=len(name))
    ref = va.varlen_attention_ref(*args)
    out = va.varlen_attention_triton(*(x.to(KERNEL_DEVICE) for x in args), block_m=16, block_n=block_n)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert max_err(out, ref) <= ATOL_FP32


@needs_triton
def test_kernel_random_lengths_and_dispatch():
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 90, (2, 4), generator=g)
    lengths[0, 1], lengths[1, 2] = 0, 1
    args = make_case(lengths.tolist(), Nq=7, Nn=6, Dh=24, seed=4)
    out = va.varlen_attention(*(x.to(KERNEL_DEVICE) for x in args), impl="triton")
    assert max_err(out, va.varlen_attention_ref(*args)) <= ATOL_FP32


def non_contiguous_case():
    """q and k_new as a model makes them: (B, N, H, Dh) tensors seen as (B, H, N, Dh) through a transpose."""
    q, kp, vp, off, lens, kn, vn = make_case([[4, 21], [0, 9]], Nq=6, Nn=5, Dh=16)
    q_t, kn_t = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, kn))  # same values, other strides
    assert not q_t.is_contiguous()
    return (q_t, kp, vp, off, lens, kn_t, vn), va.varlen_attention_ref(q, kp, vp, off, lens, kn, vn)


def test_grouped_accepts_non_contiguous_inputs():
    args, ref = non_contiguous_case()
    assert max_err(va.varlen_attention_grouped(*args), ref) <= ATOL_FP32


@needs_triton
def test_kernel_accepts_non_contiguous_inputs():
    args, ref = non_contiguous_case()
    assert max_err(va.varlen_attention_triton(*(x.to(KERNEL_DEVICE) for x in args)), ref) <= ATOL_FP32


@needs_triton
def test_kernel_fp16_close_to_fp32_reference():
    args = make_case([[12, 0, 37]], Nq=6, Nn=5, Dh=32, dtype=torch.float16)
    ref = va.varlen_attention_ref(*(x.float() if x.is_floating_point() else x for x in args))
    out = va.varlen_attention_triton(*(x.to(KERNEL_DEVICE) for x in args), block_n=16)
    assert out.dtype == torch.float16
    assert max_err(out, ref) <= 3e-3  # fp16 probabilities and output: ~2^-11 relative rounding


# The CUDA default (--attention auto): the kernel, checked against gather + SDPA on its first call, at the
# cpu preset's shapes: 16 px frames of 16 tokens, chunks of 3 frames (Nq = 48: BLOCK_M = 64, one block with
# 16 masked rows), 4 heads of 24 (BLOCK_D = 32), caches of 2 and 3 frames. On a GPU it runs in bf16, which
# Triton's interpreter cannot check (tl.dot on bf16 gives garbage there); fp16 is the nearest it can.


def cpu_preset_case(B, dtype, seed=0):
    lengths = torch.tensor([[32, 48, 32, 48]] * B)  # static heads: sink + 1 frame; dynamic: + 1 frame of buffer
    return make_case(lengths.tolist(), Nq=48, Nn=48, Dh=24, seed=seed, dtype=dtype)


def test_launch_grid_puts_the_pairs_in_dimension_0():
    pytest.importorskip("triton")
    assert va.launch_grid(B=64, H=12, Nq=48) == (64, (768, 1))
    block_m, grid = va.launch_grid(B=2048, H=64, Nq=4680)  # 131,072 pairs: more than CUDA's 65,535 in dim 1
    assert block_m == 64 and grid == (131072, 74) and grid[1] <= 65535


@needs_triton
@pytest.mark.parametrize("dtype, atol", [(torch.float32, ATOL_FP32), (torch.float16, 3e-3)])
def test_kernel_at_the_cpu_presets_shapes_block_m_64(dtype, atol):
    args = cpu_preset_case(B=8, dtype=dtype)
    assert va.launch_grid(8, 4, 48)[0] == 64
    ref = va.varlen_attention_ref(*(x.float() if x.is_floating_point() else x for x in args))
    out = va.varlen_attention_triton(*(x.to(KERNEL_DEVICE) for x in args))
    assert out.dtype == dtype and max_err(out, ref) <= atol


@needs_triton
def test_checked_path_runs_the_kernel_when_it_agrees(monkeypatch):
    monkeypatch.setattr(va, "CHECK", {})
    args = [x.to(KERNEL_DEVICE) for x in cpu_preset_case(B=2, dtype=torch.float32, seed=1)]
    ref = va.varlen_attention_ref(*args)
    calls = []
    kernel = va.varlen_attention_triton
    monkeypatch.setattr(va, "varlen_attention_triton", lambda *a: calls.append(1) or kernel(*a))
    for _ in range(3):
        assert max_err(va.varlen_attention(*args, impl="checked"), ref) <= ATOL_FP32
    (check,) = va.CHECK.values()
    assert check["path"] == "triton" and check["max_abs_diff"] <= ATOL_FP32 and len(calls) == 3


@needs_triton
def test_checked_path_falls_back_with_one_warning_line_when_the_kernel_disagrees(monkeypatch, capsys):
    monkeypatch.setattr(va, "CHECK", {})
    args = [x.to(KERNEL_DEVICE) for x in cpu_preset_case(B=2, dtype=torch.float32, seed=2)]
    ref = va.varlen_attention_ref(*args)
    monkeypatch.setattr(va, "varlen_attention_triton", lambda *a: va.varlen_attention_grouped(*a) + 0.1)  # broken
    for _ in range(3):
        assert max_err(va.varlen_attention(*args, impl="checked"), ref) <= ATOL_FP32  # the PyTorch path's answer
    (check,) = va.CHECK.values()
    assert check["path"] == "torch" and check["max_abs_diff"] == pytest.approx(0.1, abs=1e-5)
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


# The interpreter never compiles the kernel, so a construct that only the compiler rejects would slip
# through. This builds it for the H200 (sm_90, bf16, Dh = 24) down to a cubin, on the CPU, in a child
# process with the interpreter off (this process has triton imported in interpreter mode).
COMPILE_FOR_SM90 = """
from common.varlen_attention import _varlen_attention_kernel as fn
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kinds = dict(Offsets="*i32", Lengths="*i32", sm_scale="fp32",
                 **dict.fromkeys(["Q", "KC", "VC", "KN", "VN", "Out"], "*bf16"))
    sig = {p.name: "constexpr" if p.is_constexpr else kinds.get(p.name, "i32") for p in fn.params}
    src = ASTSource(fn, sig, constexprs=dict(HEAD_DIM=24, BLOCK_D=32, BLOCK_M=64, BLOCK_N=64, DOT_PRECISION=None))
except (ImportError, AttributeError, TypeError) as e:
    raise SystemExit(f"SKIP this triton's compile API differs: {e!r}")
print(sorted(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=120)
    if res.stderr.strip().startswith("SKIP"):
        pytest.skip(res.stderr.strip())
    assert res.returncode == 0 and "cubin" in res.stdout, res.stderr[-2000:]


# %% choosing the implementation


def test_resolve_impl(monkeypatch):
    assert va.resolve_impl("torch", "cpu") == "torch"
    assert va.resolve_impl("auto", "cpu") == "torch"  # the interpreter is for tests, never picked by auto
    with pytest.raises(UserError, match="auto, torch or triton"):
        va.resolve_impl("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UserError, match="needs a CUDA device") as e:
        va.resolve_impl("triton", "cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="needs a CUDA device"):  # the launcher checks too
        va.varlen_attention(*make_case([[2]]), impl="triton")
    if va.triton is not None:
        assert va.resolve_impl("auto", "cuda") == "checked"  # the kernel, checked on its first call
    monkeypatch.setattr(va, "triton", None)  # as if triton were not installed
    with pytest.raises(UserError, match="pip install triton"):
        va.resolve_impl("triton", "cpu")
    assert va.resolve_impl("auto", "cuda") == "torch"  # without triton: the PyTorch path
    with pytest.raises(ValueError):
        va.varlen_attention(*make_case([[2]]), impl="fast")


# %% the benchmark runs (timings are measured by running it, not here)


def test_bench_case_stores_fewer_tokens_for_static_heads():
    a = va.bench_case(B=1, H=5, Dh=8, tokens=4, cache_frames=8)
    lens = a["lengths"][0]
    assert a["k_packed"].shape == (int(lens.sum()), 8) and a["k_full"].shape == (1, 5, 8 * 4 + 12, 8)
    assert sorted(lens.tolist()) == [8, 8, 12, 12, 12]  # 2 static heads (sink + 1 frame), 3 dynamic (+ 1 frame)


def test_run_bench_on_cpu_tiny(tmp_path):
    res = va.run_bench(tmp_path, "cpu", sizes=[("tiny", 1, 2, 8, 4)], cache_frames=(2, 3))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved == json.loads(json.dumps(res)) and (tmp_path / "fig_bench.png").stat().st_size > 0
    assert res["device"] == "cpu" and "skipped" in res["fused_note"]
    assert [r["cache_frames"] for r in res["rows"]] == [2, 3]
    assert all(r["ms_full_sdpa"] > 0 and r["ms_gather_sdpa"] > 0 and "ms_fused" not in r for r in res["rows"])


@needs_triton
def test_bench_fused_branch_runs_and_agrees():
    res = va.bench(KERNEL_DEVICE, sizes=[("tiny", 1, 3, 8, 4)], cache_frames=(3,), fused=True)
    (row,) = res["rows"]
    assert row["ms_fused"] > 0 and row["fused_GBps"] > 0 and row["speedup_fused_vs_gather"] > 0
    assert row["max_abs_err_fused_vs_gather"] <= (ATOL_FP32 if KERNEL_DEVICE == "cpu" else 2e-2)  # GPU: bf16
