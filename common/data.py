"""Data: the embedded procedural shapes dataset (the default, offline) and MNIST from IDX files.

Shapes: circle / square / triangle x red / green / blue = 9 classes (label = 3 * shape + colour),
random size and position, anti-aliased, on a black background; images in [-1, 1], (B, 3, S, S)
with S = 16 by default (8, 32 and 64 also work). Deterministic for a seed. The attributes (shape,
colour, centre, radius in pixels) come with the images for programmatic checks and rewards, and
`render_shapes` draws any attributes. `moving_shapes` animates them: videos of one or two shapes
moving at constant velocity and bouncing off the frame's edges; `visiting_shapes` adds a blinking
visitor whose colour must be remembered (forcing_kv.py); `video_stats`
measures where the objects are, their colour and size, back from the pixels; `compare_videos` and
`object_kept` are the quality checks built on it.
"""

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.config import REPO, UserError

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue")
HELD_OUT_OFFSET = 1_000_003  # the held-out split of shapes is the same generator at seed + this
VERSION = 2  # part of every checkpoint key: bump it whenever the data a seed produces change


@dataclass
class Dataset:
    images: torch.Tensor  # (B, C, S, S) in [-1, 1]
    labels: torch.Tensor  # (B,) int64
    class_names: list
    attrs: dict | None = None  # shapes only: shape, colour (B,) int; cx, cy, r (B,) pixels

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> int:
        return self.images.shape[-1]


def render_shapes(shape, colour, cx, cy, r, size: int) -> torch.Tensor:
    """Draw one shape per image. shape, colour: (B,) ints; cx, cy, r: (B,) float pixels.
    -> (B, 3, size, size) in [-1, 1]. Signed distances give one pixel of anti-aliasing."""
    B = shape.shape[0]
    coords = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    dx = coords[None, None, :] - cx.float()[:, None, None]  # (B, 1, S)
    dy = coords[None, :, None] - cy.float()[:, None, None]  # (B, S, 1)
    dx, dy = dx.expand(B, size, size), dy.expand(B, size, size)
    r = r.float()[:, None, None]
    circle = torch.sqrt(dx**2 + dy**2) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r  # side 1.7 r: about a circle's area
    R = 1.25 * r  # equilateral triangle, apex up, circumradius R, inradius R / 2
    edges = [(0.0, 1.0), (0.866, -0.5), (-0.866, -0.5)]  # outward normals (image y points down)
    triangle = torch.stack([nx * dx + ny * dy for nx, ny in edges]).amax(0) - R / 2
    sd = torch.where(shape[:, None, None] == 0, circle, torch.where(shape[:, None, None] == 1, square, triangle))
    alpha = (0.5 - sd).clamp(0, 1)[:, None]  # (B, 1, S, S)
    rgb = -torch.ones(B, 3)
    rgb[torch.arange(B), colour] = 1.0  # pure red, green or blue in [-1, 1]
    return -1 + alpha * (rgb[:, :, None, None] + 1)


def shapes(n: int, size: int = 16, seed: int = 0) -> Dataset:
    """n random shapes images, deterministic for (n, size, seed)."""
    if size < 8:
        raise UserError(f"shapes need an image size of at least 8 pixels, got {size}")
    g = torch.Generator().manual_seed(seed)
    shape = torch.randint(0, 3, (n,), generator=g)
    colour = torch.randint(0, 3, (n,), generator=g)
    r = size * (0.18 + 0.12 * torch.rand(n, generator=g))  # radius 18-30% of the image
    margin = 1.25 * r + 1.5  # the triangle apex is 1.25 r out, and its anti-aliasing bleeds 1 px further
    cx = margin + (size - 2 * margin) * torch.rand(n, generator=g)
    cy = margin + (size - 2 * margin) * torch.rand(n, generator=g)
    images = render_shapes(shape, colour, cx, cy, r, size)
    names = [f"{c} {s}" for s in SHAPES for c in COLOURS]
    attrs = dict(shape=shape, colour=colour, cx=cx, cy=cy, r=r)
    return Dataset(images, 3 * shape + colour, names, attrs)


