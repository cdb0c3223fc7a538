import json
import math

import pytest
import torch

import lfm_stability as lfm
from common.dit import TinyDiT
from common.sampler import cfg_velocity, euler, sample_labels


def random_net(patch: int, width: int, seed: int) -> TinyDiT:
    """A TinyDiT whose zero-initialised layers are perturbed, so that it predicts a non-zero velocity."""
    torch.manual_seed(seed)
    net = TinyDiT(img_size=8, channels=3, patch=patch, width=width, depth=1, heads=2, n_classes=3).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


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


def test_equal_shares_water_fills_small_clusters():
    assert lfm.equal_shares(torch.tensor([50, 100, 200]), 60).tolist() == [20, 20, 20]
    assert lfm.equal_shares(torch.tensor([5, 100, 100, 0]), 61).tolist() == [5, 28, 28, 0]  # 5 kept whole
    q = lfm.equal_shares(torch.tensor([5, 100, 100]), 62)
    assert q.sum() == 62 and q[0] == 5 and abs(int(q[1]) - int(q[2])) <= 1
    with pytest.raises(lfm.UserError):
        lfm.equal_shares(torch.tensor([3, 3]), 7)


def test_balanced_clustering_keeps_equal_shares_of_unequal_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = (50, 100, 250)  # unequal clusters, far apart
    f = torch.cat([c + 0.3 * torch.randn(n, 2, generator=g) for c, n in zip(centres, sizes)])
    truth = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    cluster = lfm.kmeans(f, 3, seed=0)
    for i in range(3):  # k-means recovers the blobs (up to a renaming)
        assert (cluster[truth == i] == cluster[truth == i][0]).all()
    keep = lfm.balanced_subset(cluster, 3, 90, seed=1)
    assert len(keep) == 90 and len(keep.unique()) == 90
    assert torch.bincount(truth[keep], minlength=3).tolist() == [30, 30, 30]
    smaller = lfm.balanced_subset(cluster, 3, 45, seed=1)
    assert set(smaller.tolist()) <= set(keep.tolist())  # nested fractions
    random = lfm.random_subset(400, 0.25, seed=1)
    assert len(random) == 100 and set(random.tolist()) <= set(lfm.random_subset(400, 0.5, seed=1).tolist())


class FakeEvaluator:
    """Features and logits that are simple functions of the pixels (no training needed)."""

    def features(self, x):
        return x.flatten(1)[:, :16] + 2.0

    def logits(self, x):
        return x.flatten(1)[:, :3]


def test_stability_metrics_extremes_on_identical_inputs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 4, 4, generator=g), torch.arange(12) % 3
    m = lfm.stability_metrics(FakeEvaluator(), x, x.clone(), y, seed=0)
    assert m["paired_cos"] == pytest.approx(1.0) and m["paired_mse"] == 0.0 and m["label_agreement"] == 1.0
    assert m["unrelated_mse"] > 0 and m["unrelated_cos"] < 1  # different noise, different images
    same = x[:1].expand(12, -1, -1, -1)  # every image identical: unrelated pairs are identical too
    m = lfm.stability_metrics(FakeEvaluator(), same, same.clone(), y, seed=0)
    assert m["unrelated_cos"] == pytest.approx(1.0) and m["unrelated_mse"] == 0.0


def test_unrelated_partner_has_the_same_label_and_other_noise():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    perm = lfm.shuffle_within_class(y, torch.Generator().manual_seed(3))
    assert sorted(perm.tolist()) == list(range(10))
    assert torch.equal(y[perm], y) and (perm != torch.arange(10)).all()


def test_trajectory_uses_the_noise_of_sample_labels():
    """noise_for reproduces sample_labels' noise: the trajectory ends on the sampled images, and
    a model compared with itself stays at distance 0 along the whole path."""
    net = random_net(4, 16, 2)
    cfg = lfm.Config(sample_steps=5, cfg_scale=2.0)
    y = torch.tensor([0, 1, 2, 1])
    noise = lfm.noise_for(4, seed=7, size=8)
    final, _ = euler(cfg_velocity(net, y, 2.0, net.null_label), noise, 5, return_trajectory=True)
    assert torch.allclose(final, sample_labels(net, y, 5, 2.0, seed=7), atol=1e-6)
    d = lfm.trajectory_distance({"reference": net, "same": net}, noise, y, cfg)["same"]
    assert len(d) == 6 and max(d) == 0.0


def test_bad_switches_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as e:
        lfm.main(["--preset", "smoke", "--switches", "1,1.5"])
    assert e.value.code == 2 and "switches" in capsys.readouterr().err


def test_smoke_run_writes_every_key(tmp_path):
    res = lfm.main(["--preset", "smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("stability", "fd_by_fraction", "c2f", "fd_large_only", "c2f_best_speedup", "seconds"):
        assert key in saved and key in res
    assert set(saved["stability"]) == set(lfm.PART1[1:])
    for v in saved["stability"].values():
        assert {"paired_cos", "unrelated_cos", "label_agreement", "paired_mse", "unrelated_mse"} <= set(v)
    for kind in ("random", "balanced"):
        assert set(saved["fd_by_fraction"][kind]) == {"1", "0.5", "0.25", "0.1"}
    assert saved["fd_by_fraction"]["random"]["1"] == saved["fd_by_fraction"]["balanced"]["1"]  # one reference
    assert [r["switch_t"] for r in saved["c2f"]] == [1.0, 0.5, 0.0]
    for r in saved["c2f"]:
        assert {"switch_t", "fd", "paired_cos", "seconds", "speedup"} <= set(r) and math.isfinite(r["fd"])
    assert saved["c2f"][0]["speedup"] == 1.0 and saved["c2f"][0]["paired_cos"] == pytest.approx(1.0)
    assert saved["c2f_best_speedup"] >= 1.0
    for fig in ("fig_stability_grid.png", "fig_trajectory.png", "fig_fd_vs_fraction.png", "fig_c2f.png"):
        assert (tmp_path / fig).stat().st_size > 1000


def test_x_prediction_of_the_clean_image_is_the_true_velocity():
    """An oracle that returns the clean image x gives v = eps - x exactly (common/flow.py's target)."""
    g = torch.Generator().manual_seed(0)
    x, eps, t = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, generator=g)

    class Oracle(torch.nn.Module):
        C, img_size, null_label = 3, 8, 3

        def forward(self, x_t, t, y=None):
            return x

    v = lfm.XPrediction(Oracle())(lfm.interpolate(x, eps, t), t)
    assert torch.allclose(v, eps - x, atol=1e-4)


def test_same_seed_same_results_when_retrained(tmp_path, monkeypatch):
    """Reproducibility on CPU: two smoke runs from empty caches agree on everything but timings."""
    runs = []
    for name in ("a", "b"):
        monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / f"ckpt_{name}"))
        lfm.main(["--preset", "smoke", "--out", str(tmp_path / name)])
        saved = json.loads((tmp_path / name / "results.json").read_text())
        for key in ("seconds", "train_seconds", "c2f_best_speedup", "c2f_pair"):
            saved.pop(key)
        for r in saved["c2f"]:
            r.pop("seconds"), r.pop("speedup")
        runs.append(saved)
    assert runs[0] == runs[1]
