"""The views of one region that prompts need: the tight crop I' and its mask M' (paper's notation),
and the full image with the region outlined and its mask tinted."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw

from annotate.config import CropConfig
from annotate.data.images import fit_within
from annotate.data.masks import box_bounds


@dataclass
class RegionViews:
    crop: Image.Image  # RGB
    crop_mask: Image.Image  # mode "L", 0/255
    crop_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in the full image, before any resize
    _image: Image.Image = field(repr=False)
    _mask: np.ndarray = field(repr=False)
    _bbox_xywh: list = field(repr=False)
    _cfg: CropConfig = field(repr=False)

    @cached_property
    def highlighted(self) -> Image.Image:
        """RGB full image, region outlined and mask tinted. Built on first use: only prompts that
        show the whole image need it, and building it was a third of the data plane's time."""
        return fit_within(highlight(self._image, self._mask, self._bbox_xywh, self._cfg), self._cfg.max_side,
                          Image.Resampling.BICUBIC)


def crop_box_for(mask: np.ndarray, bbox_xywh, width: int, height: int, cfg: CropConfig) -> tuple[int, int, int, int]:
    """Mask's tight box (the bbox when the mask is empty) + margin, grown to min_side, clipped."""
    ys, xs = np.nonzero(mask) if mask is not None and mask.any() else ((), ())
    if len(xs):
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    else:
        x0, y0, x1, y1 = box_bounds(bbox_xywh, height, width)
    mx, my = math.ceil((x1 - x0) * cfg.margin), math.ceil((y1 - y0) * cfg.margin)
    x0, y0, x1, y1 = x0 - mx, y0 - my, x1 + mx, y1 + my
    x0, x1 = _grow(x0, x1, cfg.min_side, width)
    y0, y1 = _grow(y0, y1, cfg.min_side, height)
    return x0, y0, x1, y1


def _grow(lo: int, hi: int, min_side: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) around its centre to min_side (or the whole axis), shifting it inside [0, limit)."""
    need = min(min_side, limit)
    if hi - lo < need:
        extra = need - (hi - lo)
        lo -= extra // 2
        hi += extra - extra // 2
    if lo < 0:
        hi, lo = hi - lo, 0
    if hi > limit:
        lo, hi = max(0, lo - (hi - limit)), limit
    return max(0, lo), min(limit, hi)


def region_views(image: Image.Image, mask: np.ndarray, bbox_xywh, cfg: CropConfig) -> RegionViews:
    """Crop, cropped mask and highlighted image; each fits in cfg.max_side."""
    image = image.convert("RGB")
    box = crop_box_for(mask, bbox_xywh, image.width, image.height, cfg)
    x0, y0, x1, y1 = box
    crop = image.crop(box)
    crop_mask = Image.fromarray((mask[y0:y1, x0:x1].astype(np.uint8) * 255), "L")
    return RegionViews(
        crop=fit_within(crop, cfg.max_side, Image.Resampling.BICUBIC),
        crop_mask=fit_within(crop_mask, cfg.max_side, Image.Resampling.NEAREST),  # stays 0/255
        crop_box=box,
        _image=image,
        _mask=mask,
        _bbox_xywh=bbox_xywh,
        _cfg=cfg,
    )


def highlight(image: Image.Image, mask: np.ndarray, bbox_xywh, cfg: CropConfig, alpha: float = 0.35) -> Image.Image:
    """Full image with the mask tinted in highlight_color and the box outlined."""
    arr = np.asarray(image.convert("RGB")).astype(np.float32)
    color = np.array(cfg.highlight_color, np.float32)
    if mask is not None and mask.any():
        arr[mask] = arr[mask] * (1 - alpha) + color * alpha
    out = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "RGB")
    x0, y0, x1, y1 = box_bounds(bbox_xywh, image.height, image.width)
    if x1 > x0 and y1 > y0:
        ImageDraw.Draw(out).rectangle([x0, y0, x1 - 1, y1 - 1], outline=tuple(cfg.highlight_color), width=cfg.highlight_width)
    return out
