"""Sample pictures: image grids and 2-D scatter plots, written atomically as PNG.

Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend change.
"""

from __future__ import annotations

import math

import torch

from genkern._io import atomic_path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def grid_image(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (C, rows*(H+pad)+pad, nrow*(W+pad)+pad) tiled image."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / nrow))
    out = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[:, top : top + h, left : left + w] = images[i].detach().float().cpu().clamp(0, 1)
    return out


def image_grid(images: torch.Tensor, path, *, title: str = "", nrow: int | None = None) -> None:
    """Saves (N, C, H, W) images in [0, 1] as a grid (grey for C == 1)."""
    grid = grid_image(images, nrow)
    fig = _figure(6, 6 + (0.3 if title else 0))
    ax = fig.add_subplot(1, 1, 1)
    if grid.shape[0] == 1:
        ax.imshow(grid[0].numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    _save(fig, path)


def scatter(points: torch.Tensor, reference: torch.Tensor | None, path, *, title: str = "") -> None:
    """Saves 2-D samples over the reference points (e.g. the ring of Gaussians)."""
    fig = _figure(5, 5)
    ax = fig.add_subplot(1, 1, 1)
    if reference is not None:
        ref = reference.detach().float().cpu()
        ax.scatter(ref[:, 0], ref[:, 1], s=4, c="tab:gray", alpha=0.4, label="data")
    pts = points.detach().float().cpu()
    ax.scatter(pts[:, 0], pts[:, 1], s=4, c="tab:red", alpha=0.6, label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    _save(fig, path)


def side_by_side(panels: dict, path, *, title: str = "") -> None:
    """Saves one row of image grids, one panel per name ({name: (N, C, H, W) images})."""
    fig = _figure(4 * len(panels), 4.4)
    for i, (name, images) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        grid = grid_image(images)
        ax.imshow(grid[0].numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    _save(fig, path)
