import pytest
import torch

from common.evaluator import frechet_distance, get_evaluator, paired_cosine, paired_distance, within_class_diversity


def test_frechet_distance_against_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(20000, 3, generator=g) * torch.tensor([1.5, 2.0, 0.5]) + torch.tensor([1.0, 0.0, 0.0])
    # independent axes: FD = sum (mu_a - mu_b)^2 + sum (s_a - s_b)^2 = 1 + 0.25
    assert frechet_distance(a, b) == pytest.approx(1.25, abs=0.08)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_paired_metrics():
    f = torch.randn(5, 8)
    assert torch.allclose(paired_cosine(f, 2 * f), torch.ones(5))
    assert torch.allclose(paired_distance(f, 3 * f), torch.zeros(5), atol=1e-6)
    assert torch.allclose(paired_distance(f, -f), torch.full((5,), 2.0))


def test_evaluator_trains_caches_and_scores(monkeypatch):
    import common.evaluator

    ev, acc = get_evaluator("shapes", 8, "cpu", steps=20, n_train=512)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached evaluator was retrained")

    monkeypatch.setattr(common.evaluator, "optimizer_step", no_training)
    ev2, acc2 = get_evaluator("shapes", 8, "cpu", steps=20, n_train=512)  # must come from the cache
    assert acc == acc2 and acc > 0.5  # 9 classes: chance is 0.11; 20 steps already reach about 0.98 here
    x, y = torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    predicted = ev.logits(x).argmax(1)
    wrong_one = predicted.clone()
    wrong_one[0] = (wrong_one[0] + 1) % 9
    assert ev.accuracy(x, predicted) == 1.0 and ev.accuracy(x, wrong_one) == 0.75
    assert torch.equal(ev.logits(x), ev2.logits(x))
    assert ev.label_logprob(x, y).shape == (4,) and (ev.label_logprob(x, y) <= 0).all()
    assert ev.features(x).shape == (4, 64)


def test_within_class_diversity_averages_pairwise_distances_per_class():
    """Class 0: two opposite features (distance 2); class 1: three identical ones (0): mean over classes 1.
    A version that pooled all pairs, or averaged over pairs instead of classes, gives another number."""
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 1, 1, 1])
    assert within_class_diversity(f, y) == pytest.approx(1.0)
