"""`annotate show`: look at what a run made. This module reads regions back from the output store
and draws them; annotate/gallery.py makes the HTML gallery of them, and `--region ID --png FILE`
renders one region here.

Each region is drawn on its image: mask filled translucent, mask contour, box and region id, in the
colour of its status. The one-region PNG (and the gallery) also draws the region's parts (`draw_parts`): each
part's mask outline in a colour of its own (solid when kept, dashed when the mask checks rejected it),
its name and verdict as a label, and a legend band under the image. Images that could not be decoded
(stored as None) get a placeholder. Shards are read a few rows at a time, so memory stays small
whatever the shard size.
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
from annotate.data.records import ImageRecord, PartRecord, RegionRecord, RleMask
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
# Parts get colours of their own, far from the status colours and from their translucent fills.
PART_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 0, 230), (0, 200, 255), (255, 215, 0), (50, 90, 255), (255, 105, 180))
PART_LABEL_FILL = (25, 25, 25)  # labels are white on near-black, so a part's colour is only its outline
PART_DASH_PX = 6
PART_LEGEND_KEY = ("parts: solid = kept, dashed = rejected by the mask checks",
                   "[yes] / [no]: part_verify's verdict, [?]: not verified")


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
    return mask_at(region.mask, width, height)


def mask_at(rle: RleMask | None, width: int, height: int) -> np.ndarray | None:
    """A stored mask as bool (height, width), resized (nearest) if stored at another size; None when
    missing or corrupt (the drawing then falls back to the box)."""
    if rle is None or min(rle.size) <= 0:
        return None
    try:
        mask = decode_rle(rle)
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
    _label(draw, region.region_id, label_xy, (w, h), _font(max(10, min(16, round(max(w, h) / 24)))), color)
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


def render_region(record: ImageRecord, region: RegionRecord, max_side: int | None = None,
                  rejected_parts: bool = True) -> Image.Image:
    """One region drawn on its image (or on a placeholder when the image is missing), fitted to
    `max_side` (None: full size), with its parts inside it (the rejected ones only with `rejected_parts`)."""
    size, (base,), _ = backdrops(record, region, [max_side])
    drawn = draw_region(base, size, region, region_mask(region, *size))
    return draw_parts(drawn, size, region, rejected_parts)


# ------------------------------------------------------------------------------------ parts
def part_color(index: int) -> tuple[int, int, int]:
    """The colour of a region's `index`-th drawn part (outline, legend swatch)."""
    return PART_COLORS[index % len(PART_COLORS)]


def part_label(part: PartRecord) -> str:
    """What the image says next to a part: its name and verdict, or that the mask checks rejected it."""
    if not part.kept:
        return f"{part.name} (rejected)"
    return f"{part.name} [{'?' if part.verdict is None else 'yes' if part.verdict.holds else 'no'}]"


def _legend_entry(part: PartRecord) -> str:
    entry = f"{part.part_id.rsplit(':', 1)[-1]} {part_label(part)}, {part.visibility}"
    if part.mask_source:
        entry += f", mask {part.mask_source}"
    return entry + (f": {part.reject_reason}" if not part.kept and part.reject_reason else "")


def _dashed_outline(arr: np.ndarray, points: np.ndarray, color, thick: int, dash: float, closed: bool = True) -> None:
    """A polyline (closed unless told) drawn as dashes of `dash` pixels, measured along the line."""
    pts = (np.vstack([points, points[:1]]) if closed else points).astype(np.float64)
    drawing, left = True, dash
    for a, b in zip(pts[:-1], pts[1:]):
        length, done = float(np.hypot(*(b - a))), 0.0
        while done < length:
            step = min(left, length - done)
            if drawing:
                p0, p1 = a + (b - a) * done / length, a + (b - a) * (done + step) / length
                cv2.line(arr, tuple(int(v) for v in np.round(p0)), tuple(int(v) for v in np.round(p1)),
                         color, thick, cv2.LINE_AA)
            done, left = done + step, left - step
            if left <= 0:
                drawing, left = not drawing, dash


