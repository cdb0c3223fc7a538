import json
import math

import pytest
import torch
import torch.nn.functional as F

import lfm_stability as lfm
from common.config import lookup
from common.data import render_shapes
from common.dit import TinyDiT
from common.evaluator import frechet_distance
from common.sampler import cfg_velocity, euler


def random_net(patch: int, width: int, seed: int) -> TinyDiT:
    """A TinyDiT whose zero-initialised layers are perturbed, so that it predicts a non-zero velocity."""
    torch.manual_seed(seed)
    net = TinyDiT(img_size=8, channels=3, patch=patch, width=width, depth=1, heads=2, n_classes=3).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


# --- part 3: coarse-to-fine and its cost model -----------------------------------------------------


def test_coarse_to_fine_at_the_ends_is_one_model_alone():
    small, large = random_net(4, 16, 0), random_net(2, 32, 1)
    noise, y = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1])
    for scale in (1.0, 3.0):
        large_only = euler(cfg_velocity(large, y, scale, large.null_label), noise, 6)
        small_only = euler(cfg_velocity(small, y, scale, small.null_label), noise, 6)
        assert torch.equal(lfm.coarse_to_fine(small, large, noise, y, 6, 1.0, scale), large_only)
        assert torch.equal(lfm.coarse_to_fine(small, large, noise, y, 6, 0.0, scale), small_only)
        assert not torch.allclose(large_only, small_only)  # the two models really differ
        mid = lfm.coarse_to_fine(small, large, noise, y, 6, 0.5, scale)
        assert not torch.allclose(mid, large_only) and not torch.allclose(mid, small_only)


class Counting(torch.nn.Module):
    """Wraps a net and records the time of every call (CFG doubles the batch, not the calls)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.C, self.img_size, self.null_label, self.times = net, net.C, net.img_size, net.null_label, []

    def forward(self, x, t, y=None):
        self.times.append(float(t[0]))
        return self.net(x, t, y)


@pytest.mark.parametrize("switch", [1.0, 0.8, 0.5, 0.3, 0.25, 0.0])
def test_cost_model_counts_the_steps_that_each_model_really_takes(switch):
    """The cost model's split of the grid against an independent count of the calls coarse_to_fine
    makes: the small model is called at exactly the grid times t > switch."""
    small, large = Counting(random_net(4, 16, 0)), Counting(random_net(2, 32, 1))
    steps, noise, y = 10, torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    lfm.coarse_to_fine(small, large, noise, y, steps, switch, 2.0)
    grid = [1 - i / steps for i in range(steps)]
    assert len(small.times) == sum(t > switch + 1e-9 for t in grid) == lfm.step_split(steps, switch)[0]
    assert len(large.times) == steps - len(small.times)
    assert all(t > switch - 1e-6 for t in small.times) and all(t <= switch + 1e-6 for t in large.times)
    t_large, t_small = 3.0, 0.5  # seconds per step: the model's prediction is the sum over the calls
    predicted = steps * t_large / (len(large.times) * t_large + len(small.times) * t_small)
    assert lfm.cost_model_speedup(steps, switch, t_large, t_small) == pytest.approx(predicted)
    assert lfm.cost_model_speedup(steps, 1.0, t_large, t_small) == 1.0
    assert lfm.cost_model_speedup(steps, 0.0, t_large, t_small) == pytest.approx(t_large / t_small)


def test_round_robin_timing_rotates_the_order_and_keeps_every_sample():
    calls = []

    def sampler(name):
        def sample(noise, y):
            calls.append((name, len(y)))
            return noise * {"a": 1.0, "b": 2.0, "c": 3.0}[name]
        return sample

    noise, y = torch.randn(12, 3, 4, 4), torch.arange(12) % 3
    out, seconds = lfm.time_round_robin({k: sampler(k) for k in "abc"}, noise, y, 3, torch.device("cpu"))
    timed = [name for name, n in calls if n == 3]
    assert [name for name, n in calls if n == 2] == ["a", "b", "c"]  # one warm-up call each
    assert timed == list("abc" "bca" "cab" "abc")  # 4 rounds of 3 images, the order rotated
    assert all(len(v) == 4 and min(v) >= 0 for v in seconds.values())
    assert torch.equal(out["b"], 2 * noise) and torch.equal(out["c"], 3 * noise)  # every chunk once, in order


# --- part 2: balanced clustering -------------------------------------------------------------------


def test_equal_shares_water_fills_small_clusters():
    assert lfm.equal_shares(torch.tensor([50, 100, 200]), 60).tolist() == [20, 20, 20]
    assert lfm.equal_shares(torch.tensor([5, 100, 100, 0]), 61).tolist() == [5, 28, 28, 0]  # 5 kept whole
    q = lfm.equal_shares(torch.tensor([5, 100, 100]), 62)
    assert q.sum() == 62 and q[0] == 5 and abs(int(q[1]) - int(q[2])) <= 1
    with pytest.raises(lfm.UserError):
        lfm.equal_shares(torch.tensor([3, 3]), 7)


def directional_blobs(sizes=(50, 100, 250), seed=0):
    """Three bundles of directions (unequal sizes), each point with a random length: spherical
    k-means must see the directions and ignore the lengths."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.eye(3)
    f = torch.cat([(d + 0.15 * torch.randn(n, 3, generator=g)) for d, n in zip(dirs, sizes)])
    f = f * torch.exp(1.5 * torch.randn(len(f), 1, generator=g))  # lengths over a factor of ~100
    truth = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    return f, truth


