"""The output record: one row per image with its regions. Defined once, versioned.

`ImageRecord`/`RegionRecord` (pydantic) are the schema, kept here only: the file schema `features()`
(Hugging Face `datasets.Features`) is derived from them, `arrow_schema()` from that (so the Parquet
files carry the `huggingface` metadata that makes `datasets` decode `image` to PIL), and the dataset
card's field table from their descriptions. Bump `SCHEMA_VERSION` on any change of fields; readers
check it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

import pyarrow as pa
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    import datasets

SCHEMA_VERSION = "1.4"  # 1.1: ImageRecord.error; 1.2: summary, sentences, phrases, negatives, quality (optional
# stages); 1.3: each stage's lineage key and attempts in its provenance, and the region's parts; 1.4: the
# provenance of the part stages (parts, part_describe, part_verify)
# Files of an older version still load: every field added since is optional and reads as None.

Status = Literal["ok", "rejected", "failed", "pending"]
FINAL_STATUSES = ("ok", "rejected", "failed")


class RleMask(BaseModel):
    """COCO run-length encoding, as `pycocotools.mask.encode` makes it, with `counts` as text."""

    size: list[int] = Field(min_length=2, max_length=2)  # [height, width]
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


class PartRecord(BaseModel):
    """One visible part of a region's object (PA-CLIP's part-level data; PACO links parts to their object
    the same way): named with a box by stage `parts`, its mask made in code inside the object's mask,
    described by `part_describe` and checked by `part_verify`."""

    part_id: str = Field(description="`region_id:pN`, unique in the dataset")
    name: str = Field(description="the part's name as the model gave it (e.g. beak, left wing)")
    visibility: Literal["full", "partial"] = Field(description="fully or partly visible, as the model judged")
    reason: str | None = Field(None, description="why the model found the part distinctive")
    bbox: list[float] = Field(min_length=4, max_length=4, description="[x, y, w, h] in pixels of the displayed image")
    mask: RleMask | None = Field(None, description="COCO RLE of the part, inside the region's mask")
    mask_source: str | None = Field(None, description="sam, grabcut or box (the box clipped to the object's mask)")
    containment: float | None = Field(None, description="area(part and object) / area(part), before clipping")
    area: int | None = Field(None, description="pixels of the stored mask")
    kept: bool = Field(description="whether the part passed the mask checks (containment, size, not a duplicate)")
    reject_reason: str | None = Field(None, description="why a part was not kept")
    short_caption: str | None = Field(None, description="at most 77 open_clip tokens (stage `part_describe`)")
    long_caption: str | None = Field(None, description="a longer description of the part (stage `part_describe`)")
    parent_spans: list[TextSpan] | None = Field(
        None, description="the spans of the region's `fine_caption` that mention the part (found in code)")
    verdict: Verdict | None = Field(None, description="is this the named part of this object (stage `part_verify`)")


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
    prompt_tokens: int = 0  # summed over attempts
    completion_tokens: int = 0
    attempts: int = 0  # requests sent for the region (retries included)
    # The stage's lineage key (stages/lineage.py) when it took the region: what its field was made from.
    # A rerun under another key recomputes the field; None: made before lineage was kept, or not by a run.
    lineage: str | None = None


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
    parts: StageProvenance = StageProvenance()
    part_describe: StageProvenance = StageProvenance()
    part_verify: StageProvenance = StageProvenance()

    model_config = {"populate_by_name": True}

    @classmethod
    def stage_names(cls) -> tuple[str, ...]:
        """The stages that keep a provenance entry, as the file schema names them (`validate`, not `validate_`)."""
        return tuple(info.alias or name for name, info in cls.model_fields.items())

    def of(self, stage: str) -> StageProvenance:
        """The entry of stage `stage` (by its schema name)."""
        return getattr(self, next(name for name, info in type(self).model_fields.items() if (info.alias or name) == stage))


class RegionRecord(BaseModel):
    """One region of an image. Each field's description is what the dataset card says of it."""

    region_id: str = Field(description="`shard:image_key:index`, unique in the dataset")
    region_index: int = Field(description="the region's place in its image's GRIT annotations")
    phrase: str = Field(description="the GRIT noun phrase of the region")
    bbox: list[float] = Field(min_length=4, max_length=4,
                              description="[x, y, w, h] in pixels of the displayed (EXIF-rotated) image")
    score: float | None = Field(None, description="the GRIT (GLIP) box score")
    mask: RleMask | None = Field(
        None, description="COCO RLE (`size` [h, w], `counts` as text); `mask_source` says where it came from")
    mask_source: str | None = Field(None, description="given, grabcut, box (a box-shaped fallback), sam or none")
    object_caption: str | None = Field(
        None, description="object-level caption from the crop and mask (stage `object`)")
    validation: Validation | None = Field(
        None, description="`consistent` and `reason`: the check of the object caption (stage `validate`)")
    context_caption: str | None = Field(
        None, description="context-level caption from the image and box (stage `context`)")
    fine_caption: str | None = Field(None, description="the fine-grained description merging both (stage `merge`)")
    # Optional stages after merge (schema 1.2); None: the stage did not run on this region.
    summary: str | None = Field(None, description="a summary of at most 77 open_clip tokens (stage `summarize`)")
    summary_tokens: int | None = Field(
        None, description="the summary's open_clip token count, start and end tokens included")
    sentences: list[TextSpan] | None = Field(
        None, description="the description's sentences: `start`, `end`, `text`, with `fine_caption[start:end] == text`")
    phrases: list[GroundedPhrase] | None = Field(
        None, description="the description's noun phrases as spans (`start`, `end`, `text`), each naming the region "
        "itself (`target` self), another region of the image (`target` region, `region_id`) or nothing known "
        "(`target` none) (stage `ground`)")
    negative_candidates: list[HardNegative] | None = Field(
        None, description="proposed hard negatives that change exactly one span (`start`, `end` in the description, "
        "`replacement`; `text == fine_caption[:start] + replacement + fine_caption[end:]`), with `edit_type` and the "
        "verdicts they got (stage `negatives`)")
    negative_text_verdicts: list[Verdict] | None = Field(
        None, description="per candidate, a text model's verdict that it contradicts the description "
        "(stage `negatives_text`)")
    negatives: list[HardNegative] | None = Field(
        None, description="the verified hard negatives: both the text model (`contradiction`) and the VLM looking at "
        "the region (`visual`: false of it) judged them so (stage `negatives_visual`)")
    parts: list[PartRecord] | None = Field(
        None, description="the object's visible parts, each with a mask inside the region's mask (stages `parts`, "
        "`part_describe`, `part_verify`); None: the part stages did not run on this region")
    quality: Quality | None = Field(
        None, description="`words`, format `flags` (too_short, too_long, repetition, markup), `nouns` and "
        "`unsupported_noun_share` (head nouns of `phrases` in neither the phrase nor the object caption)")
    status: Status = Field("pending", description="ok, rejected or failed")
    error: str | None = Field(
        None, description="why a region is rejected or failed, prefixed with the stage (or the data plane) that decided")
    provenance: Provenance = Field(
        Provenance(), description="per stage: model, prompt version, prompt and completion tokens, attempts, and the "
        "lineage key of what the stage's field was made from")


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
    if isinstance(region, RegionRecord):  # read three fields, not a dump of the whole model
        status, caption, mask = region.status, region.fine_caption, region.mask
        counts = mask.counts if mask is not None else None
    else:
        status, caption, mask = region.get("status"), region.get("fine_caption"), region.get("mask")
        counts = mask.get("counts") if mask else None
    return status == "ok" and bool(caption) and bool(counts)


