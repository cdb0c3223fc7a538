import json
import math

import pytest
import torch
import torch.nn.functional as F

import forcing_kv as fk

F_ = fk.FRAMES_PER_CHUNK
STATIC, DYNAMIC = fk.KINDS["static"], fk.KINDS["dynamic"]
KINDS = torch.tensor([[0, 0, 0, 0], [STATIC, DYNAMIC, STATIC, DYNAMIC]])  # layer 0; then static and dynamic heads


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


class ConcatCache(fk.FullCache):
    """The obvious full cache: torch.cat the whole cache with the chunk on every call and every commit."""

    def __init__(self, depth):
        super().__init__(depth, 0)

    def attend(self, q, k, v, layer):
        if self.k[layer] is None:
            return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2))

    def commit(self, new, frame0):
        for layer, (k, v) in new.items():
            self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], 2)
            self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], 2)


def test_full_cache_equals_recomputation_without_cache(model):
    y, noise = inputs()
    cached = fk.rollout(model, fk.FullCache(model.depth, noise.shape[1]), y, noise, steps=2)
    assert torch.allclose(cached, fk.rollout_reference(model, y, noise, steps=2), atol=1e-5)


def test_preallocated_full_cache_equals_the_torch_cat_version(model):
    y, noise = inputs()
    pre = fk.FullCache(model.depth, noise.shape[1])
    out = fk.rollout(model, pre, y, noise, steps=2)
    assert torch.equal(out, fk.rollout(model, ConcatCache(model.depth), y, noise, steps=2))
    assert pre.filled == noise.shape[1] * 4 and pre.nbytes() == pre.k[0].nbytes * 2 * model.depth


def test_teacher_forcing_pass_equals_chunk_by_chunk_reference(model):
    """The training layout [clean copy; noisy clip] in one pass gives every chunk the velocity it gets
    when run alone after its clean context: the mask is the generation's causality."""
    y, x = inputs(chunks=3)
    g = torch.Generator().manual_seed(1)
    T, ctx, N = x.shape[1], x.shape[1] - F_, 4
    t = torch.rand(2, T, generator=g)
    clean, noisy = torch.arange(ctx), torch.arange(T)
    hook = fk.teacher_forcing(clean, noisy, N)
    with torch.no_grad():
        v = model(torch.cat([x[:, :ctx], x], 1), torch.cat([torch.zeros(2, ctx), t], 1), y,
                  torch.cat([clean, noisy]), hook)[:, ctx:]
        for c0 in range(0, T, F_):
            frames = torch.arange(c0 + F_)
            ref_hook = fk.teacher_forcing(frames[:c0], frames[c0:], N)
            times = torch.cat([torch.zeros(2, c0), t[:, c0:c0 + F_]], 1)
            ref = model(x[:, :c0 + F_], times, y, frames, ref_hook)[:, c0:]
            assert torch.allclose(v[:, c0:c0 + F_], ref, atol=1e-5)


def test_a_restarted_chunk_is_denoised_like_a_first_chunk(model):
    """Training chunks marked `restart` see no context: exactly what a first chunk (or a chunk run
    alone) sees, whatever its frame index; the others keep theirs."""
    y, x = inputs(chunks=3)
    T, ctx, N = x.shape[1], x.shape[1] - F_, 4
    t = torch.rand(2, T, generator=torch.Generator().manual_seed(2))
    restart = torch.tensor([[False, True, False], [False, False, True]])
    clean, noisy = torch.arange(ctx), torch.arange(T)
    with torch.no_grad():
        v = model(torch.cat([x[:, :ctx], x], 1), torch.cat([torch.zeros(2, ctx), t], 1), y, torch.cat([clean, noisy]),
                  fk.teacher_forcing(clean, noisy, N, restart))[:, ctx:]
        plain = model(torch.cat([x[:, :ctx], x], 1), torch.cat([torch.zeros(2, ctx), t], 1), y,
                      torch.cat([clean, noisy]), fk.teacher_forcing(clean, noisy, N))[:, ctx:]
        for b, c in ((0, 1), (1, 2)):
            f = slice(F_ * c, F_ * c + F_)
            frames = torch.arange(F_ * c, F_ * c + F_)
            alone = model(x[b:b + 1, f], t[b:b + 1, f], y[b:b + 1], frames, fk.teacher_forcing(frames[:0], frames, N))
            assert torch.allclose(v[b, f], alone[0], atol=1e-5) and not torch.allclose(v[b, f], plain[b, f], atol=1e-3)
    assert torch.allclose(v[0, 2 * F_:], plain[0, 2 * F_:], atol=1e-5)  # chunk 2 of video 0 keeps its context


