import json
import math

import pytest
import torch

import forcing_kv as fk
from common.varlen_attention import varlen_attention_ref

F_ = fk.FRAMES_PER_CHUNK


@pytest.fixture(scope="module")
def model():
    """An xs video model with random (not zero) adaLN and output weights, so every path matters."""
    m = fk.make_model(fk.Config(model="xs")).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m


def inputs(B=2, chunks=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 9, (B,), generator=g), torch.randn(B, chunks * F_, 3, size, size, generator=g)


def test_full_cache_equals_recomputation_without_cache(model):
    y, noise = inputs()
    cached = fk.rollout(model, fk.FullCache(model.depth), y, noise, steps=2)
    assert torch.allclose(cached, fk.rollout_reference(model, y, noise, steps=2), atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_forcing_kv_with_a_budget_that_keeps_everything_equals_full(model, impl):
    y, noise = inputs()
    full = fk.rollout(model, fk.FullCache(model.depth), y, noise, steps=2)
    kinds = torch.tensor([[0, 0, 0, 0], [1, 2, 1, 2]])
    everything = noise.shape[1] * 4  # tokens of every frame
    # (a) a recent window longer than the video; (b) all heads dynamic with a buffer that keeps
    # every evicted segment: the buffer path then holds the whole past (in another order).
    for kinds_, recent in ((kinds, 100), (torch.tensor([[0, 0, 0, 0], [2, 2, 2, 2]]), 1)):
        cache = fk.CompressedCache(kinds_, recent, everything, seg_len=2, impl=impl)
        assert torch.allclose(fk.rollout(model, cache, y, noise, steps=2), full, atol=1e-5)
    assert cache.buf is not None and cache.whole == [0, noise.shape[1] - 1]  # the buffer path really ran


def test_compressed_cache_changes_the_video_but_stays_close(model):
    y, noise = inputs()
    full = fk.rollout(model, fk.FullCache(model.depth), y, noise, steps=2)
    cache = fk.CompressedCache(torch.tensor([[0, 0, 0, 0], [1, 2, 1, 2]]), 3, 4, seg_len=2)
    out = fk.rollout(model, cache, y, noise, steps=2)
    assert not torch.allclose(out, full, atol=1e-5) and torch.isfinite(out).all()


def test_grouped_attention_matches_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    B, H, Nq, Dh = 2, 3, 5, 8
    lengths = torch.tensor([[0, 7, 1], [7, 13, 1]])  # empty, equal and very uneven runs
    offsets = (lengths.flatten().cumsum(0) - lengths.flatten()).view(B, H)
    T = int(lengths.sum())
    q, kn, vn = (torch.randn(B, H, Nq, Dh, generator=g) for _ in range(3))
    kp, vp = torch.randn(T, Dh, generator=g), torch.randn(T, Dh, generator=g)
    ref = varlen_attention_ref(q, kp, vp, offsets, lengths, kn, vn)
    assert torch.allclose(fk.attend(q, kp, vp, offsets, lengths, kn, vn, "torch"), ref, atol=1e-6)


def test_fused_kernel_inside_a_short_generation_equals_the_torch_path(model):
    """The Triton kernel (under TRITON_INTERPRET=1 on a CPU, set by conftest.py) drives a whole
    Forcing-KV rollout: same video as the PyTorch path, to fp32 rounding."""
    pytest.importorskip("triton")
    y, noise = inputs(chunks=3)
    kinds = torch.tensor([[0, 0, 0, 0], [1, 2, 1, 2]])  # layer 0 whole; static and dynamic heads after it
    videos = [fk.rollout(model, fk.CompressedCache(kinds, 1, 4, seg_len=2, impl=impl), y, noise, steps=2)
              for impl in ("torch", "triton")]
    assert torch.allclose(videos[0], videos[1], atol=1e-5)


def test_bench_flag_writes_bench_json(tmp_path):
    res = fk.main(["--preset", "smoke", "--bench", "true", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == res["rows"] and all(r["ms_gather_sdpa"] > 0 for r in saved["rows"])
    assert (tmp_path / "fig_bench.png").stat().st_size > 1000


def frame_coded_chunk(frame0, B=1, H=2, N=4, Dh=4):
    """Keys/values whose every entry is the frame index: a run's contents tell which frames it holds."""
    f = torch.arange(frame0, frame0 + F_).repeat_interleave(N).float()  # (F N,)
    k = f[None, None, :, None].expand(B, H, -1, Dh).clone()
    return {0: (k, k.clone()), 1: (k + 0.01 * torch.randn(k.shape), k.clone())}


def test_eviction_keeps_the_sink_and_drops_the_oldest_frames():
    kinds = torch.tensor([[0, 0], [1, 2]])  # layer 1: a static and a dynamic head
    cache = fk.CompressedCache(kinds, recent=3, buffer_tokens=4, seg_len=2)
    for c in range(4):  # frames 0 .. 11
        cache.commit(frame_coded_chunk(F_ * c), F_ * c)
    assert cache.whole == [0, 9, 10, 11]  # sink + the newest three, never the newest dropped
    static_frames = cache.run(1, 0, 0)[1][:, 0].unique().tolist()
    assert static_frames == [0.0, 9.0, 10.0, 11.0]
    assert cache.run(0, 0, 0)[1][:, 0].unique().tolist() == [float(f) for f in range(12)]  # layer 0: all
    dyn = cache.run(1, 0, 1)[1][:, 0]
    assert dyn.shape[0] == 4 * 4 + 4 and set(dyn[16:].tolist()) <= set(range(1, 9))  # buffer: evicted frames
    no_sink = fk.CompressedCache(kinds, recent=3, buffer_tokens=0, seg_len=2, sink=False)
    for c in range(4):
        no_sink.commit(frame_coded_chunk(F_ * c), F_ * c)
    assert no_sink.whole == [9, 10, 11]


def test_segment_scores_rank_the_changed_segment_lowest():
    k = torch.randn(1, 2, 8, 4)
    moved = k.clone()
    moved[:, :, 4:6] = torch.randn(1, 2, 2, 4)  # segment 2 of 4 changes in the next frame
    s = fk.segment_scores(k, moved, seg_len=2)
    assert s.shape == (1, 4) and s.argmin().item() == 2 and torch.allclose(s[0, [0, 1, 3]], torch.ones(3))


def test_cache_bytes_match_the_tokens_stored(model):
    y, noise = inputs(chunks=5)
    B, T, N, Dh = 2, noise.shape[1], 4, 64 // 4
    full = fk.FullCache(model.depth)
    fk.rollout(model, full, y, noise, steps=1)
    assert full.nbytes() == model.depth * 2 * B * model.H * T * N * Dh * 4
    kinds = torch.tensor([[0, 0, 0, 0], [1, 2, 1, 2]])
    cache = fk.CompressedCache(kinds, recent=3, buffer_tokens=4, seg_len=2)
    fk.rollout(model, cache, y, noise, steps=1)
    expect = {0: T * N, 1: (1 + 3) * N, 2: (1 + 3) * N + 4}  # full, static (sink + 3), dynamic (+ buffer)
    stored = 0
    for layer, c in enumerate(cache.layers):
        assert c["lengths"].tolist() == [[expect[int(k)] for k in kinds[layer]]] * B
        assert c["k"].shape == (int(c["lengths"].sum()), Dh)  # packed: exactly the kept tokens, no padding
        stored += 2 * c["k"].nbytes + c["offsets"].nbytes + c["lengths"].nbytes
    assert cache.nbytes() == stored + cache.buf.nbytes + cache.buf_score.nbytes < full.nbytes()


def test_rollout_longer_than_training_clip_and_frame_embedding_range(model):
    y, noise = inputs(B=1, chunks=(fk.MAX_FRAME // F_) + 2)  # past every frame index seen in training
    caches = fk.make_caches(fk.Config(), torch.tensor([[0, 0, 0, 0], [1, 2, 2, 1]]), model.depth, 4, "torch")
    for name in ("forcing_kv", "window", "no_sink"):
        out = fk.rollout(model, caches[name](), y, noise, steps=1)
        assert out.shape == noise.shape and torch.isfinite(out).all()


def test_moving_shapes_are_deterministic_and_stay_in_frame():
    a, ya = fk.moving_shapes(6, 30, 16, torch.Generator().manual_seed(3))
    b, yb = fk.moving_shapes(6, 30, 16, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(ya, yb)
    lit = a.amax(2) > 0
    assert lit.flatten(2).any(2).all()  # an object in every frame
    edge = lit[..., 0, :].any() or lit[..., -1, :].any() or lit[..., :, 0].any() or lit[..., :, -1].any()
    assert not edge  # bounces keep the shapes inside


def test_head_typing_and_label_agreement():
    score = torch.tensor([[0.1, 0.9], [0.85, 0.3], [0.8, 0.79]])
    kinds = fk.type_heads(score, 0.8)
    assert kinds.tolist() == [[0, 0], [1, 2], [1, 2]]
    same = score[None].expand(4, -1, -1)
    assert fk.label_agreement(same, 0.8) == 1.0
    flipped = torch.stack([score, 1 - score])
    assert fk.label_agreement(flipped, 0.8) < 1.0


def test_smoke_run_writes_the_keys(tmp_path):
    res = fk.main(["--preset", "smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("static_fraction", "head_label_agreement", "by_size", "speedup_by_size", "memory_ratio_by_size",
                "full_quality", "train_seconds", "seconds"):
        assert key in saved and key in res
    assert set(saved["by_size"]) == {"8", "16"}
    for rows in saved["by_size"].values():
        assert {"full", "window", "forcing_kv", "random_heads", "random_segments", "high_similarity",
                "no_sink"} <= set(rows)
        for name, r in rows.items():
            assert r["cache_bytes"] > 0 and r["fps"] > 0 and math.isfinite(r["drift"])
            assert r["psnr"] is None if name == "full" else math.isfinite(r["psnr"])
    assert all(0 < v <= 1 for v in saved["memory_ratio_by_size"].values())
    for fig in ("fig_filmstrip.png", "fig_head_types.png", "fig_scaling.png"):
        assert (tmp_path / fig).stat().st_size > 1000


@pytest.mark.parametrize("argv", [["--train-frames", "7"], ["--sizes", "16,18"], ["--threshold", "1.5"]])
def test_bad_input_is_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        fk.main(["--preset", "smoke", *argv])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_same_seed_same_results(tmp_path, monkeypatch):
    """Reproducibility on CPU: two runs from empty checkpoint caches agree on everything but timings."""
    runs = []
    for name in ("a", "b"):
        monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / f"ckpt_{name}"))
        fk.main(["--preset", "smoke", "--out", str(tmp_path / name)])
        saved = json.loads((tmp_path / name / "results.json").read_text())
        for key in ("seconds", "train_seconds", "model_train_seconds", "speedup_by_size"):
            saved.pop(key)
        for rows in saved["by_size"].values():
            for r in rows.values():
                r.pop("fps")
        runs.append(saved)
    assert runs[0] == runs[1]