def is_trainable_part(part: "PartRecord | dict", include_unverified: bool = False) -> bool:
    """The one definition of a part the part branch trains on (and whose texts the text cache embeds):
    kept by the mask checks, confirmed by `part_verify` (unverified ones only with `include_unverified`;
    a verdict that fails never), with a mask and a short or long caption."""
    if isinstance(part, PartRecord):
        kept, verdict, mask, short, long = part.kept, part.verdict, part.mask, part.short_caption, part.long_caption
        holds = None if verdict is None else verdict.holds
        counts = mask.counts if mask is not None else None
    else:
        kept, verdict, mask = part.get("kept"), part.get("verdict"), part.get("mask")
        short, long = part.get("short_caption"), part.get("long_caption")
        holds = None if not verdict else verdict.get("holds")
        counts = mask.get("counts") if mask else None
    verified = holds is True or (holds is None and include_unverified)
    return bool(kept) and verified and bool(counts) and bool(short or long)


@functools.cache
def features() -> "datasets.Features":
    """The file schema as Hugging Face `datasets.Features`, derived from `ImageRecord`: the encoded
    image as a `datasets.Image` column first, then every other field by its schema name (`validate`,
    not `validate_`); int -> int32, float -> float32, a list of fixed length (`min_length ==
    max_length`) as such, a Literal as a string. The schema is kept in one place, the pydantic models.

    Built on first use: importing `datasets` costs ~3.6 CPU-s, paid by every Ray worker process
    that imports the data plane, and most of them (chain workers) never write a file.
    """
    import datasets

    fields = _model_features(ImageRecord)
    return datasets.Features({name: datasets.Image() if name == "image" else fields[name] for name in stored_columns()})


@functools.cache
def stored_columns() -> tuple[str, ...]:
    """The stored file's columns in order: the encoded image (`image_bytes` is stored as `image`), then
    every other `ImageRecord` field. Without importing `datasets`."""
    return ("image", *(info.alias or name for name, info in ImageRecord.model_fields.items() if name != "image_bytes"))


def _model_features(model: type[BaseModel]) -> dict:
    return {info.alias or name: _feature(info.annotation, info.metadata) for name, info in model.model_fields.items()}


def _feature(annotation, metadata=()):
    """One field's `datasets` feature (see `features`)."""
    import types
    import typing

    import datasets

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):  # X | None: nullable anyway
        (inner,) = [a for a in args if a is not type(None)]
        return _feature(inner, metadata)
    if origin is Literal:
        if not all(isinstance(a, str) for a in args):
            raise TypeError(f"only string Literals are stored: {annotation}")
        return datasets.Value("string")
    if origin is list:
        lengths = {getattr(m, "min_length", None) for m in metadata} | {getattr(m, "max_length", None) for m in metadata}
        lengths.discard(None)
        length = lengths.pop() if len(lengths) == 1 else -1
        return datasets.List(_feature(args[0]), length=length)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _model_features(annotation)
    scalars = {str: "string", int: "int32", float: "float32", bool: "bool", bytes: "binary"}
    if annotation in scalars:
        return datasets.Value(scalars[annotation])
    raise TypeError(f"no stored form for {annotation!r}: add one to records._feature")


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
