"""What one training step costs, counted on any device: FLOPs and the activation memory autograd keeps.

    python -m common.cost          # the table of every script's gpu preset (docs/running.md quotes it)

FLOPs come from torch's FlopCounterMode (matrix products and attention, forward and backward; the
elementwise work it does not count is small next to them at these widths). Activation memory is the
sum of the bytes of the tensors autograd saves for the backward pass, counted once each, in float32
(under bf16 autocast the matmul inputs it saves are half that). Both are exact for the step counted;
turning them into seconds on a GPU is an estimate, because tiny models are bound by kernel launches,
not by arithmetic.
"""

import contextlib
import os
import tempfile
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode


def train_step_cost(step, model) -> dict:
    """step(): one step (a forward and backward pass, or a whole round of a script's loop), returning
    nothing. model: the module, or a list of the modules, whose weights the step reads. -> {flops,
    activation_bytes, passes}: the tensors autograd saves, counted once each, without the weights (tensors
    sharing a parameter's storage); passes: forward calls of the modules (kernel launches scale with them)."""
    models = model if isinstance(model, (list, tuple)) else [model]
    weights = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
    seen, total, passes, alive = set(), [0], [0], []

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape), t.storage_offset())
        if key not in seen and key[0] not in weights:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
            alive.append(t)  # held to the end: a freed storage's address reused later would look "seen"
        return t

    hooks = [m.register_forward_hook(lambda *args: passes.__setitem__(0, passes[0] + 1)) for m in models]
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        for h in hooks:
            h.remove()
    return dict(flops=counter.get_total_flops(), activation_bytes=total[0], passes=passes[0])


def dit_step(model, batch: int, y: bool = True):
    """One flow-matching step of a TinyDiT at `batch`: the step every script's training loop takes."""
    from common.flow import fm_loss, interpolate

    C, S = model.C, model.img_size

    def step():
        x, eps, t = torch.randn(batch, C, S, S), torch.randn(batch, C, S, S), torch.rand(batch)
        labels = torch.zeros(batch, dtype=torch.long) if y else None
        fm_loss(model(interpolate(x, eps, t), t, labels), x, eps).mean().backward()
    return step


# The runtime estimate's two assumptions, not measurements: small matmuls (width 128-256) sustain a few
# percent of an H100's dense bf16 peak, and a step of a few hundred small kernels costs milliseconds in launches.
SUSTAINED_FLOPS = 25e12
LAUNCH_SECONDS = 2e-3  # per network pass (forward, or forward and backward)


@contextlib.contextmanager
def scratch_checkpoints():
    """CHECKPOINT_DIR pointed at a temporary folder: a script's training loop, run for one step to be
    counted, caches its model there and leaves the real checkpoints alone."""
    with tempfile.TemporaryDirectory() as folder, mock.patch.dict(os.environ, CHECKPOINT_DIR=folder):
        yield


def scaled(c: dict, factor: float) -> dict:
    """A step counted at a cut batch, at the full one: FLOPs and saved tensors grow linearly with the batch
    (tests/test_common_cost.py); the number of passes does not."""
    return dict(c, flops=c["flops"] * factor, activation_bytes=c["activation_bytes"] * factor)