def test_spherical_kmeans_clusters_directions_not_lengths():
    f, truth = directional_blobs()
    cluster, centres = lfm.spherical_kmeans(f, 3, seed=0)
    for i in range(3):  # each bundle is one cluster (up to a renaming), whatever the lengths
        assert (cluster[truth == i] == cluster[truth == i][0]).all()
    assert len(cluster.unique()) == 3
    assert torch.allclose(centres.norm(dim=1), torch.ones(3))
    unit = F.normalize(f, dim=1)  # a fixed point: every centre is the normalised mean of its members
    for c in range(3):
        assert torch.allclose(centres[c], F.normalize(unit[cluster == c].mean(0), dim=0), atol=1e-5)
    # Euclidean k-means on the raw rows would split by length instead: the test can tell them apart
    scaled, _ = lfm.spherical_kmeans(f * torch.rand(len(f), 1) * 10, 3, seed=0)
    assert torch.equal(scaled, cluster)


def test_balanced_subset_keeps_the_nearest_or_furthest_members_in_equal_shares():
    f, truth = directional_blobs()
    cluster, centres = lfm.spherical_kmeans(f, 3, seed=0)
    cos = (F.normalize(f, dim=1) * centres[cluster]).sum(1)
    for nearest in (True, False):
        keep = lfm.balanced_subset(f, cluster, centres, 90, nearest)
        assert len(keep) == 90 and len(keep.unique()) == 90
        assert torch.bincount(truth[keep], minlength=3).tolist() == [30, 30, 30]
        for c in range(3):  # an oracle: sort each cluster by cosine to its centre and take the end
            members = (cluster == c).nonzero().flatten()
            ranked = members[cos[members].argsort(descending=nearest)][:30]
            assert set(ranked.tolist()) == set(keep[cluster[keep] == c].tolist())
        smaller = lfm.balanced_subset(f, cluster, centres, 45, nearest)
        assert set(smaller.tolist()) <= set(keep.tolist())  # nested fractions
    near, far = (lfm.balanced_subset(f, cluster, centres, 60, n) for n in (True, False))
    for c in range(3):  # with 20 + 20 of >= 50 per cluster, the two never meet
        assert cos[near[cluster[near] == c]].min() > cos[far[cluster[far] == c]].max()
    random = lfm.random_subset(400, 0.25, seed=1)
    assert len(random) == 100 and set(random.tolist()) <= set(lfm.random_subset(400, 0.5, seed=1).tolist())


# --- part 1: stability measures --------------------------------------------------------------------


def test_shape_attributes_recover_position_and_size_from_pixels():
    """Against the renderer's own attributes: the centroid of a circle or square is its centre and
    the lit area its geometric area (square side 1.7 r), to sub-pixel precision."""
    g = torch.Generator().manual_seed(0)
    n = 64
    shape, colour = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    r = 3 + 2 * torch.rand(n, generator=g)
    cx, cy = 6 + 4 * torch.rand(n, generator=g), 6 + 4 * torch.rand(n, generator=g)
    a = lfm.shape_attributes(render_shapes(shape, colour, cx, cy, r, 16))
    assert (a[:, :2] - torch.stack([cx, cy], 1)).abs().max() < 0.1
    area = torch.where(shape == 0, math.pi * r**2, (1.7 * r) ** 2)
    assert ((a[:, 2] / area) - 1).abs().max() < 0.04
    moved = lfm.shape_attributes(render_shapes(shape, colour, cx + 1.5, cy - 1, r, 16))
    assert torch.allclose(moved[:, :2] - a[:, :2], torch.tensor([1.5, -1.0]).expand(n, 2), atol=0.15)
    clean = render_shapes(shape, colour, cx, cy, r, 16)
    dark = (clean.amax(1, keepdim=True) == -1) & (torch.rand(n, 3, 16, 16, generator=g) < 0.5)
    dim_background = clean + 0.15 * dark  # background pixels lit to 0.075, below the 0.1 threshold
    assert torch.allclose(lfm.shape_attributes(dim_background), a)


