"""decode_image: modes, EXIF orientation, refusals, readable errors; decode_array (the trainer's: the same
limits and pixels, JPEGs through OpenCV); fit_within / fitted_size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

import shardkit as sk
from annotate.config import ImageConfig
from annotate.data.images import ImageError, decode_array, decode_image, fit_within, fitted_size

CFG = ImageConfig()


def _arr():
    a = sk.photo(40, 30)
    a[5:15, 5:20] = (255, 0, 0)
    return a


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P", "CMYK", "1"])
def test_modes_decode_to_rgb(mode):
    img = Image.fromarray(_arr()).convert(mode)
    data = sk.encode(img, "JPEG" if mode in ("RGB", "L", "CMYK") else "PNG")
    out = decode_image(data, CFG)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_cmyk_colours_survive():
    out = np.asarray(decode_image(sk.encode(Image.fromarray(_arr()).convert("CMYK"), "JPEG", quality=95), CFG))
    r, g, b = out[10, 12].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_transparency_is_composited_on_white():
    rgba = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    out = np.asarray(decode_image(sk.encode(Image.fromarray(rgba, "RGBA"), "PNG"), CFG))
    assert (out == 255).all()
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    assert (np.asarray(decode_image(sk.encode(p, "PNG", transparency=0), CFG)) == 255).all()


def test_16bit_png_is_scaled_not_clipped():
    a = np.array([[0, 257, 32896, 65535]] * 2, np.uint16)
    out = np.asarray(decode_image(sk.png16(a), CFG))[..., 0]
    assert out[0].tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_applied(orientation):
    displayed = np.zeros((30, 60, 3), np.uint8)
    displayed[0:10, 0:10] = (255, 0, 0)  # red at the displayed top-left
    out = np.asarray(decode_image(sk.jpeg_with_orientation(displayed, orientation), CFG))
    assert out.shape == (30, 60, 3)
    assert out[5, 5, 0] > 200 and out[25, 55, 0] < 60


def test_truncated_jpeg():
    data = sk.jpeg(sk.photo(64, 64))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], CFG)


@pytest.mark.parametrize("payload,msg", [(b"<html>nope</html>", "not an image"), (b"", "empty")])
def test_non_image(payload, msg):
    with pytest.raises(ImageError, match=msg):
        decode_image(payload, CFG)


def test_pixel_limit_refused_from_header_without_decoding(monkeypatch):
    def no_decode(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageError, match=r"64x48 = 3072 pixels > max_pixels 3000 \(not decoded\)"):
        decode_image(sk.jpeg(sk.photo(64, 48)), ImageConfig(max_pixels=3000))


def test_byte_limit():
    data = sk.jpeg()
    with pytest.raises(ImageError, match="max_bytes"):
        decode_image(data, ImageConfig(max_bytes=len(data) - 1))


@pytest.mark.parametrize("payload", [
    sk.jpeg(_arr()),
    sk.encode(Image.fromarray(_arr()).convert("L"), "JPEG"),
    sk.encode(Image.fromarray(_arr()).convert("CMYK"), "JPEG", quality=95),  # PIL's conversion
    sk.encode(Image.fromarray(np.dstack([_arr(), np.full((30, 40), 128, np.uint8)]), "RGBA"), "PNG"),
    sk.png16(np.array([[0, 257, 32896, 65535]] * 2, np.uint16)),
])
def test_decode_array_gives_decode_images_pixels(payload):
    """The trainer sees what the models were shown: same size, orientation, alpha on white, 16-bit
    scaled. OpenCV's and PIL's JPEG decoders may differ by rounding, never by more than a few levels."""
    ours, reference = decode_array(payload), np.asarray(decode_image(payload, CFG))
    assert ours.dtype == np.uint8 and ours.shape == reference.shape
    assert np.abs(ours.astype(int) - reference.astype(int)).mean() < 2


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_decode_array_applies_exif_orientation(orientation):
    displayed = np.zeros((30, 60, 3), np.uint8)
    displayed[0:10, 0:10] = (255, 0, 0)
    out = decode_array(sk.jpeg_with_orientation(displayed, orientation))
    assert out.shape == (30, 60, 3) and out[5, 5, 0] > 200 and out[25, 55, 0] < 60


def test_decode_array_keeps_the_limits(monkeypatch):
    """A bomb is refused from its header before OpenCV or PIL decodes a pixel; junk reads as junk."""
    import cv2

    def no_decode(*a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    monkeypatch.setattr(cv2, "imdecode", no_decode)
    with pytest.raises(ImageError, match=r"64x48 = 3072 pixels > max_pixels 3000 \(not decoded\)"):
        decode_array(sk.jpeg(sk.photo(64, 48)), ImageConfig(max_pixels=3000))
    with pytest.raises(ImageError, match="not an image"):
        decode_array(b"<html>nope</html>")
    with pytest.raises(ImageError, match="max_bytes"):
        decode_array(sk.jpeg(), ImageConfig(max_bytes=10))



@pytest.mark.parametrize("payload", [
    sk.encode(Image.fromarray(_arr()), "PNG"),  # not a JPEG: PIL decodes it
    sk.encode(Image.fromarray(_arr()).convert("CMYK"), "JPEG", quality=95),  # a JPEG OpenCV is not given
])
def test_decode_array_reads_a_pil_decoded_header_once(monkeypatch, payload):
    """The header `decode_array` opened and checked is the one it decodes, not parsed a second time."""
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    out = decode_array(payload)
    assert out.shape == (30, 40, 3) and len(opened) == 1
    with pytest.raises(ImageError, match="truncated or corrupt"):  # a truncated body is still refused
        decode_array(payload[: len(payload) // 2])

@pytest.mark.parametrize(("size", "max_side", "fitted"), [
    ((400, 200), 100, (100, 50)),  # landscape: the width becomes max_side, aspect kept
    ((200, 400), 100, (50, 100)),  # portrait
    ((90, 60), 100, (90, 60)),  # already fits: unchanged, never enlarged
    ((100, 100), 100, (100, 100)),  # exactly max_side
    ((1000, 1), 10, (10, 1)),  # never below one pixel
    ((300, 200), None, (300, 200)),  # no limit
    ((300, 200), 0, (300, 200)),
])
def test_fitted_size(size, max_side, fitted):
    assert fitted_size(size, max_side) == fitted


def test_fit_within_resizes_only_what_is_too_big():
    small = Image.new("RGB", (60, 40))
    assert fit_within(small, 100) is small
    big = Image.fromarray(_arr())  # 40 x 30
    fitted = fit_within(big, 20)
    assert fitted.size == (20, 15) and fitted.mode == "RGB"


def test_fit_within_nearest_keeps_a_mask_binary():
    mask = Image.fromarray(((np.indices((90, 120)).sum(0) % 7 == 0) * 255).astype(np.uint8), "L")
    fitted = fit_within(mask, 50, Image.Resampling.NEAREST)
    assert fitted.size == (50, 38)
    assert set(np.unique(np.asarray(fitted))) <= {0, 255}
    assert set(np.unique(np.asarray(fit_within(mask, 50)))) - {0, 255}  # the default (bicubic) blends
