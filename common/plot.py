"""Figures, drawn from saved numbers and tensors, saved as PNG (matplotlib, no display needed)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def grid(images: torch.Tensor, nrow: int, pad: int = 1) -> torch.Tensor:
    """(B, C, S, S) in [-1, 1] -> one (H, W, 3) image in [0, 1] with nrow images per row."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    B, C, S, _ = x.shape
    ncol_rows = (B + nrow - 1) // nrow
    canvas = torch.ones(3, ncol_rows * (S + pad) + pad, nrow * (S + pad) + pad)
    for i in range(B):
        r, c = divmod(i, nrow)
        canvas[:, pad + r * (S + pad):pad + r * (S + pad) + S, pad + c * (S + pad):pad + c * (S + pad) + S] = x[i]
    return canvas.permute(1, 2, 0)


def save_image_panels(panels: list, path, nrow: int, title: str = "", scale: float = 0.12) -> None:
    """Side-by-side captioned image grids: panels = [(caption, images (B, C, S, S)), ...]."""
    grids = [(cap, grid(imgs, nrow)) for cap, imgs in panels]
    h, w = grids[0][1].shape[:2]
    fig, axes = plt.subplots(1, len(grids), figsize=(max(2.5, scale * w / 4) * len(grids), scale * h / 4 + 0.8),
                             squeeze=False)
    for ax, (cap, g) in zip(axes[0], grids):
        ax.imshow(g.numpy(), interpolation="nearest")
        ax.set_title(cap, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_curves(curves: dict, path, xlabel: str, ylabel: str, title: str = "", logx=False, logy=False) -> None:
    """Line plot of named curves: curves = {label: (xs, ys)}."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    xs_all = sorted({float(x) for xs, _ in curves.values() for x in xs})
    if logx and len(xs_all) <= 6:  # a few sizes on a log axis: label them, not the powers of ten between
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_fig(fig, path, rect=None, dpi: int = 120) -> None:
    """tight_layout (inside rect, figure fractions), save as PNG, close."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def save_overview(panels: list, path, width: float = 12.0, row_aspect: float = 4.2, title_h: float = 0.5) -> None:
    """A composite of existing PNG figures: panels = [(caption, png path), ...], in reading order.
    Panels fill rows of about `row_aspect` (width / height); in a row they share one height, so each
    keeps its own aspect ratio. Used for the README's overview picture."""
    images = [(cap, plt.imread(str(p))) for cap, p in panels]
    rows, row = [], []
    for item in images:  # greedy: close a row once it is wide enough
        row.append(item)
        if sum(im.shape[1] / im.shape[0] for _, im in row) >= row_aspect * 0.8:
            rows, row = rows + [row], []
    rows += [row] if row else []
    heights = [width / max(sum(im.shape[1] / im.shape[0] for _, im in r), row_aspect) for r in rows]
    total = sum(heights) + title_h * len(rows)
    fig = plt.figure(figsize=(width, total))
    top = total
    for r, h in zip(rows, heights):
        top -= h + title_h
        x = (width - sum(h * im.shape[1] / im.shape[0] for _, im in r)) / 2
        for cap, im in r:
            w = h * im.shape[1] / im.shape[0]
            ax = fig.add_axes((x / width, top / total, w / width, h / total))
            ax.imshow(im, interpolation="lanczos")
            ax.set_title(cap, fontsize=10)
            ax.axis("off")
            x += w
    fig.savefig(path, dpi=100)
    plt.close(fig)
