"""Decoding shard payloads into RGB images as they are displayed (EXIF orientation applied), and
fitting images to a longest side.

The size check happens on the header (PIL's lazy `Image.open`) so an oversized image is refused
without decoding its pixels; only the formats of `ImageConfig.formats` (what GRIT and img2dataset
produce) are tried at all. Every failure is an `ImageError` whose message can go into a record.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from annotate.config import ImageConfig


class ImageError(ValueError):
    """The payload is not a usable image; the message says why, for the record's `error`."""


def decode_image(data: bytes, cfg: ImageConfig) -> Image.Image:
    """Decode to an RGB PIL image, EXIF orientation applied; refuses over-size images unread."""
    return _decode_opened(_open_checked(data, cfg))


def _decode_opened(img: Image.Image) -> Image.Image:
    """`decode_image`'s pixels from an image `_open_checked` already opened and checked, so a caller that
    looked at the header first does not parse it twice."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img.load()
        except Exception as e:  # noqa: BLE001 - truncated / corrupt data: PIL raises OSError, SyntaxError...
            raise ImageError(f"{img.format or 'image'} data is truncated or corrupt ({type(e).__name__}: {e})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block: keep the stored orientation
        pass
    return to_rgb(img)


def decode_array(data: bytes, cfg: ImageConfig | None = None) -> np.ndarray:
    """`decode_image` as a uint8 RGB array (H, W, 3), for the trainer's loader: the same limits, read
    from the header before any pixel is decoded, and the same pixels. A JPEG is decoded by OpenCV
    (which applies its EXIF orientation as `exif_transpose` does, and took ~0.5 ms less than PIL per
    384 px JPEG: bench/train_loader.py); every other format, and a JPEG OpenCV refuses, by PIL."""
    cfg = cfg or ImageConfig()
    header = _open_checked(data, cfg)
    if header.format == "JPEG" and header.mode in ("RGB", "L"):  # CMYK and friends: PIL's conversion
        import cv2

        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is not None:
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return np.asarray(_decode_opened(header))


def _open_checked(data: bytes, cfg: ImageConfig) -> Image.Image:
    """The lazily opened image (header read, no pixels) once size, format and pixel limits pass."""
    if not data:
        raise ImageError("empty image payload")
    if len(data) > cfg.max_bytes:
        raise ImageError(f"image payload {len(data)} bytes > max_bytes {cfg.max_bytes}")
    with warnings.catch_warnings():
        # Our own max_pixels replaces PIL's global decompression-bomb guard; PIL's hard error (at
        # twice its limit) is still caught below so it reads the same.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            # Only the allowed formats' plugins look at the bytes: an EPS payload never reaches Ghostscript.
            img = Image.open(io.BytesIO(data), formats=list(cfg.formats))
        except UnidentifiedImageError:
            raise ImageError(f"not an image of an allowed format ({', '.join(cfg.formats)}; {len(data)} bytes, "
                             f"starts {data[:8]!r})") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"image refused from header: {e}") from None
        except Exception as e:  # noqa: BLE001 - any header parse failure is a bad payload
            raise ImageError(f"unreadable image header ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image header gives an empty size {w}x{h}")
    if w * h > cfg.max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels} (not decoded)")
    return img


def fitted_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """`size` (width, height) scaled down, aspect kept, so its longest side is at most `max_side`
    (None or 0: no limit); never below 1 pixel. For callers that draw at a size, not resize an image."""
    width, height = size
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_within(image: Image.Image, max_side: int | None,
               resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """`image` resized to `fitted_size` (the image itself when it already fits): the one way models,
    prompts and the gallery bound an image's size. Use NEAREST for masks, so they stay 0/255."""
    size = fitted_size(image.size, max_side)
    return image if size == image.size else image.resize(size, resample)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; alpha is composited on white, 16/32-bit is scaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img)), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK (PIL handles Adobe's inverted JPEG CMYK when it opens the file), L, 1, YCbCr, LAB, HSV.
    return img.convert("RGB")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    # PIL's convert("L") clips 16-bit values at 255 (a white image), so scale ourselves: 16-bit
    # integer data by its full range (x * 255 / 65535), anything wider or float by its own range.
    if a.dtype.kind in "ui" and a.size and a.min() >= 0 and a.max() <= 65535:
        return np.round(a.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if a.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.where(finite, (a - lo) * scale, 0.0)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
