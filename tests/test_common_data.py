import gzip
import math

import pytest
import torch

from common.config import UserError
from common.data import (
    compare_videos,
    load,
    mnist,
    moving_shapes,
    object_kept,
    read_idx,
    render_shapes,
    shapes,
    video_stats,
)


def test_shapes_deterministic_in_range_and_labelled():
    a, b = shapes(64, 16, seed=3), shapes(64, 16, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, shapes(64, 16, seed=4).images)
    assert a.images.shape == (64, 3, 16, 16) and a.images.min() >= -1 and a.images.max() <= 1
    assert torch.equal(a.labels, 3 * a.attrs["shape"] + a.attrs["colour"]) and a.n_classes == 9


def test_shape_attributes_match_the_pixels():
    d = shapes(200, 32, seed=0)
    cx, cy = d.attrs["cx"].long(), d.attrs["cy"].long()
    centre = d.images[torch.arange(200), :, cy, cx]  # (B, 3): the shape covers its centre
    assert torch.equal(centre.argmax(1), d.attrs["colour"])
    assert (centre.max(1).values > 0.9).all()
    border = torch.cat([d.images[..., 0, :], d.images[..., -1, :], d.images[..., :, 0], d.images[..., :, -1]], -1)
    assert (border == -1).all()  # shapes stay inside the frame


def test_shapes_differ_by_class():
    one = lambda s: render_shapes(torch.tensor([s]), torch.tensor([0]), torch.tensor([8.0]), torch.tensor([8.0]),
                                  torch.tensor([5.0]), 16)
    circle, square, triangle = one(0), one(1), one(2)
    area = lambda img: (img[0, 0] > 0).sum().item()
    assert area(circle) > area(square) > area(triangle) > 20  # pi r^2 > (1.7 r)^2 > 1.3 (1.25 r)^2
    assert not torch.equal(circle, square)


def test_held_out_split_is_a_different_draw():
    train, test = load("shapes", 32, 16, 0, "train"), load("shapes", 32, 16, 0, "test")
    assert not torch.equal(train.images, test.images)


def test_mnist_real_files(mnist_dir):
    train, test = mnist(mnist_dir, "train"), mnist(mnist_dir, "test")
    assert train.images.shape == (8000, 1, 28, 28) and test.images.shape == (2000, 1, 28, 28)
    assert train.labels[:5].tolist() == [7, 2, 1, 0, 4]  # the first MNIST test digits
    assert train.images.min() == -1 and train.images.max() == 1
    assert mnist(mnist_dir, "test", size=16).images.shape == (2000, 1, 16, 16)
    assert torch.bincount(train.labels).min() > 600  # all ten digits present


def test_mnist_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="no MNIST IDX files"):
        mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not a gzip file")
    header = b"\x00\x00\x08\x01" + b"\x00\x00\x00\x02"  # labels, 2 of them ... but only 1 byte follows
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + b"\x01"))
    with pytest.raises(UserError, match="not a valid IDX file"):
        mnist(tmp_path)
    with pytest.raises(UserError, match="expected 2 bytes"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")  # truncated body
    good = gzip.compress(b"\x00\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x01" * 64)
    (tmp_path / "bad.gz").write_bytes(good[:12] + bytes(b ^ 0xFF for b in good[12:-8]) + good[-8:])
    with pytest.raises(UserError, match="not a valid IDX file"):
        read_idx(tmp_path / "bad.gz")  # a valid gzip header over a broken deflate stream
    with pytest.raises(UserError, match="unknown dataset"):
        load("cifar", 1, 16, 0)


def test_moving_shapes_are_deterministic_and_stay_in_frame():
    a, ya = moving_shapes(6, 30, 16, torch.Generator().manual_seed(3))
    b, yb = moving_shapes(6, 30, 16, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(ya, yb)
    lit = a.amax(2) > 0
    assert lit.flatten(2).any(2).all()  # an object in every frame
    edge = lit[..., 0, :].any() or lit[..., -1, :].any() or lit[..., :, 0].any() or lit[..., :, -1].any()
    assert not edge  # bounces keep the shapes inside
    moved = (a[:, 1:] - a[:, :-1]).abs().flatten(2).amax(2) > 0
    assert moved.float().mean() > 0.9  # the objects really move from frame to frame


def test_video_stats_measures_a_rendered_shape():
    one = render_shapes(torch.tensor([0]), torch.tensor([1]), torch.tensor([10.0]), torch.tensor([6.0]),
                        torch.tensor([3.0]), 16)  # a green circle at x = 10, y = 6 px
    centroid, colour, area = video_stats(one[:, None])
    assert torch.allclose(centroid[0, 0], torch.tensor([10 / 16, 6 / 16]), atol=0.02)
    assert colour[0, 0].argmax() == 1 and abs(area.item() - math.pi * 9 / 256) < 0.02


def test_video_quality_checks():
    v, _ = moving_shapes(3, 9, 16, torch.Generator().manual_seed(0))
    same = compare_videos(v, v, chunk=3)
    assert same["psnr"] > 100 and same["traj_err"] == 0 and same["drift"] < 0.1
    shifted = compare_videos(torch.roll(v, 2, dims=-1), v, chunk=3)
    assert shifted["psnr"] < 30 and 0.1 < shifted["traj_err"] < 0.15  # 2 px of 16 (less where a shape wraps)
    kept = object_kept(v, edge=3)
    assert kept["colour_kept"] == 1 and abs(kept["area_drift"]) < 0.2
    recoloured = v.clone()
    recoloured[:, 5:] = recoloured[:, 5:].roll(1, dims=2)  # the colour channels rotate from frame 5 on
    assert object_kept(recoloured)["colour_kept"] == pytest.approx(5 / 9)