def fold(x, lo, hi):
    """Reflect x into [lo, hi]: an object moving at constant velocity bouncing off two walls."""
    span = hi - lo
    y = torch.remainder(x - lo, 2 * span)
    return lo + span - (y - span).abs()


def moving_shapes(n: int, frames: int, size: int, g: torch.Generator):
    """n videos (n, frames, 3, size, size) in [-1, 1] and labels (n,) = 3 * shape + colour.
    One or two objects of one shape and colour per video (the identity a long rollout must keep),
    each with its own radius, start and constant velocity, bouncing off the frame's edges."""
    shape, colour = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    two = torch.rand(n, generator=g) < 0.5
    r = size * (0.13 + 0.08 * torch.rand(n, 2, generator=g))  # (n, 2) pixels
    lo, hi = 1.25 * r + 1, size - 1.25 * r - 1  # keep the triangle apex inside
    start = lo[..., None] + (hi - lo)[..., None] * torch.rand(n, 2, 2, generator=g)  # (n, obj, xy)
    angle = 2 * math.pi * torch.rand(n, 2, generator=g)
    speed = size * (0.03 + 0.05 * torch.rand(n, 2, generator=g))  # 0.5-1.3 px per frame at 16 px
    vel = speed[..., None] * torch.stack([angle.cos(), angle.sin()], -1)
    f = torch.arange(frames, dtype=torch.float32)[:, None, None, None]  # (T, 1, 1, 1)
    pos = fold(start + f * vel, lo[..., None], hi[..., None])  # (T, n, obj, xy)
    video = -torch.ones(frames, n, 3, size, size)
    for j in range(2):
        for t in range(frames):
            img = render_shapes(shape, colour, pos[t, :, j, 0], pos[t, :, j, 1], r[:, j], size)
            keep = (two | (j == 0))[:, None, None, None]
            video[t] = torch.where(keep, torch.maximum(video[t], img), video[t])
    return video.transpose(0, 1).contiguous(), 3 * shape + colour


def visiting_shapes(n: int, frames: int, size: int, g: torch.Generator):
    """Videos for the cache comparisons (forcing_kv.py): moving_shapes' one object, plus a smaller *visitor*
    of its shape in one of the other two colours, known from neither the label nor the first chunk. It
    appears at frame 3-5, then blinks out for 1-3 frames after every 3-6 visible ones, moving all the
    while: to redraw it after a blink, a model needs its colour from 2-4 frames back.
    -> videos (n, frames, 3, size, size), labels (n,), visible (n, frames) bool (the visitor's)."""
    shape, colour = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    guest = (colour + 1 + torch.randint(0, 2, (n,), generator=g)) % 3
    r = size * torch.stack([0.16 + 0.06 * torch.rand(n, generator=g), 0.12 + 0.03 * torch.rand(n, generator=g)], 1)
    lo, hi = 1.25 * r + 1, size - 1.25 * r - 1
    start = lo[..., None] + (hi - lo)[..., None] * torch.rand(n, 2, 2, generator=g)  # (n, obj, xy)
    angle, speed = 2 * math.pi * torch.rand(n, 2, generator=g), size * (0.03 + 0.05 * torch.rand(n, 2, generator=g))
    vel = speed[..., None] * torch.stack([angle.cos(), angle.sin()], -1)
    f = torch.arange(frames, dtype=torch.float32)[:, None, None, None]
    pos = fold(start + f * vel, lo[..., None], hi[..., None])  # (T, n, obj, xy)
    visible = torch.zeros(n, frames, dtype=torch.bool)
    for i in range(n):  # the visitor's schedule: enter, then (visible 3-6 frames, hidden 1-3) repeated
        t = int(torch.randint(3, 6, (1,), generator=g))
        while t < frames:
            on = int(torch.randint(3, 7, (1,), generator=g))
            visible[i, t:t + on] = True
            t += on + int(torch.randint(1, 4, (1,), generator=g))
    video = -torch.ones(frames, n, 3, size, size)
    for t in range(frames):
        main = render_shapes(shape, colour, pos[t, :, 0, 0], pos[t, :, 0, 1], r[:, 0], size)
        guest_img = render_shapes(shape, guest, pos[t, :, 1, 0], pos[t, :, 1, 1], r[:, 1], size)
        video[t] = torch.where(visible[:, t, None, None, None], torch.maximum(main, guest_img), main)
    return video.transpose(0, 1).contiguous(), 3 * shape + colour, visible


