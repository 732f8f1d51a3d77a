"""16-bit and 12-bit images (--uint16) and HEIC/HEIF decoding."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest

from maskseg.config import parse_uint16
from maskseg.decode import decode_bytes, to_uint8
from maskseg.errors import UsageError

from .conftest import SAMPLES


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _ramp12(h: int = 40, w: int = 64) -> np.ndarray:
    return (np.arange(h * w, dtype=np.uint32).reshape(h, w) * 4095 // (h * w - 1)).astype(np.uint16)


def test_12_bit_gray_is_not_darkened_by_default():
    data = _png(_ramp12())
    default = decode_bytes(data, "g12.png")
    assert np.array_equal(default[:, :, 0], (_ramp12() >> 4).astype(np.uint8))
    assert default.max() == 255
    shifted = decode_bytes(data, "g12.png", uint16="shift")
    assert shifted.max() == 15  # what maskseg did before --uint16: 1/16 as bright
    stretched = decode_bytes(data, "g12.png", uint16="percentile")
    assert stretched.min() == 0 and stretched.max() == 255


def test_16_bit_colour_keeps_its_low_bits():
    photo = cv2.imread(str(SAMPLES / "chelsea.png"))[:60, :80]  # BGR uint8
    twelve = photo.astype(np.uint16) * 16 + 7  # the same picture as 12-bit data
    rgb = decode_bytes(_png(twelve), "c12.png")
    assert np.array_equal(rgb, photo[:, :, ::-1])  # Pillow alone would give values 0..15
    full = photo.astype(np.uint16) * 257
    assert np.array_equal(decode_bytes(_png(full), "c16.png"), photo[:, :, ::-1])


def test_to_uint8_modes():
    full = np.array([0, 256, 65535], np.uint16)
    assert np.array_equal(to_uint8(full, "range"), to_uint8(full, "shift"))
    assert to_uint8(np.array([0, 1023], np.uint16), "range").tolist() == [0, 255]  # 10-bit
    assert to_uint8(np.array([0, 200], np.uint16), "range").tolist() == [0, 200]  # fits in 8 bits
    assert parse_uint16("Percentile") == "percentile"
    with pytest.raises(UsageError):
        parse_uint16("top")


def test_heic_is_decoded_when_pillow_heif_is_installed():
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif is not installed (maskseg[formats])")
    from PIL import Image

    photo = Image.open(SAMPLES / "chelsea.png").convert("RGB")
    buf = io.BytesIO()
    try:
        pillow_heif.from_pillow(photo).save(buf, quality=95)
    except Exception as exc:  # a build of libheif without an encoder
        pytest.skip(f"pillow-heif cannot encode here: {exc}")
    from maskseg.video import looks_like_video

    assert not looks_like_video(buf.getvalue()[:16])  # an ISO media file, but an image: not sent to PyAV
    rgb = decode_bytes(buf.getvalue(), "cat.heic")
    assert rgb.shape == (photo.height, photo.width, 3)
    assert np.abs(rgb.astype(int) - np.asarray(photo).astype(int)).mean() < 6


def test_large_images_convert_by_strips_to_the_same_pixels(monkeypatch):
    from PIL import Image

    import maskseg.decode as decode

    rng = np.random.default_rng(0)
    for mode, fmt in (("RGB", "PNG"), ("L", "PNG"), ("P", "PNG"), ("CMYK", "TIFF")):
        img = Image.fromarray((rng.random((300, 200, 3)) * 255).astype(np.uint8)).convert(mode)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        want = np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        monkeypatch.setattr(decode, "STRIP_PIXELS", 1000)
        got = decode.decode_bytes(buf.getvalue(), f"x.{fmt.lower()}")
        monkeypatch.undo()
        assert np.array_equal(got, want)
