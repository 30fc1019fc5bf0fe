"""The image sizes a stage's prompt shows per region: what InternVL's tiling counts depend on.

Why: tokens per image follow the crop's aspect ratio (dynamic tiling), so a plan must see the
user's boxes. Three sources, best first: the first N shards of the input (`--sample-shards`), the
records of a finished run (`--from-run`), or the throughput file's documented default distribution.
A region's crop is its box + `data.crops.margin`, grown to `min_side`, clipped, fitted in
`max_side` (data/crops.py). Both sampled shards (prepared as the run prepares them) and a run's
records give each region's mask, so the crop is around the mask's tight box, as the run crops;
the box stands in only where a region has no mask. A part stage's focal crops are not known before
the run: their size is a guess from the object crop (`RegionShape.focal_crop`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from annotate.config import CropConfig, DataConfig

CROP_IMAGES = ("crop", "crop_mask", "crop_outlined")  # prompt images at the crop's size (data/crops.py VIEW_NAMES)
FULL_IMAGES = ("image", "highlighted")  # at the whole image's size
SQUARE_IMAGES = ("crop_mask_square",)  # a square of the crop's long side, fitted in crops.mask_square_side
FOCAL_CROP = "focal_crop"  # not a prompt image: the part stages add one per part (data/crops.py `focal_crop`)
FOCAL_CROP_SCALE = 0.5  # a part's crop, per side, as a fraction of its object's crop (RegionShape.focal_crop)


@dataclass(frozen=True)
class RegionShape:
    image: tuple[int, int]  # the full image as sent (fitted in crops.max_side)
    crop: tuple[int, int]  # the crop (and its mask) as sent
    weight: float = 1.0
    square_side: int = 448  # crops.mask_square_side
    min_side: int = 16  # crops.min_side

    @property
    def focal_crop(self) -> tuple[int, int]:
        """A part's focal crop: the object crop at FOCAL_CROP_SCALE per side, at least `min_side` (as
        `focal_crop` grows it), never more than the crop. Why this guess: a kept part lies inside its object
        and is smaller (data/parts.py), and a part's own shape is unknown before the run, so its crop keeps
        the object crop's aspect ratio, which sets InternVL's tile count far more than the size does
        (Griffon-G's count ignores both)."""
        return tuple(min(side, max(self.min_side, round(side * FOCAL_CROP_SCALE))) for side in self.crop)

    def size_of(self, image_name: str) -> tuple[int, int]:
        if image_name in CROP_IMAGES:
            return self.crop
        if image_name in FULL_IMAGES:
            return self.image
        if image_name in SQUARE_IMAGES:
            side = min(max(self.crop), self.square_side)
            return side, side
        if image_name == FOCAL_CROP:
            return self.focal_crop
        raise ValueError(f"prompt image {image_name!r} is not one of {CROP_IMAGES + FULL_IMAGES + SQUARE_IMAGES}")


@dataclass
class Shapes:
    shapes: list[RegionShape]
    source: str

    @property
    def total_weight(self) -> float:
        return sum(s.weight for s in self.shapes)

    def mean(self, f) -> float:
        """Weighted mean of f(shape) over the regions."""
        return sum(s.weight * f(s) for s in self.shapes) / self.total_weight


def region_shape(width: int, height: int, bbox_xywh, crops: CropConfig, mask=None) -> RegionShape:
    """The sizes sent for one region: its crop around the mask's tight box (the box without a mask)."""
    from annotate.data.crops import crop_box_for
    from annotate.data.images import fitted_size

    x0, y0, x1, y1 = crop_box_for(mask, bbox_xywh, width, height, crops)
    return RegionShape(fitted_size((width, height), crops.max_side),
                       fitted_size((max(1, x1 - x0), max(1, y1 - y0)), crops.max_side), square_side=crops.mask_square_side,
                       min_side=crops.min_side)


def shapes_from_shards(input_dir: str | Path, n: int, data: DataConfig) -> Shapes:
    """Pending regions (those the object stage would get) of the first n shards found in input_dir,
    prepared as the run prepares them (data/prepare.py): the image's displayed size, and the crop
    around the region's mask's tight box when the data config makes a mask (as the run crops)."""
    from annotate.data.masks import decode_rle
    from annotate.data.prepare import prepare_shard
    from annotate.data.shards import find_shards

    ids = sorted(int(p.stem) for p in Path(input_dir).iterdir() if p.stem.isdigit() and p.suffix in (".tar", ".parquet"))
    if not ids:
        raise FileNotFoundError(f"no NNNNN.tar / NNNNN.parquet shards in {input_dir}")
    out: list[RegionShape] = []
    shards = find_shards(input_dir, ids[:n], data.shard_format)
    for shard in shards:
        for prepared in prepare_shard(shard, data):
            record = prepared.record
            for r in record.regions:
                if r.status == "pending":
                    mask = decode_rle(r.mask).astype(bool) if r.mask is not None else None
                    out.append(region_shape(record.width, record.height, r.bbox, data.crops, mask))
    if not out:
        raise ValueError(f"the first {n} shard(s) of {input_dir} hold no usable region")
    return Shapes(out, f"{len(out):,} regions of {len(shards)} shard(s) of {input_dir} (--sample-shards)")


def shapes_from_run(output_dir: str | Path, crops: CropConfig) -> Shapes:
    """Every region of a run's dataset that reached the object stage (it spent tokens there)."""

    from annotate.data.masks import decode_rle
    from annotate.data.store import OutputStore, read_columns

    out: list[RegionShape] = []
    for f in OutputStore(output_dir).dataset_files():
        for row in read_columns(f, ["width", "height", "regions"]):
            for r in row["regions"] or []:
                if ((r.get("provenance") or {}).get("object") or {}).get("prompt_tokens"):
                    mask = decode_rle(r["mask"]).astype(bool) if r.get("mask") else None
                    out.append(region_shape(row["width"], row["height"], r["bbox"], crops, mask))
    if not out:
        raise ValueError(f"no region of {output_dir} reached the object stage")
    return Shapes(out, f"{len(out):,} regions of the run {output_dir}")


def default_shapes(spec: dict, crops: CropConfig) -> Shapes:
    """The throughput file's `default_shapes`: crop aspect ratios (width/height) log-normal around
    `aspect_median` with `aspect_log_sigma`, on a grid of `steps` points over +-3 sigma; crops
    `crop_long_side` px on their long side; full images `image` px. Assumed, not measured."""
    sigma, median, steps = float(spec["aspect_log_sigma"]), float(spec["aspect_median"]), int(spec["steps"])
    long_side = min(int(spec["crop_long_side"]), crops.max_side)
    from annotate.data.images import fitted_size

    image = fitted_size(tuple(spec["image"]), crops.max_side)
    out = []
    for k in range(steps):
        z = -3 + 6 * k / (steps - 1)
        aspect = median * math.exp(sigma * z)
        crop = (long_side, max(1, round(long_side / aspect))) if aspect >= 1 else (max(1, round(long_side * aspect)), long_side)
        out.append(RegionShape(image, crop, math.exp(-z * z / 2), crops.mask_square_side, crops.min_side))
    return Shapes(out, f"the throughput file's default_shapes (ASSUMED: crop aspect log-normal, median {median}, "
                       f"sigma {sigma} in ln; crops {long_side} px long side; images {image[0]}x{image[1]}); "
                       "pass --sample-shards N --input DIR to use your boxes")
