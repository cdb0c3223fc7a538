"""common/stats.py against independent oracles: exact enumeration, normal theory, hand-made curves."""

import itertools
import math

import pytest
import torch

from common import stats
from common.stats import (
    bootstrap_ci,
    first_at_or_above,
    holm,
    levelled_off,
    rank_corr,
    ratio_ci,
    shifted_interval,
    sign_flip_p,
    trailing_mean,
)


def test_sign_flip_p_matches_the_full_enumeration_two_sided():
    d = torch.tensor([0.9, -0.2, 0.5, 0.7, -0.1, 0.4, 0.3, 0.8])
    observed = d.mean().abs()
    patterns = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=len(d))))  # all 2^n sign patterns
    exact = ((patterns * d).mean(1).abs() >= observed - 1e-12).double().mean().item()
    assert sign_flip_p(d, 20_000, seed=0) == pytest.approx(exact, abs=0.01)
    # two-sided: flipping every sign gives the same p (a one-sided test would not)
    assert sign_flip_p(-d, 20_000, seed=0) == pytest.approx(exact, abs=0.01)
    assert exact < 0.1  # a p that a one-sided test would halve: the check above can tell them apart


def test_sign_flip_p_of_pure_noise_is_not_small():
    d = torch.randn(40, generator=torch.Generator().manual_seed(1))
    d = d - d.mean()  # mean exactly 0: every pattern reaches it
    assert sign_flip_p(d, 2000, seed=0) > 0.99


def test_bootstrap_ci_has_the_normal_width_and_level():
    g = torch.Generator().manual_seed(0)
    n, sigma = 400, 2.0
    d = 3.0 + sigma * torch.randn(n, generator=g)
    lo, hi = bootstrap_ci(d, 4000, seed=1)
    se = d.std().item() / math.sqrt(n)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)  # a 90% interval would be 1.645 / 1.96 = 0.84 as wide
    assert lo < d.mean().item() < hi
    lo90, hi90 = bootstrap_ci(d, 4000, seed=1, level=0.90)
    assert (hi90 - lo90) / (hi - lo) == pytest.approx(1.645 / 1.96, rel=0.08)


def test_holm_on_a_hand_made_family():
    # sorted p: 0.01, 0.02, 0.03, 0.5 -> times 4, 3, 2, 1 -> 0.04, 0.06, 0.06, 0.5 (made non-decreasing)
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert holm([0.4, 0.6]) == pytest.approx([0.8, 0.8])  # 0.8, then max(0.8, 0.6)
    assert holm([0.9, 0.9, 0.9]) == [1.0, 1.0, 1.0]


def test_trailing_mean_first_at_or_above_and_the_plateau_rule():
    assert trailing_mean([1, 2, 3, 4], 3) == pytest.approx([1, 1.5, 2, 3])
    assert first_at_or_above([0.1, 0.3, 0.2, 0.5], 0.3) == 1
    assert first_at_or_above([0.1, 0.2], 0.3) is None
    rising = [0.1 * i for i in range(20)]
    assert not levelled_off(rising, window=5, tol=0.01, k=3)
    flat = rising[:10] + [0.9] * 10
    assert levelled_off(flat, window=5, tol=0.01, k=3)
    assert not levelled_off([0.5] * 5, window=5, tol=0.01, k=3)  # no value before the window


def test_rank_corr_against_a_direct_spearman():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, generator=g)
    scores = torch.stack([base + 0.3 * torch.randn(12, generator=g) for _ in range(3)])

    def spearman(a, b):  # Pearson correlation of the ranks
        ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
        return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()

    pairs = [spearman(scores[i], scores[j]) for i, j in itertools.combinations(range(3), 2)]
    assert rank_corr(scores) == pytest.approx(sum(pairs) / len(pairs), abs=1e-9)
    assert rank_corr(torch.stack([base, base])) == pytest.approx(1.0)
    assert rank_corr(torch.stack([base, -base])) == pytest.approx(-1.0)


def test_paired_ci_skips_undefined_pairs_and_brackets_the_mean():
    a = torch.tensor([1.0, 2.0, float("nan"), 4.0, 5.0])
    b = torch.tensor([0.0, 1.0, 1.0, float("nan"), 3.0])
    r = stats.paired_ci(a, b, 500, seed=0)
    assert r["n"] == 3 and r["mean"] == pytest.approx(4 / 3) and r["ci"][0] <= 4 / 3 <= r["ci"][1]
    assert r["ci"] == stats.paired_ci(a, b, 500, seed=0)["ci"] and 1.0 <= r["ci"][0] and r["ci"][1] <= 2.0
    one = stats.paired_ci(a[:1], b[:1], 500, seed=0)
    assert one["n"] == 1 and all(math.isnan(x) for x in one["ci"])


def test_ratio_ci_is_the_ratio_of_means_and_covers_the_truth():
    """Pairs (num, den) with a known ratio of expectations (2): the estimate is mean/mean, not the mean of
    the ratios, the interval covers 2 in most of 40 draws, and resampling keeps num[i], den[i] together
    (den = num / 2 exactly gives an interval of zero width)."""
    g = torch.Generator().manual_seed(0)
    num, den = torch.tensor([1.0, 9.0]), torch.tensor([1.0, 1.0])
    assert ratio_ci(num, den, 100, seed=0)[0] == pytest.approx(5.0)  # the mean of the ratios would be 5 too
    assert ratio_ci(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 3.0]) * torch.tensor([1.0, 0.2]), 100, 0)[0] \
        == pytest.approx(4 / 1.6)  # mean/mean = 2.5; the mean of the ratios would be 3
    r = ratio_ci(num, num / 2, 200, seed=1)
    assert r[1] == pytest.approx(2.0) and r[2] == pytest.approx(2.0)  # paired: every resample has ratio 2
    den = 0.1 + 1.9 * torch.rand(400, generator=g)  # E[1 / den] ~ 1.58, but 1 / E[den] ~ 0.95
    est, lo, hi = ratio_ci(torch.ones(400), den, 300, seed=3)
    assert lo < est < hi < 1.2  # the resamples are ratios of means too
    covered = 0
    for _ in range(40):
        den = torch.rand(200, generator=g) + 0.5
        num = 2 * den + 0.3 * torch.randn(200, generator=g)
        _, lo, hi = ratio_ci(num, den, 300, seed=2)
        covered += lo < 2.0 < hi
    assert covered >= 32


def test_shifted_interval_moves_a_biased_bootstrap_back_to_the_estimate():
    boot = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]) + 10.0  # biased up by 10 against the estimate 3
    est, lo, hi = shifted_interval(boot, 3.0, level=0.5)
    assert est == 3.0 and lo == pytest.approx(2.0) and hi == pytest.approx(4.0)
