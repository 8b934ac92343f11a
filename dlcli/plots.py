"""Pictures: the few plotting helpers every task's views share, and `training-curves`.

Matplotlib is imported on first use with the non-interactive Agg backend, so views work
on servers with no display; every figure is written atomically as a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dlcli.contract import Context, View
from dlcli.errors import UsageError
from dlcli.runs.files import atomic_write


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    plt = pyplot()
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return Path(path)


def image_grid(
    images: Sequence[np.ndarray],
    path: Path,
    titles: Sequence[str] | None = None,
    cols: int = 8,
    title_colors: Sequence[str] | None = None,
    suptitle: str | None = None,
    cmap: str | None = None,
    tile_inches: float = 1.3,
) -> Path:
    """A grid of images (float in [0, 1] or uint8), one optional caption each."""
    plt = pyplot()
    n = max(len(images), 1)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    lines = max((str(t).count("\n") + 1 for t in titles), default=0) if titles else 0
    # constrained: the suptitle gets room of its own, also above a single row of small tiles
    fig, axes = plt.subplots(rows, cols, figsize=(cols * tile_inches, rows * (tile_inches + 0.1 + 0.13 * lines)),
                             squeeze=False, layout="constrained")
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(images):
            continue
        img = np.asarray(images[i])
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        ax.imshow(img, cmap=cmap or ("gray" if img.ndim == 2 else None), interpolation="nearest")
        if titles:
            color = title_colors[i] if title_colors else "black"
            ax.set_title(titles[i], fontsize=7, color=color)
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, path)


def confusion_plot(matrix: np.ndarray, labels: Sequence[str], path: Path, title: str) -> Path:
    plt = pyplot()
    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    limit = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                color="white" if value > limit else "black")
    return save_figure(fig, path)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def training_curves(ctx: Context) -> Path:
    """Loss and every metric per epoch, training beside validation, for any task's run."""
    rows = ctx.run.read_history()
    if not rows:
        raise UsageError(f"run {ctx.run.dir} has no history.csv to plot")
    names = [k for k in rows[0] if k not in ("epoch", "phase") and not k.startswith("val_")]
    names = [k for k in names if isinstance(rows[0][k], (int, float))]
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False, layout="constrained")
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
    epochs = list(range(1, len(rows) + 1)) if len(set(epochs)) < len(epochs) else epochs
    marker = "o" if len(rows) <= 30 else None
    for ax, name in zip(axes.flat, names):
        values = [r[name] for r in rows]
        has_val = f"val_{name}" in rows[0]
        ax.plot(epochs, values, marker=marker, label="train")
        if has_val:
            ax.plot(epochs, [r[f"val_{name}"] for r in rows], marker=marker, label="validation")
            ax.legend(fontsize=8)  # only where there are two lines to tell apart
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, also on short runs
        finite = [abs(v) for v in values if isinstance(v, (int, float)) and v == v and v != 0]
        if finite and max(finite) < 1e-2:  # a learning rate: 8.1e-04, not 0.000810 running into the next plot
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}"))
        phases = [r.get("phase") for r in rows]
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                ax.axvline(epochs[i] - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{ctx.run.task} / {ctx.run.name}")
    return save_figure(fig, ctx.view_path("training-curves"))


GENERIC_VIEWS = {
    "training-curves": View(training_curves, "loss and metrics per epoch of any task's run"),
}
