"""Small, generic statistics that more than one paper script reads its claims through.

Seed-paired comparisons (attention_sinks, lfm_stability) need intervals and tests on paired
differences; races (ram) read curves through a trailing mean; stability of a ranking (forcing_kv)
is a rank correlation. Everything is seeded, so the same seed gives the same interval.
"""

import torch


def bootstrap_ci(d: torch.Tensor, n_boot: int, seed: int, level: float = 0.95) -> list:
    """Percentile interval of the mean of paired differences d (n,): resample the pairs with replacement
    n_boot times. -> [low, high]."""
    g = torch.Generator().manual_seed(seed)
    means = d.double()[torch.randint(0, len(d), (n_boot, len(d)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return [float(lo), float(hi)]


def paired_ci(a: torch.Tensor, b: torch.Tensor, n_boot: int, seed: int) -> dict:
    """a - b (n,) over the pairs where both are defined (not NaN): mean, 95% `bootstrap_ci` (NaN with fewer
    than two pairs) and the number of pairs n."""
    d = (a - b)[~(a - b).isnan()]
    ci = bootstrap_ci(d, n_boot, seed) if len(d) > 1 else [float("nan")] * 2
    return dict(mean=d.double().mean().item() if len(d) else float("nan"), ci=ci, n=len(d))


def ratio_ci(num: torch.Tensor, den: torch.Tensor, n_boot: int, seed: int, level: float = 0.95) -> list:
    """mean(num) / mean(den) of paired values with its percentile interval: resample the pairs i with
    replacement n_boot times, num[i] and den[i] together. num, den: (n,) -> [ratio, low, high]."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, len(num), (n_boot, len(num)), generator=g)
    boot = num.double()[i].mean(1) / den.double()[i].mean(1).clamp(min=1e-300)
    lo, hi = torch.quantile(boot, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return [float(num.double().mean() / den.double().mean()), float(lo), float(hi)]


def shifted_interval(boot: torch.Tensor, estimate: float, level: float = 0.95) -> list:
    """[estimate, low, high] for a statistic whose resamples are biased (a Frechet distance grows with the
    duplicates of a resample): the percentile interval of the bootstrap values moved by their bias,
    mean(boot) - estimate, so it is centred where the estimate is."""
    d = boot.double() - boot.double().mean()
    lo, hi = torch.quantile(d, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return [estimate, estimate + float(lo), estimate + float(hi)]


def sign_flip_p(d: torch.Tensor, n_perm: int, seed: int) -> float:
    """Two-sided paired permutation test of mean(d) = 0. Under the null each pair's sign is a coin flip,
    so the p-value is the share of random sign patterns whose |mean| reaches the observed |mean|
    (counting the observed pattern itself, so p >= 1 / (n_perm + 1))."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n_perm, len(d)), generator=g).double() * 2 - 1
    null = (signs * d.double()).mean(1).abs()
    return float((1 + (null >= d.double().mean().abs() - 1e-12).sum()) / (n_perm + 1))


def holm(p: list) -> list:
    """Holm-Bonferroni adjusted p-values for a family of m tests: the i-th smallest p (i = 0..m-1) is
    multiplied by m - i, then made non-decreasing in that order and capped at 1. Rejecting where the
    adjusted p < alpha keeps the family-wise error rate at alpha."""
    m, adj, running = len(p), [0.0] * len(p), 0.0
    for i, j in enumerate(sorted(range(m), key=lambda j: p[j])):
        running = max(running, min(1.0, (m - i) * p[j]))
        adj[j] = running
    return adj


def trailing_mean(values: list, k: int) -> list:
    """Trailing moving average over k values (fewer at the start), so one lucky value cannot set a peak."""
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def first_at_or_above(values: list, level: float):
    """Index of the first value >= level, or None."""
    return next((i for i, v in enumerate(values) if v >= level), None)


def levelled_off(values: list, window: int, tol: float, k: int) -> bool:
    """The plateau rule: the mean of the last `window` values is no higher than the best trailing mean
    (over k) before them plus tol: the curve has levelled off, or fallen back."""
    if len(values) < window + 1:  # the window and at least one value before it
        return False
    before = trailing_mean(values, k)[:-window]
    return sum(values[-window:]) / window <= max(before) + tol


def rank_corr(scores: torch.Tensor) -> float:
    """scores (n, m): n draws of m scores. Spearman's correlation of the scores' ranks between two draws,
    averaged over all pairs of draws: 1 = every draw orders the m items alike, about 0 = noise."""
    r = scores.flatten(1).argsort(1).argsort(1).double()  # (n, m) ranks
    r = r - r.mean(1, keepdim=True)
    r = r / r.norm(dim=1, keepdim=True)
    n = len(r)
    return (((r @ r.T).sum() - n) / (n * (n - 1))).item()  # the off-diagonal mean