def _outlines(part: PartRecord, full_size: tuple[int, int], scale: tuple[float, float]) -> list[np.ndarray]:
    """The part's outline(s) in drawn pixels: its mask's contours, or its box when it has no mask
    (none when the box is not a box either)."""
    mask = mask_at(part.mask, *full_size)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        shapes = [c.reshape(-1, 2).astype(np.float64) for c in contours]
    else:
        x, y, w, h = part.bbox
        if not (all(math.isfinite(v) for v in part.bbox) and w > 0 and h > 0):
            return []
        shapes = [np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64)]
    return [np.round(s * scale).astype(np.int32) for s in shapes if len(s)]


def draw_parts(img: Image.Image, full_size: tuple[int, int], region: RegionRecord, rejected: bool = True) -> Image.Image:
    """`region`'s parts drawn on `img` (the region as `draw_region` drew it, resized from `full_size`):
    each part's outline in its colour (solid when kept, dashed when rejected; rejected ones left out
    unless `rejected`), a label with its name and verdict, and a legend band added under the image.
    `img` is returned unchanged when there is no part to draw."""
    parts = [p for p in region.parts or () if p.kept or rejected]
    if not parts:
        return img
    w, h = img.size
    scale = (w / full_size[0], h / full_size[1])
    thick = max(2, round(max(w, h) / 300))  # as the region's contour
    font = _font(max(9, min(14, round(max(w, h) / 32))))
    line_h = _text_height(font) + 6
    legend_rows = [h + 4 + line_h * row for row in range(len(PART_LEGEND_KEY) + len(parts))]
    canvas = np.full((legend_rows[-1] + line_h + 2, w, 3), 255, np.uint8)
    canvas[:h] = np.asarray(img.convert("RGB"), dtype=np.uint8)
    anchors = []
    for index, part in enumerate(parts):
        outlines = _outlines(part, full_size, scale)
        swatch = np.array([[4, 0], [28, 0]], np.int32) + [0, legend_rows[len(PART_LEGEND_KEY) + index] + line_h // 2 - 2]
        for line, closed, width in [*((o, True, thick) for o in outlines), (swatch, False, thick + 1)]:
            if part.kept:
                cv2.polylines(canvas, [line], isClosed=closed, color=part_color(index), thickness=width, lineType=cv2.LINE_AA)
            else:
                _dashed_outline(canvas, line, part_color(index), width, PART_DASH_PX * max(1.0, thick / 2), closed)
        corner = np.concatenate(outlines).min(axis=0) if outlines else None
        anchors.append(None if corner is None else (float(corner[0]), float(corner[1])))
    out = Image.fromarray(canvas)
    draw = ImageDraw.Draw(out)
    for part, anchor in zip(parts, anchors):
        if anchor is not None:  # a part with neither mask nor box is in the legend only
            _label(draw, part_label(part), anchor, (w, h), font, PART_LABEL_FILL)
    for y, text in zip(legend_rows, PART_LEGEND_KEY):
        draw.text((4, y), text, fill=(60, 60, 60), font=font)
    for y, part in zip(legend_rows[len(PART_LEGEND_KEY):], parts):
        draw.text((34, y), _legend_entry(part), fill=(30, 30, 30), font=font)
    return out


def _text_height(font: ImageFont.ImageFont) -> int:
    box = font.getbbox("Ag[]")
    return box[3] - box[1]


def _label(draw: ImageDraw.ImageDraw, text: str, xy: tuple[float, float], size: tuple[int, int],
           font: ImageFont.ImageFont, fill: tuple[int, int, int]) -> None:
    """White text on a `fill` box just above `xy` (below it when there is no room), kept in the image."""
    tb = draw.textbbox((0, 0), text, font=font)
    tw, th = tb[2] - tb[0] + 6, tb[3] - tb[1] + 4
    x = min(max(xy[0], 0), max(size[0] - tw, 0))
    y = xy[1] - th if xy[1] - th >= 0 else xy[1]
    y = min(max(y, 0), max(size[1] - th, 0))
    draw.rectangle([x, y, x + tw, y + th], fill=fill)
    draw.text((x + 3 - tb[0], y + 2 - tb[1]), text, fill=(255, 255, 255), font=font)


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


def render_region_png(out_dir: str | Path, region_id: str, png: str | Path, max_side: int | None = None,
                      rejected_parts: bool = True) -> Path:
    """`annotate show OUT --region ID --png FILE`: the region and its parts drawn at full size (or fitted
    to max_side); `--kept-parts-only` leaves the rejected parts out."""
    record, region = find_region(out_dir, region_id)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    render_region(record, region, max_side, rejected_parts).save(png, format="PNG")
    return png
