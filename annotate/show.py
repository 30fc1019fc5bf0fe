"""`annotate show`: look at what a run made. A static HTML gallery of OUT/data, and one region as a PNG.

    OUT/gallery/index.html            one line per shard: counts per status, links to the shard pages
    OUT/gallery/shard-NNNNN.html      every region of the shard: a thumbnail (linked to the full view)
                                      next to its phrase, captions, verdict, status and error
    OUT/gallery/NNNNN/*.jpg           the drawn regions: `*.t.jpg` thumbnails, `*.jpg` full views

Each region is drawn on its image: mask filled translucent, mask contour, box and region id, in the
colour of its status. Images that could not be decoded (stored as None) get a placeholder.

The gallery opens from disk (file://) with no server and no network: no external assets, one inline
style and one inline script (status filters), both allowed by hash in the page's Content-Security-Policy.
Every text from the data is HTML-escaped (captions come from models); URLs become links only when
they are http(s). Shards are read one row group at a time and each page is written as it is read,
so memory stays at one row group whatever the shard size.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from annotate.config import ImageConfig
from annotate.data.images import ImageError, decode_image, fit_within, fitted_size
from annotate.data.masks import decode_rle
from annotate.data.records import ImageRecord, RegionRecord, row_to_image_record

STATUSES = ("ok", "rejected", "failed", "pending")
STATUS_COLORS: dict[str, tuple[int, int, int]] = {
    "ok": (34, 170, 68),
    "rejected": (240, 140, 0),
    "failed": (220, 30, 40),
    "pending": (120, 120, 120),
}
MASK_ALPHA = 0.45
THUMB_SIDE = 256
FULL_SIDE = 2048  # full views keep the image's resolution up to this longest side
EAGER_THUMBS = 24  # the first thumbnails of a page load at once, the rest lazily
READ_BATCH_ROWS = 16


class RegionNotFound(LookupError):
    """`--region` names no region of the output."""


@dataclass
class ShardPage:
    shard: str
    path: Path
    images: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))

    @property
    def regions(self) -> int:
        return sum(self.counts.values())


@dataclass
class Gallery:
    index: Path
    pages: list[ShardPage]

    @property
    def regions(self) -> int:
        return sum(p.regions for p in self.pages)


# ------------------------------------------------------------------------------------ reading
def shard_files(out_dir: str | Path, shards: Iterable[int] | None = None) -> list[Path]:
    """OUT/data/*.parquet in shard order (hidden temp files of a running writer are never listed)."""
    files = sorted(p for p in (Path(out_dir) / "data").glob("*.parquet") if not p.name.startswith("."))
    if shards is not None:
        wanted = set(shards)
        files = [p for p in files if p.stem.isdigit() and int(p.stem) in wanted]
    return files


def iter_records(path: Path, batch_rows: int = READ_BATCH_ROWS) -> Iterator[ImageRecord]:
    """One shard's records, a few rows at a time."""
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            yield row_to_image_record(row)


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
    color = STATUS_COLORS.get(region.status, STATUS_COLORS["pending"])
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


def render_region(record: ImageRecord, region: RegionRecord, max_side: int | None = None) -> Image.Image:
    """One region drawn on its image (or on a placeholder when the image is missing), fitted to
    `max_side` (None: full size)."""
    image, _ = load_image(record)
    if image is None:
        size = _canvas_size(record, region)
        base = placeholder(*fitted_size(size, max_side))
    else:
        size = image.size
        base = fit_within(image, max_side, Image.Resampling.LANCZOS)
    return draw_region(base, size, region, region_mask(region, *size))


def find_region(out_dir: str | Path, region_id: str) -> tuple[ImageRecord, RegionRecord]:
    """The record and region with this id; looks in the shard the id names first, then everywhere."""
    files = shard_files(out_dir)
    shard = region_id.split(":", 1)[0]
    files.sort(key=lambda p: p.stem != shard)
    for path in files:
        for record in iter_records(path):
            for region in record.regions:
                if region.region_id == region_id:
                    return record, region
    where = Path(out_dir) / "data"
    raise RegionNotFound(f"no region {region_id!r} in {where} ({len(files)} shard file(s); ids look like shard:image_key:index)")


def render_region_png(out_dir: str | Path, region_id: str, png: str | Path, max_side: int | None = None) -> Path:
    """`annotate show OUT --region ID --png FILE`: the region drawn at full size (or fitted to max_side)."""
    record, region = find_region(out_dir, region_id)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    render_region(record, region, max_side).save(png, format="PNG")
    return png


# --------------------------------------------------------------------------------------- HTML
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 16px;z-index:1}
header h1{font-size:18px;margin:0 0 4px}
#filters label{margin-right:14px;white-space:nowrap}
main{padding:12px 16px}
.region{display:flex;gap:14px;background:#fff;border:1px solid #ddd;border-left:6px solid #888;
 border-radius:4px;padding:10px;margin:0 0 10px}
.region[hidden]{display:none}
.region.ok{border-left-color:#22aa44}.region.rejected{border-left-color:#f08c00}
.region.failed{border-left-color:#dc1e28}.region.pending{border-left-color:#787878}
.thumb{flex:0 0 260px;text-align:center}.thumb img{max-width:256px;max-height:256px;background:#eee}
.meta{flex:1;min-width:0}.meta h2{font-size:14px;margin:0 0 6px}
dl{display:grid;grid-template-columns:8em 1fr;gap:3px 10px;margin:0}
dt{color:#666}dd{margin:0;white-space:pre-wrap;overflow-wrap:anywhere}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;color:#fff;font-size:12px;background:#787878}
.badge.ok{background:#22aa44}.badge.rejected{background:#f08c00}.badge.failed{background:#dc1e28}
.none{color:#aaa}.err{color:#b00}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}
"""

_SCRIPT = """
(function () {
  var boxes = Array.prototype.slice.call(document.querySelectorAll('#filters input[type=checkbox]'));
  var cards = Array.prototype.slice.call(document.querySelectorAll('.region'));
  var want = new URLSearchParams(location.search).get('status');
  if (want) boxes.forEach(function (b) { b.checked = want.split(',').indexOf(b.value) >= 0; });
  function apply() {
    var on = {}, shown = 0, counts = {};
    boxes.forEach(function (b) { on[b.value] = b.checked; counts[b.value] = 0; });
    cards.forEach(function (c) {
      var s = c.getAttribute('data-status');
      counts[s] = (counts[s] || 0) + 1;
      c.hidden = !on[s];
      if (!c.hidden) shown++;
    });
    boxes.forEach(function (b) {
      var n = document.querySelector('.count[data-status="' + b.value + '"]');
      if (n) n.textContent = counts[b.value];
    });
    document.getElementById('shown').textContent = shown + ' of ' + cards.length + ' regions shown';
  }
  boxes.forEach(function (b) { b.addEventListener('change', apply); });
  apply();
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# No network at all: images only from the gallery folder (file: for pages opened from disk), the one
# style and the one script by hash, so even an unescaped <script> from the data could not run.
_CSP = (f"default-src 'none'; img-src 'self' file: data:; style-src {_csp_hash(_STYLE)}; "
        f"script-src {_csp_hash(_SCRIPT)}; base-uri 'none'; form-action 'none'")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _head(title: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">\n'
            f'<meta name="referrer" content="no-referrer">\n'
            f'<title>{_e(title)}</title>\n<style>{_STYLE}</style></head>\n<body>\n')


def _text(value: str | None) -> str:
    return '<span class="none">none</span>' if value in (None, "") else _e(value)


def _link(url: str | None) -> str:
    if not url:
        return '<span class="none">none</span>'
    if re.match(r"^https?://", url, re.IGNORECASE):
        return f'<a href="{_e(url)}" rel="noopener noreferrer nofollow">{_e(url)}</a>'
    return _e(url)  # javascript:, data: and anything else stays text


def _file_stem(region_id: str) -> str:
    """A safe, unique file name for a region id (ids hold image keys: any characters)."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", region_id)[:80]
    return f"{readable}-{hashlib.sha1(region_id.encode()).hexdigest()[:10]}"


def _validation(region: RegionRecord) -> str:
    v = region.validation
    if v is None:
        return '<span class="none">none</span>'
    verdict = "consistent" if v.consistent else "inconsistent"
    return f"<b>{verdict}</b>" + (f": {_e(v.reason)}" if v.reason else "")


def _card(record: ImageRecord, region: RegionRecord, thumb: str, full: str, thumb_size: tuple[int, int],
          eager: bool, image_note: str | None) -> str:
    status = region.status if region.status in STATUSES else "pending"
    rid = _e(region.region_id)
    rows = [
        ("phrase", _text(region.phrase)),
        ("object", _text(region.object_caption)),
        ("validation", _validation(region)),
        ("context", _text(region.context_caption)),
        ("fine", _text(region.fine_caption)),
        ("status", f'<span class="badge {status}">{_e(region.status)}</span>'),
        ("error", f'<span class="err">{_e(region.error)}</span>' if region.error else _text(None)),
        ("mask", f"{_text(region.mask_source)}; box [{', '.join(f'{v:.0f}' for v in region.bbox)}]"),
        ("image", f"{_e(record.image_key)} ({record.width}\u00d7{record.height})"
                  + (f' <span class="err">{_e(image_note)}</span>' if image_note else "")),
        ("image caption", _text(record.caption)),
        ("url", _link(record.url)),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    loading = "eager" if eager else "lazy"
    return (f'<article class="region {status}" data-status="{status}" data-region="{rid}">\n'
            f'<div class="thumb"><a href="{_e(full)}"><img src="{_e(thumb)}" width="{thumb_size[0]}" '
            f'height="{thumb_size[1]}" alt="region {rid}" loading="{loading}"></a></div>\n'
            f'<div class="meta"><h2><code>{rid}</code></h2><dl>{dl}</dl></div>\n</article>\n')


def _filters() -> str:
    boxes = "".join(
        f'<label><input type="checkbox" value="{s}" checked> <span class="badge {s}">{s}</span> '
        f'(<span class="count" data-status="{s}">0</span>)</label>'
        for s in STATUSES
    )
    return f'<form id="filters">Show: {boxes} <span id="shown"></span></form>'


def _write_atomic(path: Path, chunks: Iterable[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for chunk in chunks:
            f.write(chunk)
    os.replace(tmp, path)


def _shard_page(data_file: Path, html_dir: Path, page: ShardPage, thumb_side: int, full_side: int | None,
                max_images: int | None) -> Iterator[str]:
    """Yields the shard page while drawing its regions into html_dir/SHARD/; fills in `page`'s counts."""
    asset_dir = html_dir / page.shard
    asset_dir.mkdir(parents=True, exist_ok=True)
    yield _head(f"LongGRIT shard {page.shard}")
    yield (f'<header><h1>Shard {_e(page.shard)} <small><a href="index.html">all shards</a></small></h1>'
           f"{_filters()}</header>\n<main>\n")
    n_cards = 0
    for record in iter_records(data_file):
        if max_images is not None and page.images >= max_images:
            break
        page.images += 1
        if not record.regions:
            continue
        image, note = load_image(record)
        if image is not None:
            size = image.size
            thumb_base = fit_within(image, thumb_side, Image.Resampling.LANCZOS)
            full_base = fit_within(image, full_side, Image.Resampling.LANCZOS)
        else:
            size = _canvas_size(record, record.regions[0])
            thumb_base = placeholder(*fitted_size(size, thumb_side))
            full_base = placeholder(*fitted_size(size, full_side))
        for region in record.regions:
            mask = region_mask(region, *size)
            stem = _file_stem(region.region_id)
            thumb_img = draw_region(thumb_base, size, region, mask)
            thumb_img.save(asset_dir / f"{stem}.t.jpg", format="JPEG", quality=85)
            draw_region(full_base, size, region, mask).save(asset_dir / f"{stem}.jpg", format="JPEG", quality=90)
            page.counts[region.status if region.status in STATUSES else "pending"] += 1
            yield _card(record, region, f"{page.shard}/{stem}.t.jpg", f"{page.shard}/{stem}.jpg", thumb_img.size,
                        eager=n_cards < EAGER_THUMBS, image_note=note)
            n_cards += 1
    if n_cards == 0:
        yield '<p class="none">no regions in this shard</p>\n'
    yield f"</main>\n<script>{_SCRIPT}</script>\n</body></html>\n"


def _index_page(pages: list[ShardPage], out_dir: Path) -> Iterator[str]:
    yield _head("LongGRIT gallery")
    yield f"<header><h1>LongGRIT gallery</h1><div>{_e(out_dir)}</div></header>\n<main>\n"
    yield "<table><tr><th>shard</th><th>images</th><th>regions</th>" + "".join(f"<th>{s}</th>" for s in STATUSES) + "</tr>\n"
    for p in pages:
        name = _e(p.path.name)
        cells = "".join(f'<td><a href="{name}?status={s}">{p.counts[s]}</a></td>' for s in STATUSES)
        yield f'<tr><td><a href="{name}">{_e(p.shard)}</a></td><td>{p.images}</td><td>{p.regions}</td>{cells}</tr>\n'
    total = {s: sum(p.counts[s] for p in pages) for s in STATUSES}
    yield (f"<tr><th>total</th><th>{sum(p.images for p in pages)}</th><th>{sum(total.values())}</th>"
           + "".join(f"<th>{total[s]}</th>" for s in STATUSES) + "</tr>\n</table>\n")
    if not pages:
        yield '<p class="none">no shard files in OUT/data</p>\n'
    yield "</main>\n</body></html>\n"


def write_gallery(out_dir: str | Path, html_dir: str | Path | None = None, shards: Iterable[int] | None = None,
                  max_images: int | None = None, thumb_side: int = THUMB_SIDE, full_side: int | None = FULL_SIDE) -> Gallery:
    """`annotate show OUT`: the gallery of OUT/data in `html_dir` (default OUT/gallery), one shard at a time.
    `max_images` caps the images per shard page (None: all)."""
    out_dir = Path(out_dir)
    if not (out_dir / "data").is_dir():
        raise FileNotFoundError(f"{out_dir / 'data'} does not exist: pass the --output folder of a run")
    files = shard_files(out_dir, shards)
    html_dir = Path(html_dir) if html_dir is not None else out_dir / "gallery"
    html_dir.mkdir(parents=True, exist_ok=True)
    pages = []
    for data_file in files:
        shard = re.sub(r"[^A-Za-z0-9_-]+", "_", data_file.stem)
        page = ShardPage(shard=shard, path=html_dir / f"shard-{shard}.html")
        _write_atomic(page.path, _shard_page(data_file, html_dir, page, thumb_side, full_side, max_images))
        pages.append(page)
    index = html_dir / "index.html"
    _write_atomic(index, _index_page(pages, out_dir))
    return Gallery(index=index, pages=pages)
