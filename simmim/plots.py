"""Figures drawn with matplotlib: line plots of curves (signal propagation), the k-NN monitor's history and the
confusion matrix.

Figures are built on matplotlib's object API with the Agg canvas, so nothing touches pyplot's global state or
needs a display. `save_figure` writes a PNG; `figure_to_rgb` gives the pixels for loggers.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["COLORS", "line_plot", "knn_history_figure", "confusion_matrix_figure", "figure_to_rgb", "save_figure"]

# matplotlib's default cycle (tab10), in the order the series are drawn
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
DPI = 100


def _figure(width_px: int, height_px: int) -> Figure:
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str = "", x_label: str = "",
              y_label: str = "", log_y: bool = False, vlines: Sequence[float] = (),
              size: tuple[int, int] = (960, 540)) -> Figure:
    """{label: (xs, ys)} -> a figure of `size` (width, height) px: one line with point markers per series, in
    `COLORS` order, a legend, dashed gray vertical lines at `vlines` (e.g. stage boundaries). With `log_y`
    every y must be > 0."""
    if not series:
        raise ValueError("nothing to plot: pass at least one series")
    if log_y and any((np.asarray(ys, float) <= 0).any() for _, ys in series.values()):
        raise ValueError("a log-scale y axis needs positive values")
    figure = _figure(*size)
    axes = figure.add_subplot()
    for (label, (xs, ys)), color in zip(series.items(), COLORS * (len(series) // len(COLORS) + 1)):
        axes.plot(list(xs), list(ys), marker="o", markersize=4, linewidth=2, color=color, label=label)
    for x in vlines:
        axes.axvline(x, color="0.6", linestyle="--", linewidth=1)
    if log_y:
        axes.set_yscale("log")
    axes.set(title=title, xlabel=x_label, ylabel=y_label + (" (log scale)" if log_y else ""))
    axes.grid(True, color="0.9")
    axes.legend(loc="upper left")
    figure.tight_layout()
    return figure


def knn_history_figure(history: Sequence[Mapping]) -> Figure:
    """The losses (left axis) and k-NN top-1 (right axis) per epoch of `KNNMonitor.history` rows (epoch,
    train_loss, val_loss, knn_top1; None where not measured)."""
    def series(key):
        rows = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
        return [r[0] for r in rows], [r[1] for r in rows]

    figure = _figure(720, 420)
    loss_axis = figure.add_subplot()
    for key, label, color in (("train_loss", "train loss", "tab:blue"), ("val_loss", "val loss", "tab:cyan")):
        loss_axis.plot(*series(key), marker="o", markersize=3, color=color, label=label)
    loss_axis.set(xlabel="epoch", ylabel="SimMIM loss (L1, masked pixels)")
    knn_axis = loss_axis.twinx()
    knn_axis.plot(*series("knn_top1"), marker="s", markersize=4, color="tab:red", label="k-NN top-1 (val)")
    knn_axis.set_ylabel("k-NN top-1")
    lines = loss_axis.get_lines() + knn_axis.get_lines()
    loss_axis.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    figure.tight_layout()
    return figure


def confusion_matrix_figure(matrix: np.ndarray) -> Figure:
    """(N, N) counts (rows true class, columns predicted) -> a heatmap colored by the fraction of each true
    class (viridis), with the counts in the cells and the class indices on the axes up to 30 classes."""
    matrix = np.asarray(matrix)
    n = len(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = int(min(1200, max(400, 60 + 40 * n)))
    figure = _figure(side + 100, side)
    axes = figure.add_subplot()
    heat = axes.imshow(rates, cmap="viridis", vmin=0.0, vmax=1.0)
    figure.colorbar(heat, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    axes.set(xlabel="predicted class", ylabel="true class", title="confusion matrix")
    if n <= 30:
        axes.set_xticks(range(n))
        axes.set_yticks(range(n))
        for i in range(n):
            for j in range(n):  # viridis is bright at the top: dark text there
                axes.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8,
                          color="black" if rates[i, j] > 0.6 else "white")
    figure.tight_layout()
    return figure


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """The rendered figure as an RGB uint8 array (H, W, 3)."""
    canvas = figure.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write the figure as a PNG (its folder is created); ValueError naming the path when it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", dpi=DPI)
    except OSError as error:
        raise ValueError(f"cannot write {path} ({error}); pass a writable .png path") from error
    return path
