"""A pipeline output built without models: the train tests' `pipeline_out` fixture and the training bench.

OUT/data/part-00000.parquet in the pipeline's schema, from 3 real photos (skimage) with real RLE
masks. Per image: three "ok" regions with captions, plus one "rejected" region that training must
skip. `copies` repeats the 3 photos under new image keys and region ids, so the training bench gets
an epoch long enough to time without crossing epoch boundaries.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

SPECS = {
    "astronaut": ("an astronaut in a white suit posing in front of a flag", ["face", "flag", "suit"]),
    "coffee": ("a cup of coffee on a saucer with a spoon", ["cup", "saucer", "table"]),
    "chelsea": ("a tabby cat looking to the left", ["cat head", "cat body", "background"]),
}


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(x) for x in enc["size"]], "counts": enc["counts"].decode()}


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _photo(key: str, side: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A skimage photo fitted into side x side, and three masks (ellipse, corner box, bright pixels)."""
    from PIL import Image
    from skimage import data as skdata

    im = Image.fromarray(getattr(skdata, key)())
    im.thumbnail((side, side))
    img = np.asarray(im)
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    masks = [
        (xx - w * 0.3) ** 2 / (w * 0.2) ** 2 + (yy - h * 0.35) ** 2 / (h * 0.25) ** 2 <= 1,
        (xx > w * 0.6) & (yy < h * 0.5),
        img.mean(axis=2) > np.median(img.mean(axis=2)),
    ]
    return img, masks


def _fine(phrase: str, caption: str, i: int) -> str:
    return f"The {phrase} in the photo of {caption}, region number {i}."


def _negative(description: str, old: str, new: str):
    """A verified one-span edit, as the `negatives` stages store it."""
    from annotate.data.records import HardNegative, Verdict

    start = description.index(old)
    verdict = Verdict(holds=True, reason="scripted")
    return HardNegative(text=description[:start] + new + description[start + len(old):], edit_type="object",
                        start=start, end=start + len(old), replacement=new, contradiction=verdict, visual=verdict)


def write_pipeline_output(out: str | Path, side: int = 96, copies: int = 1, uneven: bool = False) -> Path:
    """Write OUT/data/part-00000.parquet; copy 0 uses the bare photo names as image keys.

    `uneven`: image number k keeps only its first 1 + k % 3 "ok" regions (1, 2, 3, 1, ...), as real
    pipeline output has, and its last kept region is a box-fallback mask (mask_source "box").
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from annotate.data.records import ImageRecord, RegionRecord, RleMask, arrow_schema, image_record_to_row
    from annotate.data.store import FINAL, OutputStore

    out = Path(out)
    target = OutputStore(out).output_path(FINAL, "part-00000")
    target.parent.mkdir(parents=True, exist_ok=True)
    photos = {}
    for name, (_caption, phrases) in SPECS.items():
        img, masks = _photo(name, side)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)])
        photos[name] = (img.shape, _jpeg(img), [_rle(m) for m in masks], boxes)
    rows = []
    for copy in range(copies):
        for j, (name, (caption, phrases)) in enumerate(SPECS.items()):
            (h, w, _), jpeg, rles, boxes = photos[name]
            key = name if copy == 0 else f"{name}_{copy}"
            keep = 1 + (copy * len(SPECS) + j) % 3 if uneven else len(phrases)
            regions = [
                RegionRecord(
                    region_id=f"{key}-{i}",
                    region_index=i,
                    phrase=phrase,
                    bbox=box,
                    mask=RleMask(**rle),
                    mask_source="box" if uneven and i == keep - 1 else "given",
                    object_caption=f"the {phrase}",
                    fine_caption=_fine(phrase, caption, i),
                    summary=f"the {phrase}",
                    negatives=[_negative(_fine(phrase, caption, i), "photo", "drawing")],
                    status="ok",
                )
                for i, (phrase, rle, box) in enumerate(zip(phrases[:keep], rles, boxes))
            ]
            regions.append(
                RegionRecord(region_id=f"{key}-9", region_index=9, phrase="nothing", bbox=[0, 0, 4, 4], status="rejected")
            )
            record = ImageRecord(
                image_key=key, shard="00000", width=w, height=h, caption=caption, image_bytes=jpeg, regions=regions
            )
            rows.append(image_record_to_row(record))
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema()), target)
    return out
