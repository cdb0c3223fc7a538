"""The GPU default, checked as far as a CPU allows.

On CUDA every script defaults to its `gpu` preset and the shared code runs under bf16 autocast
(`common.sampler.autocast`). Neither runs anywhere in CI, so a shape or config error in a `gpu`
preset, or an op that breaks under bf16, would first show on a reader's GPU. Here each `gpu`
preset is built at its real widths, patch sizes, batch and token counts and run for a step or two
on the CPU, and the shared autocast path is run in bf16 on the CPU (`torch.autocast("cpu",
dtype=torch.bfloat16)`), through one training step and one sampling call.
"""

import contextlib
import importlib
import math
import sys

import pytest
import torch

from common import data as data_mod
from common import pretrain, sampler
from common.dit import TinyDiT


def cpu_bf16(device, enabled: bool = True):
    """What common.sampler.autocast does on CUDA, on the CPU."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


SCRIPTS = ("ram", "forcing_kv", "lfm_stability", "attention_sinks", "time_blind_fm")


@pytest.fixture
def bf16_on_cpu(monkeypatch):
    """Every module that uses the shared autocast gets the CPU's bf16 one: common.sampler itself and
    each module that imported the name (`from common.sampler import autocast`), scripts included."""
    for name in SCRIPTS:
        importlib.import_module(name)
    shared = sampler.autocast
    for module in list(sys.modules.values()):
        if getattr(module, "autocast", None) is shared:
            monkeypatch.setattr(module, "autocast", cpu_bf16)


def gpu_pretrain_config(**changes):
    return pretrain.Config(preset="gpu", device="cpu", **changes)


def record_linear_dtypes(model: torch.nn.Module) -> list:
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


def test_the_gpu_pretrain_preset_trains_and_samples_at_its_real_size(bf16_on_cpu):
    """TinyDiT-m, patch 2 (64 image tokens at 16 px), batch 256, under bf16 autocast: two optimizer
    steps through the real training loop, then CFG sampling."""
    cfg = gpu_pretrain_config(steps=2, n_train=512)
    assert (cfg.model, cfg.patch, cfg.batch) == ("m", 2, 256)
    data = data_mod.load(cfg.dataset, cfg.n_train, cfg.size, cfg.seed, "train")
    model, info = pretrain.base_model(cfg, torch.device("cpu"), data=data, data_key="gpu-preset-test")
    assert not info["cached"] and torch.isfinite(torch.tensor(info["final_loss"]))
    assert (model.img_size // model.P) ** 2 == 64
    seen = record_linear_dtypes(model)
    x = sampler.sample_labels(model, torch.arange(6) % 9, steps=2, scale=cfg.cfg_scale, seed=0)
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert seen and all(d == torch.bfloat16 for d in seen)  # the autocast path really ran in bf16


def test_one_bf16_training_step_matches_float32_closely(bf16_on_cpu):
    """The loss under bf16 autocast is the float32 loss to bf16 precision, and its gradients are finite."""
    torch.manual_seed(0)
    model = TinyDiT(img_size=16, channels=3, patch=2, n_classes=9, width=128, depth=2, heads=4)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    t, y = torch.rand(8, generator=g), torch.arange(8) % 9
    from common.flow import fm_loss, interpolate

    loss32 = fm_loss(model(interpolate(x, eps, t), t, y), x, eps).mean()
    with sampler.autocast("cpu"):
        loss16 = fm_loss(model(interpolate(x, eps, t), t, y), x, eps).mean()
    loss16.backward()
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.03)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_gpu_time_blind_fm_preset_trains_its_nets_at_their_real_sizes(bf16_on_cpu):
    """time_blind_fm's gpu preset: TinyDiT-m at every size of its studies (8, 16, 32 px, patch 4), batch
    256, both couplings (the OT one solves a 256 x 256 assignment), one optimizer step each, then a
    time-blind net samples on the preset's Euler grid."""
    import time_blind_fm as tb
    from common.config import int_list

    cfg = tb.Config(preset="gpu", device="cpu", steps=1, n_train=512)
    assert (cfg.model, cfg.batch) == ("m", 256)
    for size in sorted({*int_list(cfg.sizes, "--sizes"), cfg.grid_size}):
        x = tb.load_images(cfg, size, "train", cfg.n_train, upsampled=False)
        for time_cond, coupling in ((True, "independent"), (False, "ot")):
            net = tb.train_fm(cfg, x, time_cond, coupling, torch.device("cpu"))
            assert (net.img_size // net.P) ** 2 == (size // 4) ** 2
    with torch.no_grad():
        samples = tb.euler(net, torch.randn(4, *x.shape[1:]), steps=cfg.sample_steps)
    assert samples.shape == (4, *x.shape[1:]) and torch.isfinite(samples).all()


def test_the_gpu_attention_sinks_preset_removes_sinks_at_its_real_size(bf16_on_cpu):
    """attention_sinks' gpu preset: TinyDiT-m with patch 2 (6 layers, 4 heads, 69 keys per layer), built
    untrained (adaLN weights perturbed, so attention matters), its batch of 1,024 seed-paired samples under
    bf16 autocast: one Euler step with the preset's largest union budget removed at the middle layer, for
    the sinks and for the random control, then the detection statistics on the recorded mass."""
    import attention_sinks as sinks
    from common.config import int_list

    cfg = sinks.Config(preset="gpu", device="cpu", sample_steps=1)
    m_cfg = sinks.model_config(cfg)
    assert (m_cfg.model, m_cfg.patch, cfg.n_samples) == ("m", 2, 1024)
    torch.manual_seed(0)
    model = TinyDiT(**pretrain.model_kwargs(m_cfg, 9, 3)).eval()  # shapes data: 9 classes, 3 channels
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    depth, H, n_keys = sinks.model_shape(cfg)
    n_ctx = model.n_ctx
    assert (len(model.blocks), model.blocks[0].attn.H, n_ctx + (model.img_size // model.P) ** 2) == (depth, H, n_keys)
    k = max(int_list(cfg.ks, "--ks"))
    removal = sinks.Removal((depth // 2,), k, "score", "union", cfg.query_rows)
    y = torch.arange(cfg.n_samples) % model.n_classes
    seen = record_linear_dtypes(model)
    for control in ("sink", "random"):
        hook = sinks.SinkHook(n_ctx, removal, control, cfg.mask_value, seed=0, record=True)
        x = sinks.sample_with(model, cfg, y, hook)
        assert x.shape == (cfg.n_samples, 3, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert len(hook.masses) == cfg.sample_steps * depth
        mass, probs0 = hook.masses[depth // 2], hook.probs0[depth // 2]  # the edited call: mass before, probs after
        assert mass.shape == (cfg.n_samples, H, n_keys) and probs0.shape == (H, n_keys, n_keys)
        if control == "sink":
            sel = sinks.choose_keys(mass[:1], k, "sink", "union")[0]  # (H, Nk): the hook's own ranking, k*H keys
            assert sel.sum().item() == k * H * H
            assert probs0.float()[sel[:, None, :].expand_as(probs0)].max() < 1e-3  # removed in bf16 too
    assert seen and all(d == torch.bfloat16 for d in seen)
    M = torch.stack(hook.masses).float().reshape(cfg.sample_steps, depth, cfg.n_samples, H, n_keys)
    det = sinks.detection_stats(M, n_ctx)
    assert det["measured_layers"] == sinks.measured_layers(depth) and len(det["detection_by_layer"]) == depth


def test_the_gpu_forcing_kv_preset_trains_types_heads_and_generates_at_its_real_sizes(bf16_on_cpu):
    """forcing_kv's gpu preset: the s video model, batch 32 clips of 24 frames (plus their context copy) at
    16 px, one teacher-forcing step; calibration with its 16 rollouts and head typing; then a short cached
    generation (4 chunks, its Euler steps) at the preset's largest frame (96 px: 576 tokens per frame) under
    bf16 autocast, with the full cache and with Forcing-KV's packed cache."""
    import forcing_kv as fk
    from common.config import int_list

    cfg = fk.Config(preset="gpu", device="cpu", steps=1)
    assert (cfg.model, cfg.batch, cfg.train_frames, cfg.n_calib) == ("s", 32, 24, 16)
    cpu = torch.device("cpu")
    model, info = fk.train_video_model(cfg, cpu)
    assert not info["cached"] and all(torch.isfinite(p).all() for p in model.parameters())
    score, per_video, per_step, mass = fk.calibrate(model, cfg, cpu)
    assert score.shape == (model.depth, model.H) and mass.shape[2] == cfg.n_calib and torch.isfinite(score).all()
    kinds = fk.type_heads(score, cfg.threshold)
    kinds[1, 0], kinds[1, 1] = fk.KINDS["static"], fk.KINDS["dynamic"]  # both kinds, whatever one step learned
    size = max(int_list(cfg.sizes, "--sizes", 8))
    y, noise = fk.eval_inputs(cfg, size, 1, cpu)
    noise = noise[:, :4 * fk.FRAMES_PER_CHUNK]
    seen = record_linear_dtypes(model)
    full_cache, cache = fk.FullCache(model.depth, noise.shape[1]), fk.variants(cfg, kinds, "torch")["forcing_kv"][0]()
    full = fk.rollout(model, full_cache, y, noise, cfg.sample_steps)
    video = fk.rollout(model, cache, y, noise, cfg.sample_steps)
    assert (size // fk.PATCH) ** 2 == 576 and full.shape == video.shape == noise.shape
    assert torch.isfinite(full).all() and torch.isfinite(video).all() and cache.sel is not None
    assert full_cache.k[0].dtype == torch.bfloat16 and seen and all(d == torch.bfloat16 for d in seen)
    assert 0 < cache.nbytes() < full_cache.nbytes()


def test_the_gpu_lfm_stability_preset_trains_its_three_kinds_of_model_and_switches(bf16_on_cpu):
    """lfm_stability's gpu preset: a data / seed model (TinyDiT-s, patch 4, batch 256), the small coarse
    net (one block of the preset's width, MLP ratio 1) and the large model (the pretrain gpu preset,
    TinyDiT-m, patch 2), one optimizer step each under bf16 autocast, then a coarse-to-fine call on the
    preset's Euler grid at the paper's switch, the small net running the noisy steps."""
    import lfm_stability as lfm

    cfg = lfm.Config(preset="gpu", device="cpu", steps=1, small_steps=1, n_train=512)
    assert (cfg.model, cfg.batch, cfg.large) == ("s", 256, "gpu")
    cpu = torch.device("cpu")
    data = data_mod.load("shapes", cfg.n_train, 16, cfg.seed, "train")
    data_model, info = lfm.train(cfg, cpu, "reference", data, "gpu-preset-test", cfg.seed)
    small, small_info = lfm.train(cfg, cpu, "small", data, "gpu-preset-test", cfg.seed, small=True)
    large, large_info = pretrain.base_model(gpu_pretrain_config(steps=1, n_train=cfg.n_train), cpu, data=data,
                                            data_key="lfm-gpu-preset-test")
    assert not large_info["cached"] and torch.isfinite(torch.tensor(large_info["final_loss"]))
    assert all(torch.isfinite(torch.tensor(i["loss_curve"])).all() for i in (info, small_info))
    assert (data_model.img_size // data_model.P) ** 2 == 16 and (large.img_size // large.P) ** 2 == 64
    assert len(small.blocks) == 1 and small.patch_embed.out_features == cfg.small_width
    calls = {"small": 0, "large": 0}
    for name, net in (("small", small), ("large", large)):
        net.register_forward_hook(lambda mod, args, out, name=name: calls.__setitem__(name, calls[name] + 1))
    seen = record_linear_dtypes(large)
    y = torch.arange(4) % 9
    x = lfm.coarse_to_fine(small, large, sampler.seeded_noise(4, 3, 16, 0), y, cfg.sample_steps, lfm.PAPER_SWITCH)
    assert x.shape == (4, 3, 16, 16) and torch.isfinite(x.float()).all()
    assert (calls["small"], calls["large"]) == lfm.step_split(cfg.sample_steps, lfm.PAPER_SWITCH)
    assert seen and all(d == torch.bfloat16 for d in seen)  # the sampler really ran in bf16


def test_the_gpu_ram_preset_runs_a_round_of_each_method_at_its_real_size(bf16_on_cpu):
    """ram's gpu preset: the gpu base model's TinyDiT-m (patch 2, 16 px, untrained but perturbed), K = 8
    re-noisings, 16 ODE and 10 SDE steps: one RAM round and one Flow-GRPO round on the CPU, with a cheap
    stand-in reward. Only the batch is cut: G = 2 instead of the preset's 24 (9 x 24 samples a round
    take over a minute here)."""
    import copy

    import ram
    from common.train import make_optimizer

    assert ram.Config(preset="gpu", device="cpu").group == 24
    cfg = ram.Config(preset="gpu", device="cpu", group=2)
    assert (cfg.base, cfg.renoise, cfg.ode_steps, cfg.sde_steps) == ("gpu", 8, 16, 10)
    pcfg = pretrain.Config(**{**pretrain.PRESETS[cfg.base], "preset": cfg.base, "seed": 0})
    torch.manual_seed(0)
    base = TinyDiT(**pretrain.model_kwargs(pcfg, 9, 3))
    with torch.no_grad():  # adaLN-Zero starts at v = 0; perturb so that the round has something to move
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert (base.img_size // base.P) ** 2 == 64
    y = ram.prompts_for_round(9, cfg.group)
    reward = lambda x, y: x.mean((1, 2, 3))  # noqa: E731
    g = torch.Generator().manual_seed(0)
    policy, old = copy.deepcopy(base), copy.deepcopy(base)
    hp = dict(lr=cfg.ram_lr, m=cfg.ram_m, ema=ram.EMA_OLD)
    r_ram, steps = ram.ram_round(policy, base, old, make_optimizer(policy, cfg.ram_lr), y, reward, cfg, g, hp, "cpu")
    assert steps == 1 and math.isfinite(r_ram)
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), base.parameters()))
    policy = copy.deepcopy(base)
    hp = dict(lr=cfg.grpo_lr, clip=cfg.grpo_clip, beta=ram.GRPO_BETA["composition"])
    r_grpo, steps = ram.grpo_round(policy, base, make_optimizer(policy, cfg.grpo_lr), y, reward, cfg, g, hp, "cpu")
    assert steps == ram.GRPO_MINIBATCHES and math.isfinite(r_grpo)
    assert all(torch.isfinite(p).all() for p in policy.parameters())
