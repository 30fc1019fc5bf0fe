"""`annotate export --format coco OUT DEST`: the dataset as COCO instance annotations, parts linked to
their object the way PACO does (`obj_ann_id`), so COCO tools (pycocotools) read it as it is.

DEST is a folder: DEST/annotations.json, and with `images` DEST/images/FILE (the stored bytes, or the
displayed image as PNG where EXIF turns it: boxes and masks are of the displayed image). Two categories:
1 `object` (a GRIT phrase is open vocabulary: it is the annotation's `phrase`) and 2 `part` (the part's
name is its `name`). An image is listed when one of its regions is exported; region annotations carry
`region_id`, `phrase`, `fine_caption`, `summary`, `status`; part annotations `obj_ann_id`, `part_id`,
`name`, the captions and the verdict. Masks are RLE with `counts` as text; a region without a mask gets
its box as a polygon. Only kept parts with a mask are exported.

Only finished shards are read (the store's rule), one shard a few rows at a time; images and
annotations stream into two temporaries joined at the end, so memory never grows with the output.
A file name is made from the image's number and its key with every unsafe character replaced: a
stored key is never used as a path.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

from annotate.data.records import ImageRecord, PartRecord, RegionRecord
from annotate.data.store import NoDataset, OutputStore, iter_stored_records
from annotate.data.writer import atomic_file

FORMATS = ("coco",)
OBJECT_CATEGORY, PART_CATEGORY = 1, 2
CATEGORIES = [{"id": OBJECT_CATEGORY, "name": "object", "supercategory": "object"},
              {"id": PART_CATEGORY, "name": "part", "supercategory": "object"}]
ANNOTATIONS_FILE, IMAGES_DIR = "annotations.json", "images"
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
READ_BATCH_ROWS = 16
ORIENTATION_TAG = 0x0112  # EXIF


@dataclass
class ExportSummary:
    annotations: Path
    images: int = 0
    objects: int = 0
    parts: int = 0
    image_files: int = 0
    shards: list[str] = field(default_factory=list)
    skipped_shards: list[str] = field(default_factory=list)  # not finished: left out


def safe_name(text: str, limit: int = 80) -> str:
    """`text` as part of a file name (image keys and region ids hold any characters): each run of
    characters other than [A-Za-z0-9._-] one `_`, cut to `limit`, no leading dot (never a path, never
    hidden); empty when nothing is left. The one sanitiser of the export's and the gallery's file names."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:limit].lstrip(".")


def safe_file_name(image_id: int, image_key: str, extension: str) -> str:
    """`NNNNNNNN_KEY.EXT` with the key made `safe_name`: unique by the number."""
    return f"{image_id:08d}_{safe_name(image_key) or 'image'}.{extension}"


def image_file(data: bytes | None, write: bool = True) -> tuple[bytes | None, str]:
    """The bytes to write and their extension: the stored bytes as they are or, when EXIF turns the
    picture, the displayed image as PNG (boxes and masks are of the displayed image); `bin` and the bytes
    untouched when no allowed format reads them. `write=False`: the extension alone, no pixels decoded."""
    if not data:
        return data, "bin"
    try:
        with Image.open(io.BytesIO(data), formats=list(EXTENSIONS)) as img:
            if img.getexif().get(ORIENTATION_TAG, 1) == 1:
                return data, EXTENSIONS.get(img.format or "", "bin")
            if not write:
                return None, "png"
            buf = io.BytesIO()
            ImageOps.exif_transpose(img).save(buf, format="PNG")
            return buf.getvalue(), "png"
    except (UnidentifiedImageError, OSError, ValueError):
        return data, "bin"


