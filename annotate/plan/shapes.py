"""The image sizes a stage's prompt shows per region: what InternVL's tiling counts depend on.

Why: tokens per image follow the crop's aspect ratio (dynamic tiling), so a plan must see the
user's boxes. Three sources, best first: the first N shards of the input (`--sample-shards`), the
records of a finished run (`--from-run`), or the throughput file's documented default distribution.
A region's crop is its box + `data.crops.margin`, grown to `min_side`, clipped, fitted in
`max_side` (data/crops.py); the run crops the mask's tight box, which for GRIT's SAM masks lies
inside the box, so the box is a close stand-in (no mask is decoded here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from annotate.config import CropConfig, DataConfig

CROP_IMAGES = ("crop", "crop_mask")  # prompt image names shown at the crop's size (stages/base.py image_part)
FULL_IMAGES = ("image", "highlighted")  # at the whole image's size


@dataclass(frozen=True)
class RegionShape:
    image: tuple[int, int]  # the full image as sent (fitted in crops.max_side)
    crop: tuple[int, int]  # the crop (and its mask) as sent
    weight: float = 1.0

    def size_of(self, image_name: str) -> tuple[int, int]:
        if image_name in CROP_IMAGES:
            return self.crop
        if image_name in FULL_IMAGES:
            return self.image
        raise ValueError(f"prompt image {image_name!r} is not one of {CROP_IMAGES + FULL_IMAGES}")


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


def region_shape(width: int, height: int, bbox_xywh, crops: CropConfig) -> RegionShape:
    from annotate.data.crops import crop_box_for
    from annotate.data.images import fitted_size

    x0, y0, x1, y1 = crop_box_for(None, bbox_xywh, width, height, crops)
    return RegionShape(fitted_size((width, height), crops.max_side),
                       fitted_size((max(1, x1 - x0), max(1, y1 - y0)), crops.max_side))


def shapes_from_shards(input_dir: str | Path, n: int, data: DataConfig) -> Shapes:
    """Pending regions (those the object stage would get) of the first n shards found in input_dir.
    Images are decoded for their displayed size, as prepare does; masks are not made."""
    from annotate.data.images import ImageError, decode_image
    from annotate.data.regions import regions_from_meta
    from annotate.data.shards import find_shards, iter_samples

    ids = sorted(int(p.stem) for p in Path(input_dir).iterdir() if p.stem.isdigit() and p.suffix in (".tar", ".parquet"))
    if not ids:
        raise FileNotFoundError(f"no NNNNN.tar / NNNNN.parquet shards in {input_dir}")
    out: list[RegionShape] = []
    shards = find_shards(input_dir, ids[:n], data.shard_format)
    for shard in shards:
        for sample in iter_samples(shard, data.images, None, data.limits, (data.regions.source,)):
            if sample.meta is None or sample.image_bytes is None or sample.copy_of:
                continue
            try:
                width, height = decode_image(sample.image_bytes, data.images).size
            except ImageError:
                continue
            for r in regions_from_meta(sample.meta, shard.name, sample.key, width, height, data.regions, data.limits):
                if r.status == "pending":
                    out.append(region_shape(width, height, r.bbox, data.crops))
    if not out:
        raise ValueError(f"the first {n} shard(s) of {input_dir} hold no usable region")
    return Shapes(out, f"{len(out):,} regions of {len(shards)} shard(s) of {input_dir} (--sample-shards)")


def shapes_from_run(output_dir: str | Path, crops: CropConfig) -> Shapes:
    """Every region of a run's dataset that reached the object stage (it spent tokens there)."""

    from annotate.data.store import OutputStore, read_columns

    out: list[RegionShape] = []
    for f in OutputStore(output_dir).dataset_files():
        for row in read_columns(f, ["width", "height", "regions"]):
            for r in row["regions"] or []:
                if ((r.get("provenance") or {}).get("object") or {}).get("prompt_tokens"):
                    out.append(region_shape(row["width"], row["height"], r["bbox"], crops))
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
        out.append(RegionShape(image, crop, math.exp(-z * z / 2)))
    return Shapes(out, f"the throughput file's default_shapes (ASSUMED: crop aspect log-normal, median {median}, "
                       f"sigma {sigma} in ln; crops {long_side} px long side; images {image[0]}x{image[1]}); "
                       "pass --sample-shards N --input DIR to use your boxes")
