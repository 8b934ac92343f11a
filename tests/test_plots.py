"""The pictures: readable at the size they are written."""

from types import SimpleNamespace

import numpy as np
import pytest

from dlcli import plots
from dlcli.contract import Context


@pytest.fixture
def captured(monkeypatch):
    """The figures views would save, kept open for inspection (rendered, not written)."""
    figures = []

    def keep(fig, path, dpi=110):
        fig.canvas.draw()
        figures.append(fig)
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    yield figures
    for fig in figures:
        plots.pyplot().close(fig)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_training_curves_whole_epochs_readable_lr_and_legends_only_to_tell_lines_apart(captured, tmp_path):
    rows = [{"epoch": e, "loss": 1.0 / e, "val_loss": 1.2 / e, "learning_rate": 1e-3 * 0.9 ** (e - 1)} for e in (1, 2, 3)]
    run = SimpleNamespace(read_history=lambda: rows, task="mnist", name="r", views_path=lambda v: tmp_path / f"{v}.png")
    plots.training_curves(Context(cfg={}, run=run, reporter=None))
    fig = captured[0]
    loss, lr = fig.axes
    assert [t for t in loss.get_xticks() if 1 <= t <= 3] == [1, 2, 3]  # no 1.5, 2.5 on a 3-epoch run
    assert loss.get_legend() is not None and lr.get_legend() is None  # one line needs no "train" legend
    renderer = fig.canvas.get_renderer()
    labels = [t for t in lr.get_yticklabels() if t.get_text()]
    assert all(len(t.get_text()) <= 7 for t in labels)  # 9.0e-04, not 0.000900
    loss_box = loss.get_window_extent(renderer)
    assert not any(_overlap(t.get_window_extent(renderer), loss_box) for t in labels)  # not into the next plot


def test_mnist_error_captions_never_run_into_each_other(captured, tmp_path):
    from dlcli.tasks.mnist import error_caption

    titles = [error_caption(str(i % 10), str((i + 3) % 10), 0.999) for i in range(16)]
    plots.image_grid([np.zeros((28, 28))] * 16, tmp_path / "e.png", titles=titles, cols=8)
    fig = captured[0]
    renderer = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert len(boxes) == 16
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_linear_boundary_points_stand_out_from_the_background(captured, cli):
    from matplotlib.colors import to_rgba

    cli("train", "linear", "--epochs", "1", "--quiet")
    cli("visualize", "linear-boundary")  # the view imports save_figure when it draws: the captured one
    ax = captured[-1].axes[0]
    faces = {tuple(c.get_facecolor()[0]) for c in ax.collections if hasattr(c, "get_offsets") and len(c.get_offsets()) > 10}
    assert faces == {to_rgba("white"), to_rgba("black")}, faces  # not the background's own reds and blues


def test_a_grid_title_clears_a_single_row_of_small_tiles(captured, tmp_path):
    plots.image_grid([np.zeros((3, 3, 3))] * 4, tmp_path / "f.png", titles=list("0123"), cols=8, tile_inches=0.9,
                     suptitle="cnn / run: stem, 4 filters")  # cnn-filters of a narrow model
    fig = captured[0]
    renderer = fig.canvas.get_renderer()
    top = fig._suptitle.get_window_extent(renderer)
    assert not any(_overlap(top, ax.title.get_window_extent(renderer)) for ax in fig.axes if ax.get_title())