class FakeEvaluator:
    """Features and logits that are simple functions of the pixels (no training needed)."""

    def features(self, x):
        return x.flatten(1)[:, :16] + 2.0

    def logits(self, x):
        return x.flatten(1)[:, :3]


def rendered(n, seed, jitter=0.0):
    """n shapes of 3 classes at random places and sizes, optionally moved by a small jitter."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    cx, cy = 4 + 8 * torch.rand(n, generator=g), 4 + 8 * torch.rand(n, generator=g)
    r = 2 + 2 * torch.rand(n, generator=g)
    moved = jitter * torch.randn(2, n, generator=torch.Generator().manual_seed(seed + 1))
    return y, render_shapes(y, y, cx, cy, r, 16), render_shapes(y, y, cx + moved[0], cy + moved[1], r, 16)


REAL = dict(mse=1.0, position=2.0, size=10.0)  # a made-up real-data spread for the denominators


def test_stability_metrics_pass_for_small_moves_and_fail_for_unrelated_images():
    y, x, near = rendered(60, 0, jitter=0.2)
    m = lfm.stability_metrics(FakeEvaluator(), x, near, y, REAL, seed=0)
    assert m["passes"] and m["verdict"] == "holds" and m["position_ratio"][2] < 0.3 and m["size_ratio"][0] < 0.1
    assert m["position_ratio"][1] <= m["position_ratio"][0] <= m["position_ratio"][2]
    assert m["position_ratio"][0] == pytest.approx(m["position_err"] / m["unrelated_position_err"])
    assert m["real_position_ratio"] == pytest.approx(m["position_err"] / 2.0)  # paired / the real spread
    assert m["real_mse_ratio"] == pytest.approx(m["mse_err"] / 1.0)
    _, other, _ = rendered(60, 5)  # same classes, other places: unrelated by construction
    m = lfm.stability_metrics(FakeEvaluator(), x, other, y, REAL, seed=0)
    assert m["verdict"] == "fails" and 0.6 < m["position_ratio"][0] < 1.5 and 0.6 < m["mse_ratio"][0] < 1.5
    m = lfm.stability_metrics(FakeEvaluator(), x, x.clone(), y, REAL, seed=0)
    assert m["paired_cos"] == pytest.approx(1.0) and m["mse_err"] == 0.0 and m["position_err"] == 0.0
    assert m["unrelated_mse_err"] > 0 and m["unrelated_position_err"] > 0.5


def class_placed(n=90, jitter=0.3, seed=0):
    """Shapes whose class sets the place (three far-apart corners) and whose noise moves them a little:
    an unrelated partner of the same class sits close, one of another class far away."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    corner = torch.tensor([[4.0, 4.0], [12.0, 4.0], [8.0, 12.0]])[y]
    at = corner + jitter * 4 * torch.randn(n, 2, generator=g)
    x = render_shapes(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), at[:, 0], at[:, 1],
                      torch.full((n,), 2.5), 16)
    return y, x


def test_unrelated_partners_share_the_label_in_the_metric_and_in_the_real_spread():
    """With the class setting the place, same-class unrelated pairs are ~2 px apart and any-class pairs
    ~7 px: the within-class baseline (ours) and the all-samples permutation (the official cosine) differ."""
    class PlaceEvaluator(FakeEvaluator):  # features that see where the shape is
        def features(self, x):
            return torch.cat([lfm.shape_attributes(x)[:, :2], torch.ones(len(x), 1)], 1)

    y, x = class_placed()
    _, x2 = class_placed(seed=1)
    m = lfm.stability_metrics(PlaceEvaluator(), x, x2, y, REAL, seed=0)
    assert m["unrelated_position_err"] < 3.0  # partners of another class would be ~7 px away
    perm = lfm.shuffle_within_class(y, torch.Generator().manual_seed(0))
    expected = (lfm.shape_attributes(x)[:, :2] - lfm.shape_attributes(x2)[perm, :2]).norm(dim=1).mean()
    assert m["unrelated_position_err"] == pytest.approx(expected.item(), rel=1e-5)
    real = lfm.real_spread(x, y, seed=0)
    assert real["position"] < 3.0 and real["mse"] > 0 and real["size"] >= 0
    # the official measure permutes over all samples: features that encode the place see it
    assert m["permuted_cos"] < m["unrelated_cos"]


