"""What one training step costs, counted on any device: FLOPs and the activation memory autograd keeps.

    python -m common.cost          # the table of every script's gpu preset (docs/running.md quotes it)

FLOPs come from torch's FlopCounterMode (matrix products and attention, forward and backward; the
elementwise work it does not count is small next to them at these widths). Activation memory is the
sum of the bytes of the tensors autograd saves for the backward pass, counted once each, in float32
(under bf16 autocast the matmul inputs it saves are half that). Both are exact for the step counted;
turning them into seconds on a GPU is an estimate, because tiny models are bound by kernel launches,
not by arithmetic.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode


def train_step_cost(step, model: torch.nn.Module) -> dict:
    """step(): one forward and backward pass of `model`, returning nothing. -> {flops, activation_bytes}.
    The weights autograd saves are not activations: tensors that share a parameter's storage are skipped."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape), t.storage_offset())
        if key not in seen and key[0] not in weights:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return dict(flops=counter.get_total_flops(), activation_bytes=total[0])


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
LAUNCH_SECONDS = 2e-3


def presets() -> list:
    """(what is counted, the preset's training steps, model, batch, labelled) for each gpu preset."""
    import time_blind_fm
    from common import pretrain
    from common.dit import SIZES, TinyDiT

    rows = []
    base = pretrain.Config(preset="gpu", device="cpu")
    rows.append(("base model (common.pretrain)", base.steps, TinyDiT(
        img_size=base.size, channels=3, patch=base.patch, n_classes=9, **SIZES[base.model]), base.batch, True))
    tb = time_blind_fm.Config(preset="gpu", device="cpu")
    n = len(tb.sizes.split(","))
    n_nets = 4 + 2 * n + 2 * (n - 1)  # the 2 x 2 grid; t and time-blind per size, native and upsampled
    for size in sorted({int(s) for s in tb.sizes.split(",")}):
        rows.append((f"time_blind_fm, one of its {n_nets} nets, {size} px", tb.steps,
                     time_blind_fm.make_net(tb, size, 3, True), tb.batch, False))
    return rows


def main():
    from common.config import print_table

    table = []
    for name, steps, model, batch, labelled in presets():
        c = train_step_cost(dit_step(model, batch, labelled), model)
        seconds = steps * c["flops"] / SUSTAINED_FLOPS + steps * LAUNCH_SECONDS
        table.append((name, f"{model.img_size // model.P}^2 tokens x {batch}", f"{c['flops'] / 1e9:.1f}",
                      f"{c['activation_bytes'] / 2**20:.0f}", steps, f"{steps * c['flops'] / 1e12:.0f}",
                      f"{seconds:.0f}"))
    print_table(table, ("gpu preset: network trained", "tokens x batch", "GFLOPs / step",
                        "activations MiB / step (fp32)", "steps", "TFLOPs in all", "estimate on one H100, s"))


if __name__ == "__main__":
    main()