def export_coco(out: str | Path, dest: str | Path, *, images: bool = False,
                statuses: tuple[str, ...] | None = ("ok",)) -> ExportSummary:
    """Write OUT's finished shards as DEST/annotations.json (and DEST/images/ with `images`); regions
    of `statuses` only (None: every status)."""
    files, skipped = OutputStore(Path(out)).finished_dataset()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(dest / ANNOTATIONS_FILE, shards=sorted(files), skipped_shards=skipped)
    with tempfile.TemporaryFile("w+", dir=dest) as image_rows, tempfile.TemporaryFile("w+", dir=dest) as ann_rows:
        for shard in summary.shards:
            for record in iter_stored_records(files[shard], READ_BATCH_ROWS):
                regions = [r for r in record.regions if statuses is None or r.status in statuses]
                if regions:
                    _add_image(summary, record, regions, image_rows, ann_rows, dest if images else None)
        with atomic_file(summary.annotations) as fh:
            fh.write(b'{"info": ' + json.dumps(_info(out, statuses)).encode() + b', "licenses": [], "categories": '
                     + json.dumps(CATEGORIES).encode())
            for name, rows in (("images", image_rows), ("annotations", ann_rows)):
                fh.write(f', "{name}": ['.encode())
                rows.seek(0)
                for i, line in enumerate(rows):
                    fh.write((("," if i else "") + "\n" + line.rstrip("\n")).encode())
                fh.write(b"]")
            fh.write(b"}\n")
    return summary


def _info(out: str | Path, statuses: tuple[str, ...] | None) -> dict:
    return {"description": f"LongGRIT regions and parts of {Path(out).name}",
            "statuses": list(statuses) if statuses is not None else "all",
            "categories": "object: the annotation's `phrase` names it; part: the annotation's `name`"}


def _add_image(summary: ExportSummary, record: ImageRecord, regions: list[RegionRecord],
               image_rows, ann_rows, dest: Path | None) -> None:
    summary.images += 1
    image_id = summary.images
    height, width = next((r.mask.size for r in regions if r.mask is not None), (record.height, record.width))
    data, extension = image_file(record.image_bytes, write=dest is not None)
    file_name = safe_file_name(image_id, record.image_key, extension)
    image_rows.write(json.dumps({"id": image_id, "file_name": file_name, "width": width, "height": height,
                                 "image_key": record.image_key, "shard": record.shard, "caption": record.caption}) + "\n")
    if dest is not None and data:
        with atomic_file(dest / IMAGES_DIR / file_name) as fh:
            fh.write(data)
        summary.image_files += 1
    for region in regions:
        summary.objects += 1
        obj_id = summary.objects + summary.parts
        ann_rows.write(json.dumps(_object_annotation(obj_id, image_id, region)) + "\n")
        for part in _exported_parts(region):
            summary.parts += 1
            ann_rows.write(json.dumps(_part_annotation(summary.objects + summary.parts, image_id, obj_id, part)) + "\n")


def _exported_parts(region: RegionRecord) -> Iterator[PartRecord]:
    return (p for p in region.parts or () if p.kept and p.mask is not None)


def _segmentation(mask, bbox: list[float]) -> tuple[dict | list, int]:
    if mask is not None:
        rle = {"size": list(mask.size), "counts": mask.counts}
        return rle, int(mask_utils.area({**rle, "counts": mask.counts.encode("ascii")}))
    x, y, w, h = bbox
    return [[x, y, x + w, y, x + w, y + h, x, y + h]], int(round(w * h))


def _object_annotation(ann_id: int, image_id: int, region: RegionRecord) -> dict:
    segmentation, area = _segmentation(region.mask, region.bbox)
    return {"id": ann_id, "image_id": image_id, "category_id": OBJECT_CATEGORY, "bbox": region.bbox,
            "area": area, "segmentation": segmentation, "iscrowd": 0,
            "region_id": region.region_id, "phrase": region.phrase, "fine_caption": region.fine_caption,
            "summary": region.summary, "status": region.status, "error": region.error,
            "mask_source": region.mask_source}


def _part_annotation(ann_id: int, image_id: int, obj_ann_id: int, part: PartRecord) -> dict:
    segmentation, area = _segmentation(part.mask, part.bbox)
    return {"id": ann_id, "image_id": image_id, "category_id": PART_CATEGORY, "bbox": part.bbox,
            "area": area, "segmentation": segmentation, "iscrowd": 0, "obj_ann_id": obj_ann_id,
            "part_id": part.part_id, "name": part.name, "visibility": part.visibility,
            "short_caption": part.short_caption, "long_caption": part.long_caption,
            "verdict": part.verdict.model_dump() if part.verdict else None,
            "containment": part.containment, "mask_source": part.mask_source,
            "parent_spans": [s.model_dump() for s in part.parent_spans] if part.parent_spans is not None else None}