def visitor_colours(video, labels):
    """(B, T, 3, S, S) videos of `visiting_shapes` -> the visitor's colour per frame (B, T), -1 where it is
    not visible: the most frequent dominant channel among lit pixels other than the label's colour, when
    it covers at least S^2 / 64 pixels (4 at 16 px; a visitor covers about 13)."""
    lit, dom = video.amax(2) > 0, video.argmax(2)  # (B, T, S, S)
    counts = torch.stack([(lit & (dom == c)).sum((2, 3)) for c in range(3)], -1)  # (B, T, 3)
    counts[torch.arange(len(labels)), :, labels % 3] = -1  # the main object's colour is not the visitor's
    best, colour = counts.max(-1)
    return torch.where(best >= max(1, video.shape[-1] ** 2 // 64), colour, -1)


def visitor_returns(video, labels) -> torch.Tensor:
    """Per video (B,): the share of the visitor's returns (a visible frame after hidden ones, once it has
    appeared) that bring back the colour it had in its last visible frame; NaN for a video without one."""
    out = []
    for row in visitor_colours(video, labels).tolist():
        last, gap, kept, n = None, False, 0, 0
        for c in row:
            if c < 0:
                gap = last is not None
                continue
            if gap:
                kept, n = kept + (c == last), n + 1
            last, gap = c, False
        out.append(kept / n if n else float("nan"))
    return torch.tensor(out)


def video_stats(video):
    """Measured from the pixels of shapes videos (B, T, 3, S, S) in [-1, 1]: the objects' centroid
    (B, T, 2) in frame sides, the mean colour of their pixels (B, T, 3) in [0, 1], and their area
    (B, T) in frame areas. The background is black, so a lit pixel belongs to an object."""
    w = (video.amax(2) > 0).float()  # (B, T, S, S)
    coords = (torch.arange(video.shape[-1]) + 0.5) / video.shape[-1]
    area = w.sum((2, 3)).clamp(min=1)
    centroid = torch.stack([(w.sum(2) * coords).sum(2), (w.sum(3) * coords).sum(2)], -1) / area[..., None]
    colour = ((video + 1) / 2 * w[:, :, None]).sum((3, 4)) / area[..., None]
    return centroid, colour, w.mean((2, 3))


def psnr_per_video(video, ref) -> torch.Tensor:
    """(B,): PSNR in dB of videos (B, T, C, S, S) in [-1, 1] (peak-to-peak 2) against references."""
    return 10 * torch.log10(4 / (video - ref).pow(2).flatten(1).mean(1).clamp(min=1e-12))


def compare_videos(video, ref, chunk: int = 1) -> dict:
    """A video (B, T, 3, S, S) against a reference from the same noise: PSNR (dB, range [-1, 1]),
    trajectory error (centroid distance, frame sides), colour drift to frame 0, and discontinuity:
    the largest frame-to-frame change at a boundary between chunks of `chunk` frames over the mean."""
    (c, col, _), c_ref = video_stats(video), video_stats(ref)[0]
    step = (video[:, 1:] - video[:, :-1]).abs().flatten(2).mean(2)  # (B, T-1) frame-to-frame change
    boundary = step[:, chunk - 1::chunk]  # transitions from one chunk into the next
    return dict(psnr=psnr_per_video(video, ref).mean().item(),
                traj_err=(c - c_ref).norm(dim=-1).mean().item(), drift=(col - col[:, :1]).norm(dim=-1).mean().item(),
                discontinuity=(boundary.amax(1) / step.mean(1)).mean().item())


def object_kept(video, edge: int = 1) -> dict:
    """Does a generated shapes video (B, T, 3, S, S) keep its object? The share of frames whose dominant
    colour is frame 0's, and the relative change of the lit area from the first to the last `edge` frames."""
    _, col, area = video_stats(video)
    dominant = col.argmax(-1)  # (B, T)
    first, last = area[:, :edge].mean(), area[:, -edge:].mean()
    return dict(colour_kept=(dominant == dominant[:, :1]).float().mean().item(),
                area_drift=((last - first) / first).item())


# --- MNIST from the standard IDX files ---------------------------------------------------------

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (optionally .gz): unsigned bytes with a magic number and dimensions."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
            raise ValueError(f"bad magic number {raw[:4].hex()}")
        dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        body = raw[4 + 4 * ndim:]
        if len(body) != int(torch.tensor(dims).prod()):
            raise ValueError(f"expected {int(torch.tensor(dims).prod())} bytes of data, found {len(body)}")
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as e:
        raise UserError(f"{path}: not a valid IDX file ({e}); delete it and fetch MNIST again") from None
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for d in (folder, folder / "MNIST" / "raw"):  # the second is where torchvision downloads to
        for name in (stem + ".gz", stem):
            if (d / name).exists():
                return d / name
    return None


def mnist(folder, split: str = "train", size: int = 28, download: bool = False) -> Dataset:
    """MNIST digits as (B, 1, size, size) in [-1, 1]. Reads the IDX files from `folder`.

    If only the 10,000-image test files are there (as in this repository's test fixtures),
    they are split deterministically: the first 8,000 are 'train', the last 2,000 'test'.
    `download=True` fetches the files through torchvision first (the only network access)."""
    folder = Path(folder)
    if download:
        import torchvision

        for train in (True, False):
            torchvision.datasets.MNIST(folder, train=train, download=True)
    found = {k: [_find(folder, s) for s in v] for k, v in MNIST_FILES.items()}
    have = {k: all(found[k]) for k in found}
    if not any(have.values()):
        raise UserError(f"no MNIST IDX files (t10k-images-idx3-ubyte[.gz] ...) in {folder}; point --data-root at "
                        "a folder that holds them (python -c \"from common.data import mnist; "
                        "mnist('data/mnist', download=True)\" fetches them)")
    if have["train"]:  # the official split
        if not have[split]:
            raise UserError(f"the MNIST {split} files are missing from {folder}")
        images, labels = (read_idx(p) for p in found[split])
    else:  # only the test files: split them so that train and test never overlap
        images, labels = (read_idx(p) for p in found["test"])
        images, labels = (images[:8000], labels[:8000]) if split == "train" else (images[8000:], labels[8000:])
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"MNIST images ({images.shape[0]}) and labels ({labels.shape[0]}) disagree in {folder}")
    x = images.float()[:, None] / 127.5 - 1  # (B, 1, 28, 28)
    if size != 28:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return Dataset(x.clamp(-1, 1), labels.long(), [str(i) for i in range(10)])


def load(name: str, n: int, size: int, seed: int, split: str = "train", root=None) -> Dataset:
    """One entry point for the scripts' --dataset flag. Shapes' held-out split is an
    independent draw (seed + HELD_OUT_OFFSET); MNIST keeps its files' own split."""
    if name == "shapes":
        return shapes(n, size, seed if split == "train" else seed + HELD_OUT_OFFSET)
    if name == "mnist":
        ds = mnist(root or REPO / "data" / "mnist", split, size)
        k = min(n, ds.images.shape[0])
        return Dataset(ds.images[:k], ds.labels[:k], ds.class_names)
    raise UserError(f"unknown dataset {name!r}; use shapes or mnist")
