"""common.cost counts what a training step costs: checked on a layer whose cost is known by hand."""

import torch

from common.cost import dit_step, scaled, train_step_cost
from common.dit import TinyDiT


def test_a_linear_layer_costs_what_the_hand_count_says():
    B, n_in, n_out = 32, 24, 16
    layer = torch.nn.Linear(n_in, n_out)
    x = torch.randn(B, n_in)

    def step():
        torch.relu(layer(x)).sum().backward()

    c = train_step_cost(step, layer)
    # forward 2 B n_in n_out; backward: the weight's gradient only (x needs none), another 2 B n_in n_out
    assert c["flops"] == 4 * B * n_in * n_out
    # saved for backward: x (for the weight's gradient) and relu's output (B x n_out); never the weight
    assert c["activation_bytes"] == 4 * (B * n_in + B * n_out)


def test_a_dit_step_grows_linearly_with_the_batch():
    model = TinyDiT(img_size=8, channels=3, patch=4, n_classes=9, width=32, depth=1, heads=2)
    one, two = (train_step_cost(dit_step(model, b), model) for b in (4, 8))
    assert two["flops"] == 2 * one["flops"] > 0
    assert two["activation_bytes"] == 2 * one["activation_bytes"] > 0
    assert one["passes"] == two["passes"] == 1  # one forward call of the network per step
    assert scaled(one, 2) == dict(two)  # what the cost table does for a step counted at a cut batch


def test_passes_count_every_forward_call_of_every_module_read():
    """A round that samples with one network and trains another: each call counted, the weights of both
    left out of the activations."""
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    x = torch.randn(3, 4)

    def step():
        with torch.no_grad():
            z = b(b(x))  # two sampling passes: nothing saved
        a(z).sum().backward()

    c = train_step_cost(step, [a, b])
    assert c["passes"] == 3 and c["activation_bytes"] == 4 * 3 * 4  # only a's input z


def test_a_step_with_two_updates_counts_the_saved_tensors_of_both():
    """Flow-GRPO's round backs up twice: the first update's saved tensors are freed before the second is
    built, and a storage address reused by the second must not read as already counted."""
    layer = torch.nn.Linear(64, 64)

    def one():
        torch.relu(layer(torch.randn(32, 64))).sum().backward()

    def two():
        one()
        one()

    assert train_step_cost(two, layer)["activation_bytes"] == 2 * train_step_cost(one, layer)["activation_bytes"]
