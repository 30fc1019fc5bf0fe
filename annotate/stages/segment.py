"""Optional stage 0, segment: box -> pixel mask with a segment-anything model (paper: GRIT boxes are
turned into masks before captioning). Runs before `object`, on regions whose data-plane mask is a
box or a GrabCut guess; a SAM mask replaces it only when it is plausible, else the old one stays."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from PIL import Image

from annotate.config import SegmentConfig
from annotate.data.masks import box_mask, encode_rle, xyxy
from annotate.data.records import ImageRecord

log = logging.getLogger(__name__)

# (image, [[x1, y1, x2, y2], ...], points) -> one (bool HxW mask, score) per box. `points`: None, or per box
# the same number of positive (x, y) points (the `parts` stage's points inside the object).
SegmentFn = Callable[..., Awaitable[list[tuple[np.ndarray, float]]]]


@dataclass
class SegmentCounts:
    regions_in: int = 0
    replaced: int = 0
    kept: int = 0  # SAM's mask was refused (too small) or SAM failed on the image


async def segment_records(segment: SegmentFn, items: list[tuple[ImageRecord, Image.Image | None]],
                          cfg: SegmentConfig) -> SegmentCounts:
    """Replace masks in place. `segment(image, boxes)` is awaited once per image, all images at once
    (the SAM deployment's `segment`, or an engine's wrapped in a coroutine)."""
    counts = SegmentCounts()

    async def one(record: ImageRecord, image: Image.Image | None) -> None:
        regions = [r for r in record.regions
                   if r.status == "pending" and r.mask is not None and r.mask_source in cfg.replace_sources]
        if image is None or not regions:
            return
        counts.regions_in += len(regions)
        boxes = [xyxy(r.bbox) for r in regions]
        try:
            results = await segment(image, boxes)
        except Exception as exc:  # the data-plane masks stay; one image never stops the batch
            log.warning("segment failed on %s: %s: %s", record.image_key, type(exc).__name__, exc)
            counts.kept += len(regions)
            return
        for region, (mask, _score) in zip(regions, results, strict=True):
            inside = box_mask(region.bbox, record.height, record.width)
            mask = mask & inside  # a box prompt's object lies in its box
            area = int(mask.sum())
            if area == 0 or area < cfg.min_mask_frac * inside.sum():
                counts.kept += 1
                continue
            region.mask, region.mask_source = encode_rle(mask), "sam"
            counts.replaced += 1

    await asyncio.gather(*(one(record, image) for record, image in items))
    return counts
