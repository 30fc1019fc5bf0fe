"""The views of one region that prompts need: the tight crop I' and its mask M' (paper's notation),
the mask on a square canvas, the crop with the mask's outline drawn on it, and the full image with
the region outlined and its mask tinted.

Why the square mask and the outlined crop: a tiling model (InternVL) cuts an image into tiles by its
aspect ratio, not its size, so a 4:3 mask costs as many tokens as its crop (13 tiles). On a square
canvas of at most `crops.mask_square_side` px it is one tile; drawn on the crop it costs nothing more.
BENCHMARKS.md section 2 compares the three forms of the object prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np
from PIL import Image, ImageDraw

from annotate.config import CropConfig
from annotate.data.images import fit_within
from annotate.data.masks import box_bounds


# What a prompt's `images:` may name besides "image" (stages/base.py); plan/shapes.py sizes each.
VIEW_NAMES = ("highlighted", "crop", "crop_mask", "crop_mask_square", "crop_outlined")


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

    @cached_property
    def crop_mask_square(self) -> Image.Image:
        """The crop's mask centred on a black square (black is "not the object", as in the mask), fitted
        in `mask_square_side`: one tile for InternVL whatever the crop's shape."""
        return square_mask(self.crop_mask, self._cfg.mask_square_side)

    @cached_property
    def crop_outlined(self) -> Image.Image:
        """The crop with the mask's outline drawn in `highlight_color`: the region and its mask in one image."""
        return outline(self.crop, self.crop_mask, self._cfg)


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


def square_mask(mask: Image.Image, side: int) -> Image.Image:
    """`mask` (mode L) centred on a black square canvas of its long side, fitted in `side` (NEAREST: stays 0/255)."""
    long_side = max(mask.size)
    canvas = Image.new("L", (long_side, long_side), 0)
    canvas.paste(mask, ((long_side - mask.width) // 2, (long_side - mask.height) // 2))
    return fit_within(canvas, side, Image.Resampling.NEAREST)


def outline(crop: Image.Image, mask: Image.Image, cfg: CropConfig) -> Image.Image:
    """The crop with every contour of the mask (holes too) drawn `highlight_width` px wide, scaled with
    the crop so that it stays visible after the model's resize to its tiles."""
    arr = np.array(crop.convert("RGB"))
    contours, _ = cv2.findContours((np.asarray(mask) > 127).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    width = max(cfg.highlight_width, round(max(crop.size) / 200))
    cv2.drawContours(arr, contours, -1, tuple(int(c) for c in cfg.highlight_color), width)
    return Image.fromarray(arr, "RGB")


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


# The part's outline in a focal crop; the object's is drawn in `highlight_color` (red by default).
# A constant, not a crop setting: the part prompts name it ("outlined in cyan").
PART_COLOR = (0, 255, 255)


def focal_crop(image: Image.Image, object_mask: np.ndarray, part_mask: np.ndarray, part_bbox_xywh,
               cfg: CropConfig) -> Image.Image:
    """A crop around one part (its mask's tight box, `cfg.margin` of context, at least `cfg.min_side`),
    the object's mask outlined in `highlight_color` and the part's over it in `PART_COLOR`, fitted in
    `max_side`: what the part stages show the model for each part."""
    image = image.convert("RGB")
    x0, y0, x1, y1 = box = crop_box_for(part_mask, part_bbox_xywh, image.width, image.height, cfg)
    crop = image.crop(box)

    def cropped(mask: np.ndarray) -> Image.Image:
        return Image.fromarray(np.asarray(mask, bool)[y0:y1, x0:x1].astype(np.uint8) * 255, "L")

    drawn = outline(outline(crop, cropped(object_mask), cfg), cropped(part_mask),
                    cfg.model_copy(update={"highlight_color": PART_COLOR}))
    return fit_within(drawn, cfg.max_side, Image.Resampling.BICUBIC)