def test_rotary_makes_attention_depend_on_frame_offsets_only():
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    score = lambda fq, fk_: (fk.rotary(q, torch.tensor([fq])) * fk.rotary(k, torch.tensor([fk_]))).sum()
    assert torch.allclose(score(5, 2), score(23, 20), atol=1e-5) and not torch.allclose(score(5, 2), score(5, 4))


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_compressed_cache_that_keeps_everything_equals_full(model, impl):
    y, noise = inputs()
    full = fk.rollout(model, fk.FullCache(model.depth, noise.shape[1]), y, noise, steps=2)
    cache = fk.CompressedCache(KINDS, recent=100, buffer=1, impl=impl)  # a window longer than the video
    assert torch.allclose(fk.rollout(model, cache, y, noise, steps=2), full, atol=1e-5)


def test_compressed_cache_changes_the_video_and_paths_agree(model):
    y, noise = inputs()
    full = fk.rollout(model, fk.FullCache(model.depth, noise.shape[1]), y, noise, steps=2)
    out = fk.rollout(model, fk.CompressedCache(KINDS, 1, 1), y, noise, steps=2)
    ref = fk.rollout(model, fk.CompressedCache(KINDS, 1, 1, impl="reference"), y, noise, steps=2)
    assert not torch.allclose(out, full, atol=1e-3) and torch.isfinite(out).all()
    assert torch.allclose(out, ref, atol=1e-5)


def test_fused_kernel_inside_a_short_generation_equals_the_torch_path(model):
    """The Triton kernel (under TRITON_INTERPRET=1 on a CPU, set by conftest.py) drives a whole
    Forcing-KV rollout, buffer included: same video as the PyTorch path, to fp32 rounding."""
    pytest.importorskip("triton")
    y, noise = inputs(chunks=4)
    videos = [fk.rollout(model, fk.CompressedCache(KINDS, 1, 1, impl=impl), y, noise, steps=1)
              for impl in ("torch", "triton")]
    assert torch.allclose(videos[0], videos[1], atol=1e-5)


