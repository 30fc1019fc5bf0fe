"""`annotate show`: look at what a run made. This module reads regions back from the output store
and draws them; annotate/gallery.py makes the HTML gallery of them, and `--region ID --png FILE`
renders one region here.

Each region is drawn on its image: mask filled translucent, mask contour, box and region id, in the
colour of its status. Images that could not be decoded (stored as None) get a placeholder. Shards are
read a few rows at a time, so memory stays small whatever the shard size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from annotate.config import ImageConfig
from annotate.data.images import ImageError, decode_image, fit_within, fitted_size
from annotate.data.masks import decode_rle
from annotate.data.records import ImageRecord, RegionRecord
from annotate.data.store import FINAL, OutputStore, iter_stored_records

STATUSES = ("ok", "rejected", "failed", "pending")
STATUS_COLORS: dict[str, tuple[int, int, int]] = {
    "ok": (34, 170, 68),
    "rejected": (240, 140, 0),
    "failed": (220, 30, 40),
    "pending": (120, 120, 120),
}
MASK_ALPHA = 0.45
READ_BATCH_ROWS = 16


def display_status(region: RegionRecord) -> str:
    """The region's status as the views show it: one of STATUSES, anything else as pending."""
    return region.status if region.status in STATUSES else "pending"


class RegionNotFound(LookupError):
    """`--region` names no region of the output."""


# ------------------------------------------------------------------------------------ reading
def dataset_dir(out_dir: str | Path) -> Path:
    """OUT/data: the folder of the store's final shard files."""
    return OutputStore(Path(out_dir)).folder(FINAL)


def dataset_files(out_dir: str | Path, shards: Iterable[int] | None = None) -> list[Path]:
    """The store's dataset files in shard order; only those of `shards` when given."""
    files = OutputStore(Path(out_dir)).dataset_files()
    if shards is not None:
        wanted = set(shards)
        files = [p for p in files if p.stem.isdigit() and int(p.stem) in wanted]
    return files


def iter_records(path: Path) -> Iterator[ImageRecord]:
    """One shard file's records, a few rows at a time (drawn images are large, rows are not)."""
    return iter_stored_records(path, batch_rows=READ_BATCH_ROWS)


def load_image(record: ImageRecord, cfg: ImageConfig | None = None) -> tuple[Image.Image | None, str | None]:
    """The displayed (EXIF-rotated) RGB image, or None and why."""
    if record.image_bytes is None:
        return None, "image not stored (undecodable in the shard)"
    try:
        return decode_image(record.image_bytes, cfg or ImageConfig()), None
    except ImageError as e:
        return None, str(e)


# ------------------------------------------------------------------------------------ drawing
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _canvas_size(record: ImageRecord, region: RegionRecord | None) -> tuple[int, int]:
    if record.width > 0 and record.height > 0:
        return record.width, record.height
    if region is not None and region.mask is not None and min(region.mask.size) > 0:
        return region.mask.size[1], region.mask.size[0]
    return 320, 240


