"""A tiny PNG line-plot writer (no matplotlib): curves on a log-y (or linear) axis, a legend by
colour, decade tick labels, written with zlib + struct.

Enough for training curves (NC1 against epoch, objective gap against iteration); not a
plotting library. Text uses a built-in 3×5 pixel font (lower-case letters, digits, ``.-+=_()/:%``),
drawn at ``scale`` pixels per font pixel.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Mapping, Sequence

import numpy as np

# 3×5 glyphs, one string of five 3-bit rows (top to bottom) per character
_FONT = {
    "a": "010101111101101", "b": "110101110101110", "c": "011100100100011", "d": "110101101101110",
    "e": "111100110100111", "f": "111100110100100", "g": "011100101101011", "h": "101101111101101",
    "i": "111010010010111", "j": "001001001101010", "k": "101101110101101", "l": "100100100100111",
    "m": "101111111101101", "n": "110101101101101", "o": "010101101101010", "p": "110101110100100",
    "q": "010101101110011", "r": "110101110101101", "s": "011100010001110", "t": "111010010010010",
    "u": "101101101101111", "v": "101101101101010", "w": "101101111111101", "x": "101101010101101",
    "y": "101101010010010", "z": "111001010100111", "0": "111101101101111", "1": "010110010010111",
    "2": "110001010100111", "3": "110001010001110", "4": "101101111001001", "5": "111100110001110",
    "6": "011100111101111", "7": "111001010010010", "8": "111101111101111", "9": "111101111001110",
    ".": "000000000000010", "-": "000000111000000", "+": "000010111010000", "=": "000111000111000",
    "_": "000000000000111", "(": "010100100100010", ")": "010001001001010", "/": "001001010100100",
    ":": "000010000010000", "%": "101001010100101", " ": "000000000000000",
}
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (23, 190, 207)]


def _text(canvas: np.ndarray, x: int, y: int, text: str, scale: int = 2, colour=(0, 0, 0)) -> int:
    """Draw ``text`` with its top-left corner at (x, y); returns the x after the last glyph."""
    for char in text.lower():
        glyph = _FONT.get(char, _FONT[" "])
        for row in range(5):
            for col in range(3):
                if glyph[3 * row + col] == "1":
                    canvas[y + scale * row: y + scale * (row + 1), x + scale * col: x + scale * (col + 1)] = colour
        x += 4 * scale
    return x


def _segment(canvas: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour, width: int = 2) -> None:
    """Rasterise a line segment by sampling it at sub-pixel steps (clipped to the canvas)."""
    steps = int(max(abs(x1 - x0), abs(y1 - y0)) * 2) + 1
    t = np.linspace(0.0, 1.0, steps + 1)
    xs = np.rint(x0 + (x1 - x0) * t).astype(int)
    ys = np.rint(y0 + (y1 - y0) * t).astype(int)
    height, wide = canvas.shape[:2]
    for dx in range(width):
        for dy in range(width):
            keep = (xs + dx >= 0) & (xs + dx < wide) & (ys + dy >= 0) & (ys + dy < height)
            canvas[ys[keep] + dy, xs[keep] + dx] = colour


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB array (8-bit truecolour, filter 0 on every row)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("image must be an (H, W, 3) uint8 array")
    height, width = image.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + chunk(b"IEND", b""))


def line_plot(series: Mapping[str, Sequence[float] | tuple], title: str = "", xlabel: str = "",
              log_y: bool = True, width: int = 720, height: int = 440, scale: int = 2) -> np.ndarray:
    """Rasterise curves into an (height, width, 3) uint8 image.

    Args:
        series: name -> ys (x = 0, 1, …) or name -> (xs, ys). Non-finite points, and points
            ≤ 0 on a log axis, are skipped (the curve breaks there).
        title, xlabel: text drawn above and below the plot area.
        log_y: log10 y axis with decade ticks (default), else linear with 5 ticks.
    """
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 14 * 4 * scale // 2 + 8 * scale, width - 12 * scale, 14 * scale, height - 16 * scale
    curves = []
    for name, data in series.items():
        xs, ys = (data if isinstance(data, tuple) else (range(len(data)), data))
        xs, ys = np.asarray(list(xs), float), np.asarray(list(ys), float)
        ok = np.isfinite(ys) & np.isfinite(xs) & ((ys > 0) if log_y else True)
        with np.errstate(divide="ignore", invalid="ignore"):
            ty = np.where(ok, np.log10(np.where(ok, ys, 1.0)) if log_y else ys, np.nan)
        curves.append((name, xs, ty))
    finite_x = np.concatenate([c[1] for c in curves]) if curves else np.zeros(0)
    finite_y = np.concatenate([c[2][np.isfinite(c[2])] for c in curves]) if curves else np.zeros(0)
    x_lo, x_hi = (float(finite_x.min()), float(finite_x.max())) if finite_x.size else (0.0, 1.0)
    y_lo, y_hi = (float(finite_y.min()), float(finite_y.max())) if finite_y.size else (0.0, 1.0)
    if log_y:
        y_lo, y_hi = math.floor(y_lo), math.ceil(y_hi)
    if y_hi <= y_lo:
        y_lo, y_hi = y_lo - 1.0, y_hi + 1.0
    if x_hi <= x_lo:
        x_hi = x_lo + 1.0

    def px(x):
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y):
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    # ticks and grid: decades on a log axis (at most ~8 labels), 5 steps on a linear one
    if log_y:
        stride = max(1, math.ceil((y_hi - y_lo) / 8))
        ticks = [(v, f"1e{int(v)}") for v in range(int(y_lo), int(y_hi) + 1, stride)]
    else:
        ticks = [(y_lo + i * (y_hi - y_lo) / 5, f"{y_lo + i * (y_hi - y_lo) / 5:.3g}") for i in range(6)]
    for value, label in ticks:
        row = int(round(py(value)))
        canvas[row, left:right] = (225, 225, 225)
        _text(canvas, 4 * scale, row - 2 * scale, label, scale)
    canvas[top:bottom + 1, left] = 0
    canvas[bottom, left:right + 1] = 0
    for x in (x_lo, x_hi):
        label = f"{x:.4g}"
        _text(canvas, int(px(x)) - (2 * len(label) * scale if x == x_hi else 0), bottom + 3 * scale, label, scale)
    _text(canvas, (left + right) // 2 - 2 * len(xlabel) * scale, bottom + 9 * scale, xlabel, scale)
    _text(canvas, left, 4 * scale, title, scale)

    for index, (name, xs, ty) in enumerate(curves):
        colour = PALETTE[index % len(PALETTE)]
        for j in range(len(xs) - 1):
            if np.isfinite(ty[j]) and np.isfinite(ty[j + 1]):
                _segment(canvas, px(xs[j]), py(ty[j]), px(xs[j + 1]), py(ty[j + 1]), colour)
        if len(xs) == 1 and np.isfinite(ty[0]):
            _segment(canvas, px(xs[0]), py(ty[0]), px(xs[0]), py(ty[0]), colour, width=4)
        # legend: a colour swatch and the name, top right, one line per curve
        y = top + 4 * scale + index * 8 * scale
        x = right - (len(name) * 4 + 8) * scale
        canvas[y: y + 5 * scale, x: x + 5 * scale] = colour
        _text(canvas, x + 7 * scale, y, name, scale, colour)
    return canvas


def write_line_plot(path, series, **kwargs) -> None:
    """:func:`line_plot` written to ``path`` as a PNG."""
    with open(path, "wb") as handle:
        handle.write(encode_png(line_plot(series, **kwargs)))