def test_bench_flag_writes_bench_json(tmp_path):
    res = fk.main(["--preset", "smoke", "--bench", "true", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == res["rows"] and all(r["ms_gather_sdpa"] > 0 for r in saved["rows"])
    assert (tmp_path / "fig_bench.png").stat().st_size > 1000


# %% the budgets, token by token: keys whose every entry is their frame index


def frame_coded_chunk(frame0, B=2, H=4, N=4, Dh=4):
    f = torch.arange(frame0, frame0 + F_).repeat_interleave(N).float()  # (F N,)
    k = f[None, None, :, None].expand(B, H, -1, Dh).clone()
    moving = k.clone()
    moving[..., 1::N, :] += torch.randn(B, H, F_, Dh)  # one token per frame changes: its segment is kept
    return {0: (k, k.clone()), 1: (moving, k.clone())}


def frames_held(cache, layer, b, h):
    """The frame index of every value pair (b, h) holds, in storage order (host offsets: no sync)."""
    c = cache.layers[layer]
    s, n = int(c["host"][0][b, h]), int(c["host"][1][b, h])
    return c["kv"][1, s:s + n, 0].tolist()


def committed(chunks, **kw):
    cache = fk.CompressedCache(torch.tensor([[0] * 4, [STATIC, DYNAMIC, STATIC, DYNAMIC]]), **kw)
    for c in range(chunks):
        cache.commit(frame_coded_chunk(F_ * c), F_ * c)
    return cache


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_static_heads_and_layer_0_hold_the_sink_and_one_recent_frame(chunks):
    cache = committed(chunks, recent=1, buffer=1)
    last = F_ * chunks - 1
    for layer, h in ((0, 0), (0, 1), (1, 0), (1, 2)):  # layer 0 (untyped) and the static heads of layer 1
        assert frames_held(cache, layer, 1, h) == [0.0] * 4 + [float(last)] * 4  # exactly sink + newest frame


def test_dynamic_heads_refill_the_buffer_from_this_steps_candidates_only():
    for k in range(fk.AR_START + 1):  # before the heads are grouped: no buffer yet
        assert len(frames_held(committed(k + 1, recent=1, buffer=1), 1, 0, 1)) == 2 * 4
    for k in range(fk.AR_START + 1, 6):
        held = frames_held(committed(k + 1, recent=1, buffer=1), 1, 0, 1)
        sink, buf, recent = held[:4], held[4:8], held[8:]
        assert sink == [0.0] * 4 and recent == [float(F_ * k + 2)] * 4  # sink + newest frame, one frame of buffer
        assert set(buf) <= {F_ * k - 1.0, F_ * k, F_ * k + 1.0}  # step k's candidates: evicted at step k only


def test_buffer_keeps_the_segments_that_change_and_shares_the_choice_across_layers():
    cache = committed(4, recent=1, buffer=1)
    B, N = 2, 4
    for b in range(B):  # the moving token's segment (one token per segment at N = 4) of each candidate frame
        assert sorted(set(frames_held(cache, 1, b, 1)[4:8])) == [8.0, 9.0, 10.0]
    assert cache.sel.shape == (B, N)


def test_window_and_no_sink_budgets():
    cache = fk.CompressedCache(torch.full((2, 4), STATIC), recent=2, buffer=0)
    no_sink = fk.CompressedCache(KINDS, recent=2, buffer=0, sink=False)
    for c in range(4):
        cache.commit(frame_coded_chunk(F_ * c), F_ * c)
        no_sink.commit(frame_coded_chunk(F_ * c), F_ * c)
    assert frames_held(cache, 1, 0, 3) == [0.0] * 4 + [10.0] * 4 + [11.0] * 4
    assert frames_held(no_sink, 0, 0, 0) == [10.0] * 4 + [11.0] * 4


def test_segment_scores_rank_the_changed_segment_lowest():
    k = torch.randn(1, 2, 8, 4)
    moved = k.clone()
    moved[:, :, 4:6] = torch.randn(1, 2, 2, 4)  # segment 2 of 4 changes in the next frame
    s = fk.segment_scores(torch.cat([k, moved], 2), N=8)
    assert s.shape == (1, 4) and s.argmin().item() == 2 and torch.allclose(s[0, [0, 1, 3]], torch.ones(3))


def test_cache_bytes_match_the_tokens_stored(model):
    y, noise = inputs(chunks=5)
    B, T, N, Dh = 2, noise.shape[1], 4, 64 // 4
    full = fk.FullCache(model.depth, T)
    fk.rollout(model, full, y, noise, steps=1)
    assert full.nbytes() == model.depth * 2 * B * model.H * T * N * Dh * 4
    cache = fk.CompressedCache(KINDS, recent=1, buffer=1)
    fk.rollout(model, cache, y, noise, steps=1)
    expect = {0: 2 * N, STATIC: 2 * N, DYNAMIC: 3 * N}  # sink + 1 recent frame, dynamic: + 1 frame of buffer
    stored = 0
    for layer, c in enumerate(cache.layers):
        assert c["lengths"].tolist() == [[expect[int(k)] for k in KINDS[layer]]] * B
        assert c["kv"].shape == (2, int(c["lengths"].sum()), Dh)  # packed: exactly the kept tokens, no padding
        assert c["offsets"].dtype == c["lengths"].dtype == torch.int32  # stored as the kernel reads them
        stored += c["kv"].nbytes + c["offsets"].nbytes + c["lengths"].nbytes
    assert cache.nbytes() == stored + cache.sel.nbytes < full.nbytes()


def test_make_caches_window_holds_at_least_forcing_kvs_tokens(model):
    y, noise = inputs(chunks=4)
    caches = fk.make_caches(fk.Config(), KINDS, model.depth, noise.shape[1], "torch")
    bytes_ = {}
    for name in ("forcing_kv", "window", "no_buffer", "no_sink", "random_heads"):
        cache = caches[name]()
        out = fk.rollout(model, cache, y, noise, steps=1)
        assert out.shape == noise.shape and torch.isfinite(out).all()
        bytes_[name] = cache.nbytes()
    assert bytes_["window"] >= bytes_["forcing_kv"] == bytes_["random_heads"] > bytes_["no_buffer"]
    shuffled = caches["random_heads"]().kinds
    assert not torch.equal(shuffled, KINDS) and torch.equal(shuffled[0], KINDS[0])  # another split, layer 0 kept
    assert (shuffled == STATIC).sum() == (KINDS == STATIC).sum()  # with the same static share


# %% head typing


def test_uniform_attention_scores_the_uniform_reference():
    """With q = 0 every head attends uniformly: the score is 4 / (15 - 3), the official geometry's
    no-preference value, whatever the model does otherwise."""
    cfg = fk.Config(model="xs", size=8, n_calib=2, sample_steps=2)
    m = fk.make_model(cfg).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.ada[-1].bias.normal_()  # open the gates, so the blocks matter
            blk.attn.qkv.weight[:64].zero_()
            blk.attn.qkv.bias[:64].zero_()
    score, per_sample, per_step = fk.calibrate(m, cfg, torch.device("cpu"))
    ref = fk.LAST_FRAMES / (F_ * (fk.CALIB_STEP + 1) - fk.SKIP_FRAMES)
    assert ref == pytest.approx(1 / 3) and torch.allclose(score, torch.full_like(score, ref), atol=1e-5)
    assert per_sample.shape == (2, 2, 4) and per_step.shape == (2, 2, 4)


def test_head_typing_agreement_and_rank_correlation():
    score = torch.tensor([[0.1, 0.9], [0.85, 0.3], [0.8, 0.79]])
    assert fk.type_heads(score, 0.8).tolist() == [[0, 0], [STATIC, DYNAMIC], [STATIC, DYNAMIC]]
    same = score[None].expand(4, -1, -1)
    assert fk.label_agreement(same, 0.8) == 1.0 and fk.rank_corr(same) == pytest.approx(1.0)
    flipped = torch.stack([score, 1 - score])
    assert fk.label_agreement(flipped, 0.8) < 1.0 and fk.rank_corr(flipped) == pytest.approx(-1.0)
    g = torch.Generator().manual_seed(0)
    low = 0.2 + 0.01 * torch.rand(16, 3, 8, generator=g)  # every head on one side, order pure noise
    assert fk.label_agreement(low, 0.8) == 1.0 and abs(fk.rank_corr(low)) < 0.3  # the label share cannot fail


# %% the script


def test_smoke_run_writes_the_keys(tmp_path):
    res = fk.main(["--preset", "smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("static_fraction", "head_label_agreement", "by_size", "speedup_by_size", "memory_ratio_by_size",
                "full_quality", "train_seconds", "seconds", "score_uniform_reference", "head_score_rank_corr",
                "static_fraction_by_threshold", "claims"):
        assert key in saved and key in res
    assert set(saved["by_size"]) == {"8", "16"} and set(saved["head_score_rank_corr"]) == {"samples", "steps"}
    for rows in saved["by_size"].values():
        assert {"full", "window", "no_buffer", "forcing_kv", "random_heads", "random_segments", "high_similarity",
                "no_sink"} <= set(rows)
        for name, r in rows.items():
            assert r["cache_bytes"] > 0 and r["fps"] > 0 and math.isfinite(r["drift"])
            assert r["psnr"] is None if name == "full" else math.isfinite(r["psnr"])
    assert all(0 < v <= 0.5 for v in saved["memory_ratio_by_size"].values())
    for c in saved["claims"]:  # every claim's number is the stored one, and its verdict follows its criterion
        v = saved
        for part in c["key"].split("."):
            v = v[part]
        assert c["ours"] == v and c["reproduced"] == eval(c["criterion"].replace(c["key"], repr(v)))
    for fig in ("fig_filmstrip.png", "fig_head_types.png", "fig_scaling.png"):
        assert (tmp_path / fig).stat().st_size > 1000


@pytest.mark.parametrize("argv", [["--train-frames", "7"], ["--train-frames", "12"], ["--sizes", "16,20"],
                                  ["--threshold", "1.5"], ["--recent", "100"], ["--buffer", "4"],
                                  ["--n-calib", "1"], ["--chunks", "1"]])
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
        for key in ("seconds", "train_seconds", "model_train_seconds", "speedup_by_size", "speedup_growth_min",
                    "claims"):
            saved.pop(key)
        for rows in saved["by_size"].values():
            for r in rows.values():
                r.pop("fps"), r.pop("speedup")
        runs.append(saved)
    assert runs[0] == runs[1]
