"""Line plots drawn with OpenCV (the project has no matplotlib): axes with ticks, optional log-scale y, one
colored polyline per series, a legend."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

# BGR, distinguishable on white: blue, orange, green, red, purple, brown, pink, gray, olive, cyan
COLORS = ((180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148), (75, 86, 140),
          (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23))
FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT = 0.45  # font scale of labels and ticks
MARGIN = dict(left=78, right=24, top=40, bottom=56)


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round values (1, 2 or 5 x 10^k apart) inside [low, high], about `count` of them."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9)
    return [round(i * step, 12) for i in range(first, math.floor(high / step + 1e-9) + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    """Ticks for a log axis over [low, high] (both > 0): 1-2-5 per decade over up to three decades, powers of
    ten beyond, round linear steps when the range spans less than a factor of ten."""
    if high / low < 10:
        return nice_ticks(low, high, 4)
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    mantissas = (1, 2, 5) if len(decades) <= 4 else (1,)
    return [m * 10.0 ** d for d in decades for m in mantissas if low <= m * 10.0 ** d <= high]


def _label(value: float) -> str:
    return f"{value:.4g}"


def _put(image: np.ndarray, text: str, x: int, y: int, align: str = "left", scale: float = TEXT,
         color: tuple[int, int, int] = (0, 0, 0)) -> None:
    """Text whose vertical middle is y; x is its left edge, center or right edge (`align`)."""
    (w, h), _ = cv2.getTextSize(text, FONT, scale, 1)
    x = {"left": x, "center": x - w // 2, "right": x - w}[align]
    cv2.putText(image, text, (x, y + h // 2), FONT, scale, color, 1, cv2.LINE_AA)


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str = "", x_label: str = "",
              y_label: str = "", log_y: bool = False, vlines: Sequence[float] = (), size: tuple[int, int] = (960, 540),
              ) -> np.ndarray:
    """{label: (xs, ys)} -> a BGR uint8 image (height, width, 3) of `size` (width, height): one polyline with
    point markers per series, in `COLORS` order, a legend in the top-left corner, dashed vertical lines at
    `vlines` (e.g. stage boundaries). With `log_y` every y must be > 0."""
    if not series:
        raise ValueError("nothing to plot: pass at least one series")
    xs = np.concatenate([np.asarray(x, float) for x, _ in series.values()])
    ys = np.concatenate([np.asarray(y, float) for _, y in series.values()])
    if log_y and (ys <= 0).any():
        raise ValueError("a log-scale y axis needs positive values")
    to_axis = np.log10 if log_y else (lambda v: np.asarray(v, float))
    width, height = size
    left, right, top, bottom = MARGIN["left"], width - MARGIN["right"], MARGIN["top"], height - MARGIN["bottom"]

    x_pad = max(xs.max() - xs.min(), 1.0) * 0.02
    x_low, x_high = xs.min() - x_pad, xs.max() + x_pad
    y_low, y_high = float(to_axis(ys.min())), float(to_axis(ys.max()))
    pad = max(y_high - y_low, 1e-3) * 0.06
    y_low, y_high = y_low - pad, y_high + pad

    def pixel(x, y) -> np.ndarray:
        px = left + (np.asarray(x, float) - x_low) / (x_high - x_low) * (right - left)
        py = bottom - (to_axis(y) - y_low) / (y_high - y_low) * (bottom - top)
        return np.stack([px, py], axis=-1).round().astype(np.int32)

    image = np.full((height, width, 3), 255, np.uint8)
    y_ticks = log_ticks(10 ** y_low, 10 ** y_high) if log_y else nice_ticks(y_low, y_high)
    for value in y_ticks:
        row = int(pixel(x_low, value)[1])
        cv2.line(image, (left, row), (right, row), (228, 228, 228), 1)
        _put(image, _label(value), left - 6, row, align="right")
    for value in nice_ticks(x_low, x_high, 10):
        col = int(pixel(value, 10 ** y_low if log_y else y_low)[0])
        cv2.line(image, (col, bottom), (col, bottom + 4), (0, 0, 0), 1)
        _put(image, _label(value), col, bottom + 14, align="center")
    for value in vlines:
        col = int(pixel(value, 1.0)[0])
        for row in range(top, bottom, 8):
            cv2.line(image, (col, row), (col, min(row + 4, bottom)), (150, 150, 150), 1)
    cv2.rectangle(image, (left, top), (right, bottom), (0, 0, 0), 1)

    for (label, (x, y)), color in zip(series.items(), COLORS * (len(series) // len(COLORS) + 1)):
        points = pixel(x, y)
        cv2.polylines(image, [points.reshape(-1, 1, 2)], False, color, 2, cv2.LINE_AA)
        for point in points:
            cv2.circle(image, tuple(int(v) for v in point), 3, color, -1, cv2.LINE_AA)
    _legend(image, list(series), left + 10, top + 10)

    _put(image, title, width // 2, top // 2, align="center", scale=0.55)
    _put(image, x_label, (left + right) // 2, height - 18, align="center")
    _vertical_label(image, y_label + (" (log scale)" if log_y else ""), 16, (top + bottom) // 2)
    return image


def _legend(image: np.ndarray, labels: list[str], x: int, y: int) -> None:
    """A white box with a colored line and the label per series, top-left corner at (x, y)."""
    row = 20
    text_width = max(cv2.getTextSize(label, FONT, TEXT, 1)[0][0] for label in labels)
    cv2.rectangle(image, (x, y), (x + 44 + text_width, y + 8 + row * len(labels)), (255, 255, 255), -1)
    cv2.rectangle(image, (x, y), (x + 44 + text_width, y + 8 + row * len(labels)), (160, 160, 160), 1)
    for i, (label, color) in enumerate(zip(labels, COLORS * (len(labels) // len(COLORS) + 1))):
        middle = y + 14 + i * row
        cv2.line(image, (x + 8, middle), (x + 32, middle), color, 2, cv2.LINE_AA)
        _put(image, label, x + 38, middle)


def _vertical_label(image: np.ndarray, text: str, x: int, y: int) -> None:
    """Text rotated 90 degrees counter-clockwise, centered on (x, y)."""
    if not text:
        return
    (w, h), baseline = cv2.getTextSize(text, FONT, TEXT, 1)
    strip = np.full((h + baseline + 4, w + 4, 3), 255, np.uint8)
    cv2.putText(strip, text, (2, h + 2), FONT, TEXT, (0, 0, 0), 1, cv2.LINE_AA)
    strip = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    top, left = max(0, y - strip.shape[0] // 2), max(0, x - strip.shape[1] // 2)
    strip = strip[:image.shape[0] - top, :image.shape[1] - left]
    image[top:top + strip.shape[0], left:left + strip.shape[1]] = strip