def presets() -> list:
    """One row per network a gpu preset trains, and per round of ram's race: (what is counted, its shape,
    how many such steps the preset takes, count() -> train_step_cost's numbers for one step)."""
    import copy

    import forcing_kv as fk
    import lfm_stability as lfm
    import ram
    import time_blind_fm
    from common import data as data_mod
    from common import pretrain
    from common.dit import TinyDiT
    from common.train import make_optimizer

    def dit_row(name, steps, model, batch, labelled=True):
        return (name, f"{(model.img_size // model.P) ** 2} tokens x {batch}", steps,
                lambda: train_step_cost(dit_step(model, batch, labelled), model))

    cpu, rows = torch.device("cpu"), []
    base = pretrain.Config(preset="gpu", device="cpu")
    rows.append(dit_row("base model (common.pretrain); attention_sinks samples from it", base.steps,
                        TinyDiT(**pretrain.model_kwargs(base, 9, 3)), base.batch))
    tb = time_blind_fm.Config(preset="gpu", device="cpu")
    n = len(tb.sizes.split(","))
    n_nets = 4 + 2 * n + 2 * (n - 1)  # the 2 x 2 grid; t and time-blind per size, native and upsampled
    for size in sorted({int(s) for s in tb.sizes.split(",")}):
        rows.append(dit_row(f"time_blind_fm, one of its {n_nets} nets, {size} px", tb.steps,
                            time_blind_fm.make_net(tb, size, 3, True), tb.batch, False))

    lf = lfm.Config(preset="gpu", device="cpu", steps=1, small_steps=1, n_train=512)
    full = lfm.Config(preset="gpu", device="cpu")
    data = data_mod.load("shapes", lf.n_train, 16, lf.seed, "train")
    with scratch_checkpoints():  # the real builders, one training step each
        data_model = lfm.train(lf, cpu, "reference", data, "cost", lf.seed)[0]
        small = lfm.train(lf, cpu, "small", data, "cost", lf.seed, small=True)[0]
    rows.append(dit_row("lfm_stability, one of its 11 data / seed models", full.steps, data_model, full.batch))
    rows.append(dit_row("lfm_stability, its small (coarse) net", full.small_steps, small, full.batch))

    vc = fk.Config(preset="gpu", device="cpu", steps=1)
    video = fk.make_model(vc)
    ctx = vc.train_frames - fk.FRAMES_PER_CHUNK

    def video_step():  # forcing_kv's own teacher-forcing loop, one step, on the network counted here
        with scratch_checkpoints(), mock.patch.object(fk, "make_model", lambda cfg: video):
            fk.train_video_model(vc, cpu)

    rows.append((f"forcing_kv's video model, {vc.size} px", f"{(vc.size // fk.PATCH) ** 2} tokens x "
                 f"{ctx + vc.train_frames} frames x {vc.batch}", fk.Config(preset="gpu").steps,
                 lambda: train_step_cost(video_step, video)))

    rc, rfull = ram.Config(preset="gpu", device="cpu", group=2), ram.Config(preset="gpu", device="cpu")
    pcfg = pretrain.Config(**{**pretrain.PRESETS[rc.base], "preset": rc.base})
    ref = TinyDiT(**pretrain.model_kwargs(pcfg, 9, 3))
    y, g = ram.prompts_for_round(9, rc.group), torch.Generator().manual_seed(0)
    reward = lambda x, y: x.mean((1, 2, 3))  # noqa: E731  (the classifier reward: not counted, small)
    rounds, factor = rfull.rounds + rfull.preference_rounds, rfull.group / rc.group

    def ram_round():
        policy, old = copy.deepcopy(ref), copy.deepcopy(ref)
        hp = dict(m=rc.ram_m, ema=ram.EMA_OLD)
        return lambda: ram.ram_round(policy, ref, old, make_optimizer(policy, 1e-3), y, reward, rc, g, hp, "cpu"), \
            [policy, ref, old]

    def grpo_round():
        policy, hp = copy.deepcopy(ref), dict(clip=rc.grpo_clip, beta=ram.GRPO_BETA["composition"])
        return lambda: ram.grpo_round(policy, ref, make_optimizer(policy, 1e-3), y, reward, rc, g, hp, "cpu"), \
            [policy, ref]

    for name, make, what in (("RAM", ram_round, f"{9 * rfull.group} endpoints, K = {rfull.renoise}"),
                             ("Flow-GRPO", grpo_round, f"{9 * rfull.group} rollouts, {rfull.sde_steps} SDE steps")):
        rows.append((f"ram: one {name} round (rollouts and update)", what, rounds,
                     lambda make=make: scaled(train_step_cost(*make()), factor)))
    return rows


def main():
    from common.config import print_table

    table = []
    for name, shape, steps, count in presets():
        c = count()
        seconds = steps * (c["flops"] / SUSTAINED_FLOPS + c["passes"] * LAUNCH_SECONDS)
        table.append((name, shape, f"{c['flops'] / 1e9:.1f}", f"{c['activation_bytes'] / 2**20:.0f}", c["passes"],
                      steps, f"{steps * c['flops'] / 1e12:.0f}", f"{seconds:.0f}"))
    print_table(table, ("gpu preset: what is counted", "shape", "GFLOPs / step", "activations MiB / step (fp32)",
                        "network passes / step", "steps", "TFLOPs in all", "estimate on one H100, s"))


if __name__ == "__main__":
    main()
