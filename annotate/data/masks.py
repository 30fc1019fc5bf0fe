"""One binary mask per region: given (COCO RLE from the json), GrabCut seeded by the box, or the box.

GrabCut runs on the box's neighbourhood (box + `grabcut_context` margin) downscaled so its longest
side is <= `grabcut_max_side`, then the mask is scaled back: its cost grows ~quadratically with
size (0.2 s at 256x256, 1.2 s at 512x512 on one core). Masks are COCO RLE via pycocotools.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from annotate.config import MaskConfig
from annotate.data.records import RegionRecord, RleMask


class MaskError(ValueError):
    """No acceptable mask and `fallback` is "fail"."""


@dataclass
class MaskResult:
    mask: np.ndarray  # bool, H x W of the full image
    source: str  # what was actually used: given | grabcut | box
    note: str | None = None  # why a fallback happened


def make_mask(image_rgb: np.ndarray, region: RegionRecord, meta: dict, cfg: MaskConfig) -> tuple[np.ndarray, str]:
    """Bool HxW mask of the full image and the source actually used ("given"|"grabcut"|"box")."""
    r = make_mask_explained(image_rgb, region, meta, cfg)
    return r.mask, r.source


def make_mask_explained(image_rgb: np.ndarray, region: RegionRecord, meta: dict, cfg: MaskConfig) -> MaskResult:
    h, w = image_rgb.shape[:2]
    box = box_mask(region.bbox, h, w)
    if cfg.source == "box":
        return MaskResult(box, "box")
    try:
        if cfg.source == "given":
            mask = _given_mask(meta, region.region_index, cfg.given_field, h, w)
        else:
            mask = grabcut_mask(image_rgb, region.bbox, cfg)
        box_area = max(int(box.sum()), 1)
        if mask.sum() < cfg.min_mask_frac * box_area:
            raise MaskError(
                f"{cfg.source} mask covers {mask.sum() / box_area:.1%} of the box < min_mask_frac {cfg.min_mask_frac:.1%}"
            )
        return MaskResult(mask, cfg.source)
    except (MaskError, cv2.error, ValueError, TypeError, KeyError, IndexError) as e:
        note = str(e) if isinstance(e, MaskError) else f"{cfg.source} mask failed ({type(e).__name__}: {e})"
        if cfg.fallback == "fail":
            raise MaskError(note) from None
        return MaskResult(box, "box", note)


def xyxy(box_xywh) -> list[float]:
    """[x, y, w, h] -> [x0, y0, x1, y1] (SAM's box prompt)."""
    x, y, w, h = box_xywh
    return [x, y, x + w, y + h]


def box_bounds(bbox_xywh, h: int, w: int) -> tuple[int, int, int, int]:
    """Integer pixel bounds (x0, y0, x1, y1) covering the float box, clipped to the image."""
    x, y, bw, bh = bbox_xywh
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
    x1, y1 = min(w, math.ceil(x + bw)), min(h, math.ceil(y + bh))
    return x0, y0, max(x0, x1), max(y0, y1)


def box_mask(bbox_xywh, h: int, w: int) -> np.ndarray:
    x0, y0, x1, y1 = box_bounds(bbox_xywh, h, w)
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _given_mask(meta: dict, index: int, field: str, h: int, w: int) -> np.ndarray:
    masks = meta.get(field)
    if not isinstance(masks, (list, tuple)):
        raise MaskError(f"no given mask: field {field!r} is {'missing' if masks is None else type(masks).__name__}")
    if index >= len(masks) or not masks[index]:
        raise MaskError(f"no given mask for region {index} ({field!r} has {len(masks)} entries)")
    rle = masks[index]
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise MaskError(f"given mask {index} is not a COCO RLE with size and counts")
    size = rle["size"]
    # checked before decoding: a hostile size would allocate its full h x w (10**10 pixels) first
    if not isinstance(size, (list, tuple)) or len(size) != 2 or list(size) != [h, w] \
            or not isinstance(rle["counts"], (str, bytes, list)):
        shown = "x".join(str(v)[:12] for v in size) if isinstance(size, (list, tuple)) else type(size).__name__
        raise MaskError(f"given mask {index} is {shown} (h x w), image is {h}x{w}")
    mask = decode_rle(rle)
    if mask.shape != (h, w):
        raise MaskError(f"given mask {index} is {mask.shape[0]}x{mask.shape[1]} (h x w), image is {h}x{w}")
    return mask


def grabcut_mask(image_rgb: np.ndarray, bbox_xywh, cfg: MaskConfig, background: np.ndarray | None = None) -> np.ndarray:
    """cv2.grabCut seeded by the box on a downscaled neighbourhood; bool mask of the full image.

    `background` (bool, full image): pixels known not to be the object, e.g. outside the object's mask
    when a part is cut out of it (data/parts.py); they seed the background model and stay out."""
    h, w = image_rgb.shape[:2]
    bx0, by0, bx1, by1 = box_bounds(bbox_xywh, h, w)
    bw, bh = bx1 - bx0, by1 - by0
    if bw < 2 or bh < 2:
        raise MaskError(f"box {bw}x{bh} px is too small for GrabCut")
    mx, my = math.ceil(bw * cfg.grabcut_context), math.ceil(bh * cfg.grabcut_context)
    nx0, ny0, nx1, ny1 = max(0, bx0 - mx), max(0, by0 - my), min(w, bx1 + mx), min(h, by1 + my)
    patch = np.ascontiguousarray(image_rgb[ny0:ny1, nx0:nx1, :3])
    scale = min(1.0, cfg.grabcut_max_side / max(patch.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(patch.shape[1] * scale)), max(1, round(patch.shape[0] * scale)))
        small = cv2.resize(patch, size, interpolation=cv2.INTER_AREA)
    else:
        small = patch
    sh, sw = small.shape[:2]
    # Box in the small patch's pixels: everything outside it is certain background.
    sx0, sy0 = int((bx0 - nx0) * scale), int((by0 - ny0) * scale)
    sx1, sy1 = min(sw, math.ceil((bx1 - nx0) * scale)), min(sh, math.ceil((by1 - ny0) * scale))
    init = np.full((sh, sw), cv2.GC_BGD, np.uint8)
    init[sy0:sy1, sx0:sx1] = cv2.GC_PR_FGD
    if background is not None:
        background = np.asarray(background, bool)
        known = np.ascontiguousarray(background[ny0:ny1, nx0:nx1], np.uint8)
        if scale < 1.0:
            known = cv2.resize(known, (sw, sh), interpolation=cv2.INTER_NEAREST)
        init[known.astype(bool)] = cv2.GC_BGD
        if not (init == cv2.GC_PR_FGD).any():
            raise MaskError("no pixel of the box is left for GrabCut's foreground")
    if not (init == cv2.GC_BGD).any():
        raise MaskError("box covers its whole neighbourhood: no background for GrabCut")
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's k-means init draws from OpenCV's RNG: same input, same mask
    bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
    cv2.grabCut(bgr, init, None, bgd, fgd, cfg.grabcut_iterations, cv2.GC_INIT_WITH_MASK)
    fg = ((init == cv2.GC_FGD) | (init == cv2.GC_PR_FGD)).astype(np.uint8)
    if scale < 1.0:
        fg = cv2.resize(fg * 255, (patch.shape[1], patch.shape[0]), interpolation=cv2.INTER_LINEAR) >= 128
    out = np.zeros((h, w), bool)
    out[ny0:ny1, nx0:nx1] = fg.astype(bool)
    out &= box_mask(bbox_xywh, h, w)  # scaling back can bleed a pixel past the box
    if background is not None:
        out &= ~background
    return out


def encode_rle(mask: np.ndarray) -> RleMask:
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = enc["counts"]
    return RleMask(size=[int(s) for s in enc["size"]], counts=counts.decode("ascii") if isinstance(counts, bytes) else counts)


def decode_rle(rle: RleMask | dict) -> np.ndarray:
    """Compressed (str/bytes counts) or uncompressed (list counts) COCO RLE -> bool HxW."""
    if isinstance(rle, RleMask):
        rle = rle.model_dump()
    size = [int(s) for s in rle["size"]]
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE: pycocotools converts it
        obj = mask_utils.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
    else:
        obj = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's `copy=` DeprecationWarning internally; not ours to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(obj).astype(bool)
