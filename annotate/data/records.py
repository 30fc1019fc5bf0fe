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

SCHEMA_VERSION = "1.2"  # 1.1: ImageRecord.error; 1.2: summary, sentences, phrases, negatives, quality (optional stages)
# Files of an older version still load: every field added since is optional and reads as None.

Status = Literal["ok", "rejected", "failed", "pending"]
FINAL_STATUSES = ("ok", "rejected", "failed")


class RleMask(BaseModel):
    """COCO run-length encoding, as `pycocotools.mask.encode` makes it, with `counts` as text."""

    size: list[int]  # [height, width]
    counts: str


class Validation(BaseModel):
    consistent: bool
    reason: str


class TextSpan(BaseModel):
    """A span of the region's `fine_caption`: `fine_caption[start:end] == text` (character offsets)."""

    start: int
    end: int
    text: str


class GroundedPhrase(TextSpan):
    """A noun phrase of the description and what it names: the region itself (`self`, its mask),
    another region of the same image (`region`, by `region_id`), or nothing known (`none`)."""

    target: Literal["self", "region", "none"]
    region_id: str | None = None


EDIT_TYPES = ("colour", "material", "count", "size", "state", "part", "relation", "object")
EditType = Literal["colour", "material", "count", "size", "state", "part", "relation", "object"]


class Verdict(BaseModel):
    """A model's yes/no judgement with its one-line reason."""

    holds: bool
    reason: str


class HardNegative(BaseModel):
    """The description with exactly one span edited: `text == fine_caption[:start] + replacement +
    fine_caption[end:]`. `contradiction` is a text model's verdict that it contradicts the
    description, `visual` the VLM's, looking at the region, that it is false of it; a negative is
    kept (in `negatives`) only when both hold."""

    text: str
    edit_type: EditType
    start: int
    end: int
    replacement: str
    contradiction: Verdict | None = None
    visual: Verdict | None = None


class Quality(BaseModel):
    """What a user filters on, computed in code at commit. None where the input is missing (no phrases).
    The run-level measures are side files: near-duplicate clusters, and a PixCLIP checkpoint's
    region-text score (`annotate score`), since a checkpoint comes after the data."""

    nouns: int | None = None  # head nouns of the description's phrases (`ground`)
    unsupported_noun_share: float | None = None  # share of them found in neither the phrase nor the object caption
    words: int = 0
    flags: list[str] = Field(default_factory=list)  # too_short, too_long, repetition, markup


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
    summarize: StageProvenance = StageProvenance()
    ground: StageProvenance = StageProvenance()
    negatives: StageProvenance = StageProvenance()
    negatives_text: StageProvenance = StageProvenance()
    negatives_visual: StageProvenance = StageProvenance()

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
    # Optional stages after merge (schema 1.2); None: the stage did not run on this region.
    summary: str | None = None  # at most 77 CLIP tokens
    summary_tokens: int | None = None  # its open_clip token count, start and end tokens included
    sentences: list[TextSpan] | None = None  # the description's sentences, in order
    phrases: list[GroundedPhrase] | None = None
    negative_candidates: list[HardNegative] | None = None  # proposed, one-span edits (checked in code)
    negative_text_verdicts: list[Verdict] | None = None  # one per candidate: contradicts the description?
    negatives: list[HardNegative] | None = None  # the verified ones, both verdicts recorded
    quality: Quality | None = None
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


def is_trainable(region: "RegionRecord | dict") -> bool:
    """The one definition of a region PixCLIP trains on, whose texts the text cache embeds and which
    `annotate score` scores: annotated (status "ok"), with a fine caption and a mask."""
    if isinstance(region, RegionRecord):
        region = region.model_dump()
    mask = region.get("mask")
    return region.get("status") == "ok" and bool(region.get("fine_caption")) and bool(mask and mask.get("counts"))


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
    span = {"start": datasets.Value("int32"), "end": datasets.Value("int32"), "text": datasets.Value("string")}
    verdict = {"holds": datasets.Value("bool"), "reason": datasets.Value("string")}
    negative = {"text": datasets.Value("string"), "edit_type": datasets.Value("string"), "start": datasets.Value("int32"),
                "end": datasets.Value("int32"), "replacement": datasets.Value("string"), "contradiction": verdict,
                "visual": verdict}
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
        "summary": datasets.Value("string"),
        "summary_tokens": datasets.Value("int32"),
        "sentences": datasets.List(span),
        "phrases": datasets.List({**span, "target": datasets.Value("string"), "region_id": datasets.Value("string")}),
        "negative_candidates": datasets.List(negative),
        "negative_text_verdicts": datasets.List(verdict),
        "negatives": datasets.List(negative),
        "quality": {
            "nouns": datasets.Value("int32"),
            "unsupported_noun_share": datasets.Value("float32"),
            "words": datasets.Value("int32"),
            "flags": datasets.List(datasets.Value("string")),
        },
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