@pytest.mark.parametrize("mse, position, verdict", [
    ([0.3, 0.2, 0.4], [0.3, 0.2, 0.45], "holds"),
    ([0.3, 0.2, 0.4], [0.7, 0.6, 0.8], "fails"),  # one ratio above the gate is enough to fail ...
    ([0.7, 0.6, 0.8], [0.3, 0.2, 0.4], "fails"),
    ([0.3, 0.2, 0.4], [0.45, 0.35, 0.55], "undecided"),  # ... and an interval across it decides nothing
    ([0.45, 0.4, 0.6], [0.3, 0.2, 0.4], "undecided"),
])
def test_gate_needs_both_ratios_and_reads_the_intervals(mse, position, verdict):
    assert lfm.gate(dict(mse_ratio=mse, position_ratio=position)) == verdict


def test_unrelated_partner_has_the_same_label_and_other_noise():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    perm = lfm.shuffle_within_class(y, torch.Generator().manual_seed(3))
    assert sorted(perm.tolist()) == list(range(10))
    assert torch.equal(y[perm], y) and (perm != torch.arange(10)).all()


# --- the models compared and their quality ---------------------------------------------------------


def test_model_specs_halves_are_disjoint_and_cover_the_data_and_seeds_differ_only_in_the_seed():
    cfg = lfm.Config(preset="smoke", n_train=400, clusters=3)
    f, _ = directional_blobs((100, 100, 200))
    cluster, centres = lfm.spherical_kmeans(f, 3, seed=0)
    specs = lfm.model_specs(cfg, f, cluster, centres)
    a, b = set(specs["half_A"][0].tolist()), set(specs["half_B"][0].tolist())
    assert not a & b and a | b == set(range(400)) and len(a) == len(b) == 200
    assert specs["reference"][0].tolist() == list(range(400))
    for name in ("reference", "half_A", "random_25", "nearest_25", "furthest_25"):
        twin = "other_seed" if name == "reference" else f"{name}_s2"
        assert torch.equal(specs[name][0], specs[twin][0]) and specs[name][1] == specs[twin][1]
        assert specs[twin][2] == specs[name][2] + 1  # the second training seed, the same data
    for name in ("random_25", "nearest_25", "furthest_25"):
        assert len(specs[name][0]) == 100
    assert set(specs["random_25"][0].tolist()) <= a  # nested: the random quarter is inside half A
    assert set(specs["nearest_25"][0].tolist()) != set(specs["furthest_25"][0].tolist())
    assert len({key for _, key, _ in specs.values()}) == 6  # the data keys: full, A, B, three quarters


def gaussian_features(n, shift, seed, dim=4):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + shift


def test_fd_interval_covers_the_population_value():
    """The FD of N(0.5, I) to N(0, I) in 4 dimensions is 4 x 0.25 = 1 (equal covariances). Over 30 draws
    of 400 samples against a large real set, the interval covers 1 in most draws; an interval that only
    brackets its own estimate, shifted the wrong way or too narrow, would not."""
    real = gaussian_features(20000, 0.0, 99)
    covered = sum(lo < 1.0 < hi for _, lo, hi in (lfm.fd_ci(gaussian_features(400, 0.5, s), real, s, 200)
                                                  for s in range(30)))
    assert covered >= 24


def test_fd_ratio_direction_and_the_seed_spread_in_its_interval():
    real = gaussian_features(4000, 0.0, 99)
    near, far = gaussian_features(600, 0.3, 1), gaussian_features(600, 0.9, 2)
    r = lfm.fd_ratio_ci([[(near, far)]], real, seed=0, n_boot=100)
    assert r[0] == pytest.approx(frechet_distance(near, real) / frechet_distance(far, real))
    assert r[0] < 0.3 and r[2] < 1  # the closer set has the smaller FD: the ratio is below 1
    assert lfm.fd_ratio_ci([[(far, near)]], real, seed=0, n_boot=100)[1] > 1
    # two training seeds that disagree: one seed's ratio is ~0.1, the other's ~1; the interval spans both
    same = gaussian_features(600, 0.9, 3)
    both = lfm.fd_ratio_ci([[(near, far)], [(same, far)]], real, seed=0, n_boot=200)
    one = lfm.fd_ratio_ci([[(near, far)]], real, seed=0, n_boot=200)
    assert both[0] == pytest.approx((r[0] + frechet_distance(same, real) / frechet_distance(far, real)) / 2)
    assert both[2] - both[1] > 3 * (one[2] - one[1]) and both[1] < r[0] * 1.5 and both[2] > 0.7


