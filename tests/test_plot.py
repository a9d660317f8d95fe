"""The PNG line-plot writer: a valid PNG (signature, IHDR, CRCs, pixel data) of the asked size."""

import math
import struct
import zlib

import numpy as np
import pytest

from ncfast.plot import PALETTE, encode_png, line_plot, write_line_plot


def _decode(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos: pos + 4])
        kind, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length: pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8).reshape(height, 1 + 3 * width)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(height, width, 3)


def test_encode_round_trip():
    image = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(_decode(encode_png(image)), image)


def test_line_plot_size_and_colours(tmp_path):
    x = np.arange(50)
    path = tmp_path / "curves.png"
    write_line_plot(path, {"ce": np.exp(-x / 5.0), "mse": (x, 1.0 / (1 + x)), "bad": [math.nan, -1.0, 0.5]},
                    title="nc1 vs epoch", xlabel="epoch", width=400, height=300)
    image = _decode(path.read_bytes())
    assert image.shape == (300, 400, 3)
    for colour in PALETTE[:3]:  # every curve (and its legend swatch) is drawn
        assert (image == colour).all(axis=2).sum() > 20
    assert (image == 255).all(axis=2).mean() > 0.5  # mostly background


def test_linear_axis_and_empty_series():
    image = line_plot({"acc": [0.1, 0.5, 0.9]}, log_y=False, width=200, height=150)
    assert image.shape == (150, 200, 3) and image.dtype == np.uint8
    assert line_plot({}, width=120, height=90).shape == (90, 120, 3)


def test_encode_rejects_non_rgb():
    with pytest.raises(ValueError, match="image"):
        encode_png(np.zeros((4, 4), np.uint8))
