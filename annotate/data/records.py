"""The output record: one row per image with its regions. Defined once, versioned.

`ImageRecord`/`RegionRecord` (pydantic) are what the code builds; `features()` (Hugging Face
`datasets.Features`) is the file schema, and `arrow_schema()` is derived from it, so the Parquet files
carry the `huggingface` metadata that makes `datasets` decode `image` to PIL. Bump `SCHEMA_VERSION`
on any change of fields; readers check it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

import pyarrow as pa
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    import datasets

SCHEMA_VERSION = "1.1"  # 1.1: ImageRecord.error

Status = Literal["ok", "rejected", "failed", "pending"]
FINAL_STATUSES = ("ok", "rejected", "failed")


class RleMask(BaseModel):
    """COCO run-length encoding, as `pycocotools.mask.encode` makes it, with `counts` as text."""

    size: list[int]  # [height, width]
    counts: str


class Validation(BaseModel):
    consistent: bool
    reason: str


class StageProvenance(BaseModel):
    model: str | None = None
    prompt_version: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Provenance(BaseModel):
    object: StageProvenance = StageProvenance()
    validate_: StageProvenance = Field(StageProvenance(), alias="validate")
    context: StageProvenance = StageProvenance()
    merge: StageProvenance = StageProvenance()

    model_config = {"populate_by_name": True}

    @classmethod
    def stage_names(cls) -> tuple[str, ...]:
        """The stages that keep a provenance entry, as the file schema names them (`validate`, not `validate_`)."""
        return tuple(info.alias or name for name, info in cls.model_fields.items())

    def of(self, stage: str) -> StageProvenance:
        """The entry of stage `stage` (by its schema name)."""
        return getattr(self, next(name for name, info in type(self).model_fields.items() if (info.alias or name) == stage))


class RegionRecord(BaseModel):
    region_id: str
    region_index: int
    phrase: str
    bbox: list[float]  # [x, y, w, h] in pixels of the displayed (EXIF-rotated) image
    score: float | None = None  # GLIP score from GRIT
    mask: RleMask | None = None
    mask_source: str | None = None  # given | grabcut | box | sam | none
    object_caption: str | None = None
    validation: Validation | None = None
    context_caption: str | None = None
    fine_caption: str | None = None
    status: Status = "pending"
    error: str | None = None
    provenance: Provenance = Provenance()


class ImageRecord(BaseModel):
    image_key: str
    shard: str
    width: int
    height: int
    caption: str
    url: str | None = None
    image_bytes: bytes | None = None  # encoded as stored in the shard; None when undecodable
    # Why the input sample is unusable (json missing or invalid, regions source not a list, image
    # missing or undecodable, unsafe member name, exact copy); its regions, if any, are then failed.
    # None for a usable sample. Every input sample has a record, so nothing leaves without a trace.
    error: str | None = None
    regions: list[RegionRecord] = Field(default_factory=list)
    schema_version: str = SCHEMA_VERSION


@functools.cache
def features() -> "datasets.Features":
    """The file schema as Hugging Face `datasets.Features`.

    Built on first use: importing `datasets` costs ~3.6 CPU-s, paid by every Ray worker process
    that imports the data plane, and most of them (stage workers) never write a file.
    """
    import datasets

    stage_provenance = {
        "model": datasets.Value("string"),
        "prompt_version": datasets.Value("string"),
        "prompt_tokens": datasets.Value("int32"),
        "completion_tokens": datasets.Value("int32"),
    }
    region = {
        "region_id": datasets.Value("string"),
        "region_index": datasets.Value("int32"),
        "phrase": datasets.Value("string"),
        "bbox": datasets.List(datasets.Value("float32"), length=4),
        "score": datasets.Value("float32"),
        "mask": {"size": datasets.List(datasets.Value("int32"), length=2), "counts": datasets.Value("string")},
        "mask_source": datasets.Value("string"),
        "object_caption": datasets.Value("string"),
        "validation": {"consistent": datasets.Value("bool"), "reason": datasets.Value("string")},
        "context_caption": datasets.Value("string"),
        "fine_caption": datasets.Value("string"),
        "status": datasets.Value("string"),
        "error": datasets.Value("string"),
        "provenance": {stage: dict(stage_provenance) for stage in Provenance.stage_names()},
    }
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_key": datasets.Value("string"),
            "shard": datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "caption": datasets.Value("string"),
            "url": datasets.Value("string"),
            "error": datasets.Value("string"),
            "regions": datasets.List(region),
            "schema_version": datasets.Value("string"),
        }
    )


@functools.cache
def arrow_schema() -> pa.Schema:
    """The Arrow schema of every stored file, derived from `features()` (with its `huggingface` metadata)."""
    return features().arrow_schema


def image_record_to_row(record: ImageRecord) -> dict:
    """The dict that `pa.Table.from_pylist(rows, schema=arrow_schema())` takes."""
    row = record.model_dump(by_alias=True, exclude={"image_bytes"})
    row["image"] = {"bytes": record.image_bytes, "path": f"{record.image_key}.jpg"} if record.image_bytes else None
    return row


def row_to_image_record(row: dict) -> ImageRecord:
    """Inverse of `image_record_to_row` for rows read back with pyarrow (image as bytes)."""
    row = dict(row)
    image = row.pop("image", None)
    row["image_bytes"] = image["bytes"] if image else None
    return ImageRecord.model_validate(row)