# --- the command line and the whole run ------------------------------------------------------------


@pytest.mark.parametrize("flags, word", [
    (["--clusters", "100000"], "clusters"),
    (["--n-samples", "10", "--time-batch", "5"], "n-samples"),
    (["--time-batch", "7"], "time-batch"),
    (["--n-train", "5"], "n-train"),
    (["--small-width", "8"], "small-width"),
    (["--cfg-scale", "-1"], "cfg-scale"),
])
def test_bad_flags_are_one_line_errors_before_any_work(capsys, flags, word):
    with pytest.raises(SystemExit) as e:
        lfm.main(["--preset", "smoke", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and word in err and len(err.strip().splitlines()) == 1


def test_smoke_run_writes_every_key(tmp_path):
    res = lfm.main(["--preset", "smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("stability", "stability_cfg", "stability_worst", "stability_worst_cfg", "official_cosine",
                "real_spread", "model_fd", "pruning", "cluster_class_counts", "cost_ratio_per_step", "c2f",
                "c2f_paper", "c2f_best", "method", "claims", "fd_real_vs_real", "seconds"):
        assert key in saved and key in res
    assert set(saved["stability"]) == set(saved["stability_cfg"]) == set(lfm.PAIRS)
    assert set(saved["official_cosine"]) == {"paired", "permuted"}
    for v in [*saved["stability"].values(), *saved["stability_cfg"].values()]:
        assert {"real_position_ratio", "position_ratio", "mse_ratio", "paired_cos", "permuted_cos", "verdict"} <= set(v)
        assert v["position_ratio"][1] <= v["position_ratio"][2]
    for name, (fd, lo, hi) in saved["model_fd"].items():
        assert math.isfinite(fd) and lo <= hi, name
    assert set(saved["model_fd"]) >= {"reference", "other_seed", "half_A_s2", "furthest_25_s2", "small", "large"}
    assert set(saved["pruning"]) == {"half_data", "nearest_vs_random", "furthest_vs_random", "random_25_vs_full"}
    assert [r["switch_t"] for r in saved["c2f"]] == list(lfm.SWITCHES)
    assert [r["small_steps"] for r in saved["c2f"]] == [0, 2, 2, 3, 3, 4, 4]  # 4 steps: grid times 1, .75, .5, .25
    assert saved["c2f"][0]["speedup"] == 1.0 and saved["c2f"][0]["cos_to_large"] == pytest.approx(1.0)
    assert saved["c2f"][0]["fd_ratio"][0] == 1.0 and saved["c2f"][0]["speedup_cost_model"] == 1.0
    assert len(saved["method"]["distance_to_large"]["large model alone"]) == 5
    for c in saved["claims"]:  # every claim's number is the one stored at its key
        assert set(c) == {"claim", "paper", "ours", "key", "criterion", "reproduced", "note"}
        assert c["ours"] == lookup(saved, c["key"]) and isinstance(c["reproduced"], bool)
    for fig in ("fig_method.png", "fig_stability_grid.png", "fig_c2f.png"):
        assert (tmp_path / fig).stat().st_size > 1000


def test_same_seed_same_results_when_retrained(tmp_path, monkeypatch):
    """Reproducibility on CPU: two smoke runs from empty caches agree on everything but timings."""
    runs = []
    for name in ("a", "b"):
        monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / f"ckpt_{name}"))
        lfm.main(["--preset", "smoke", "--out", str(tmp_path / name)])
        saved = json.loads((tmp_path / name / "results.json").read_text())
        for key in ("seconds", "train_seconds", "cost_ratio_per_step", "seconds_per_step", "c2f_paper", "c2f_best",
                    "claims"):
            saved.pop(key)
        for r in saved["c2f"]:
            for key in ("seconds", "speedup", "speedup_cost_model"):
                r.pop(key)
        runs.append(saved)
    assert runs[0] == runs[1]