def placeholder(width: int, height: int, note: str = "image unavailable") -> Image.Image:
    """A hatched grey canvas of the image's size, for images that could not be decoded."""
    img = Image.new("RGB", (width, height), (225, 225, 225))
    draw = ImageDraw.Draw(img)
    step = max(12, min(width, height) // 12)
    for x in range(-height, width, step):
        draw.line([(x, 0), (x + height, height)], fill=(205, 205, 205), width=1)
    font = _font(max(10, min(width, height) // 14))
    box = draw.textbbox((0, 0), note, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    draw.rectangle([(width - tw) // 2 - 6, (height - th) // 2 - 6, (width + tw) // 2 + 6, (height + th) // 2 + 6],
                   fill=(245, 245, 245), outline=(150, 150, 150))
    draw.text(((width - tw) // 2 - box[0], (height - th) // 2 - box[1]), note, fill=(80, 80, 80), font=font)
    return img


def region_mask(region: RegionRecord, width: int, height: int) -> np.ndarray | None:
    """The region's mask as bool (height, width), resized (nearest) if stored at another size."""
    if region.mask is None or min(region.mask.size) <= 0:
        return None
    try:
        mask = decode_rle(region.mask)
    except Exception:  # noqa: BLE001 - a corrupt RLE in the data: draw the box only
        return None
    if mask.shape != (height, width):
        mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask


def draw_region(base: Image.Image, full_size: tuple[int, int], region: RegionRecord, mask: np.ndarray | None) -> Image.Image:
    """`region` drawn on `base`, which is the image resized from `full_size`: mask filled translucent,
    mask contour, box and region id. Geometry (bbox, mask) is in `full_size` pixels."""
    color = STATUS_COLORS[display_status(region)]
    w, h = base.size
    sx, sy = w / full_size[0], h / full_size[1]
    arr = np.asarray(base.convert("RGB"), dtype=np.float32).copy()
    thick = max(2, round(max(w, h) / 300))
    edge = tuple(int(v * 0.6) for v in color)  # the contour a shade darker than the fill, to stand out
    if mask is not None and mask.any():
        alpha = mask.astype(np.float32)
        if alpha.shape != (h, w):
            alpha = cv2.resize(alpha, (w, h), interpolation=cv2.INTER_AREA)
        alpha = (alpha * MASK_ALPHA)[..., None]
        arr = arr * (1 - alpha) + np.asarray(color, np.float32) * alpha
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        scaled = [np.round(c.astype(np.float64) * (sx, sy)).astype(np.int32) for c in contours]
        cv2.polylines(arr, scaled, isClosed=True, color=edge, thickness=thick, lineType=cv2.LINE_AA)
    else:
        arr = arr.astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    x, y, bw, bh = (float(v) for v in (region.bbox + [0, 0, 0, 0])[:4])
    label_xy = (2.0, 2.0)
    if all(math.isfinite(v) for v in (x, y, bw, bh)) and bw > 0 and bh > 0:
        x0, y0 = min(max(x * sx, 0), w - 1), min(max(y * sy, 0), h - 1)
        x1, y1 = min(max((x + bw) * sx, 0), w - 1), min(max((y + bh) * sy, 0), h - 1)
        if x1 > x0 and y1 > y0:
            draw.rectangle([x0, y0, x1, y1], outline=color, width=thick)
            label_xy = (x0, y0)
    font = _font(max(10, min(16, round(max(w, h) / 24))))
    tb = draw.textbbox((0, 0), region.region_id, font=font)
    tw, th = tb[2] - tb[0] + 6, tb[3] - tb[1] + 4
    lx = min(max(label_xy[0], 0), max(w - tw, 0))
    ly = label_xy[1] - th if label_xy[1] - th >= 0 else label_xy[1]
    ly = min(max(ly, 0), max(h - th, 0))
    draw.rectangle([lx, ly, lx + tw, ly + th], fill=color)
    draw.text((lx + 3 - tb[0], ly + 2 - tb[1]), region.region_id, fill=(255, 255, 255), font=font)
    return img


def backdrops(record: ImageRecord, region: RegionRecord | None, max_sides: Iterable[int | None]
              ) -> tuple[tuple[int, int], list[Image.Image], str | None]:
    """What regions of `record` are drawn on: its image (or a placeholder of its size when the image
    is missing, sized from `region`'s mask if the record has no size) fitted to each of `max_sides`
    (None: full size). Also returns the full size the regions' geometry is in and why the image is
    missing (None when it is not)."""
    image, note = load_image(record)
    if image is None:
        size = _canvas_size(record, region)
        return size, [placeholder(*fitted_size(size, side)) for side in max_sides], note
    return image.size, [fit_within(image, side, Image.Resampling.LANCZOS) for side in max_sides], None


def render_region(record: ImageRecord, region: RegionRecord, max_side: int | None = None) -> Image.Image:
    """One region drawn on its image (or on a placeholder when the image is missing), fitted to
    `max_side` (None: full size)."""
    size, (base,), _ = backdrops(record, region, [max_side])
    return draw_region(base, size, region, region_mask(region, *size))


def find_region(out_dir: str | Path, region_id: str) -> tuple[ImageRecord, RegionRecord]:
    """The record and region with this id; looks in the shard the id names first, then everywhere."""
    files = dataset_files(out_dir)
    named = OutputStore(Path(out_dir)).output_path(FINAL, region_id.split(":", 1)[0])
    files.sort(key=lambda p: p != named)
    for path in files:
        for record in iter_records(path):
            for region in record.regions:
                if region.region_id == region_id:
                    return record, region
    raise RegionNotFound(f"no region {region_id!r} in {dataset_dir(out_dir)} ({len(files)} shard file(s); "
                         "ids look like shard:image_key:index)")


def render_region_png(out_dir: str | Path, region_id: str, png: str | Path, max_side: int | None = None) -> Path:
    """`annotate show OUT --region ID --png FILE`: the region drawn at full size (or fitted to max_side)."""
    record, region = find_region(out_dir, region_id)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    render_region(record, region, max_side).save(png, format="PNG")
    return png
