"""Optional stage after merge, parts (issue 29, PA-CLIP's part-level data): the VLM names the object's
visible, distinctive parts, each with a box; their masks are made in code inside the object's mask.

The model sees the object crop with the mask outlined (`crop_outlined`) and writes each box in its own
convention (engines/conventions.py `BoxFormat`) on the image it saw; the box is mapped back to
full-image pixels through the crop's place (`RegionViews.crop_box`) and the resize to `max_side`.
Each part's mask is GrabCut's inside the object, else the box clipped to the object
(data/parts.py `part_mask`); `check_parts` keeps a part only when it lies in the object, is big enough
and is not a duplicate, and finds the words of the description that mention it (`parent_spans`).
A box that cannot be read, or lies outside the image, is kept as a rejected part with its reason
(after the parts with boxes, its id continuing their numbering: `check_parts` numbers those).
With a segment model in the run (`segment:`), the chain worker gives the stage its SAM call (`segment`):
`apply` then only reads the boxes, and `complete`, once the batch's answers are in, asks SAM once per image
for all its parts (each box with points inside the object, `prompt_points`) before the masks and checks.
A SAM call that fails, or a mask it refuses (`sam_part_mask`), leaves that part to GrabCut or its box.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from annotate.data.crops import focal_crop
from annotate.data.masks import box_bounds, decode_rle, xyxy
from annotate.data.parts import (PartCandidate, PartMaskSettings, check_parts, parent_spans, part_mask,
                                 prompt_points, sam_part_mask)
from annotate.data.records import ImageRecord, PartRecord, RegionRecord
from annotate.engines.base import ChatRequest, ChatResult
from annotate.engines.conventions import box_format
from annotate.stages.base import DescribedStage, RegionContext, StageParams, settle
from annotate.stages.segment import SegmentFn

log = logging.getLogger(__name__)


class PartsParams(StageParams):
    k: int = Field(4, ge=1, le=16, description="parts asked for per region, at most (and images per part request)")
    masks: PartMaskSettings = PartMaskSettings()


class _Part(BaseModel):
    name: str = Field(min_length=1)
    visibility: Literal["full", "partial"]
    reason: str = ""
    box: str


class _Answer(BaseModel):
    parts: list[_Part]


@dataclass(frozen=True)
class _Seen:
    """What `apply` needs of the request: the full image, and where the image the model saw lies in it."""

    image: Image.Image
    crop_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in full-image pixels
    shown_size: tuple[int, int]  # (width, height) of the image sent, after the resize to `max_side`


def to_image_box(shown_box: list[float], seen: _Seen) -> list[float]:
    """[x, y, w, h] in pixels of the image the model saw -> the same box in full-image pixels."""
    x0, y0, x1, y1 = seen.crop_box
    sx, sy = (x1 - x0) / seen.shown_size[0], (y1 - y0) / seen.shown_size[1]
    x, y, w, h = shown_box
    return [x0 + x * sx, y0 + y * sy, w * sx, h * sy]


def clip_box(box: list[float], width: int, height: int) -> list[float] | None:
    """`box` clipped to the image; None when nothing of it (a whole pixel) is left."""
    x, y, w, h = box
    cx0, cy0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    cx1, cy1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    clipped = [cx0, cy0, cx1 - cx0, cy1 - cy0]
    bx0, by0, bx1, by1 = box_bounds(clipped, height, width)
    return clipped if bx1 > bx0 and by1 > by0 else None


@dataclass(frozen=True)
class _Named:
    """A part the model named with a box that could be read, before its mask is made."""

    name: str
    visibility: str
    reason: str | None
    box: list[float]  # [x, y, w, h] in full-image pixels, clipped to the image


@dataclass(frozen=True)
class _Read:
    """What `apply` read of one answer: the parts with a usable box, and those without (with why)."""

    named: list[_Named]
    unreadable: list[tuple[_Named, str]]


class PartsStage(DescribedStage):
    name = "parts"
    writes = "parts"
    reads = ("merge",)  # parent spans are found in the description, which the prompt also shows
    Params = PartsParams
    uses_segment: ClassVar[bool] = True  # the run's segment model, when it has one, makes the part masks

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # region id -> what its request showed, from build_request to apply (which sees only the region).
        self._seen: dict[str, _Seen] = {}
        # region id -> its answer, read, waiting for SAM's masks (`complete`); only with `segment`.
        self._read: dict[str, _Read] = {}
        self._rgb: tuple[Image.Image, np.ndarray] | None = None  # the last image's pixels (GrabCut's input)
        # The run's SAM call, `await segment(image, boxes_xyxy, points)` (set by the executor's chain worker
        # when the pipeline file configures `segment:`; its masks are made in `complete`, which the executor's
        # `run_stage_async` awaits); None: masks are GrabCut's or the box's, in `apply`.
        self.segment: SegmentFn | None = None

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        return {"phrase": ctx.region.phrase, "fine_caption": ctx.region.fine_caption, "k": self.params.k,
                "box_note": box_format(self.conventions).note}

    def build_request(self, ctx: RegionContext) -> ChatRequest:
        request = super().build_request(ctx)
        shown = ctx.image_part("crop_outlined")
        self._seen[ctx.region.region_id] = _Seen(ctx.image, ctx.views.crop_box, shown.size)
        return request

    def fail(self, region: RegionRecord, kind: str, message: str) -> None:
        # A region that never reaches `apply` must not keep its image here for the worker's life.
        self._seen.pop(region.region_id, None)
        self._read.pop(region.region_id, None)
        super().fail(region, kind, message)

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        try:
            answer = _Answer.model_validate(result.parsed)
        except ValidationError as exc:
            return f"answer does not match the schema: {exc.errors()[0]['msg']}"
        seen = self._seen.get(region.region_id)
        if seen is None or region.mask is None:
            return "no request was built for this region (its image or mask is missing)"
        height, width = region.mask.size
        fmt = box_format(self.conventions)
        read = _Read([], [])
        for part in answer.parts[: self.params.k]:
            name, reason = " ".join(part.name.split()), " ".join(part.reason.split()) or None
            shown = fmt.parse(part.box, *seen.shown_size)
            box = clip_box(to_image_box(shown, seen), width, height) if shown is not None else None
            if box is None:
                why = "the box could not be read" if shown is None else "the box lies outside the image or is empty"
                read.unreadable.append((_Named(name, part.visibility, reason, []), f"{why}: {part.box[:60]!r} ({fmt.name})"))
            else:
                read.named.append(_Named(name, part.visibility, reason, box))
        if self.segment is not None and read.named:
            self._read[region.region_id] = read  # the masks wait for SAM: `complete`
            return None
        self._finish(region, read, None)
        return None

    async def complete(self, items: list[tuple[ImageRecord, Image.Image | None]]) -> None:
        """SAM's part masks: one call per image for every part of its regions that `apply` read, then
        each region's masks and checks. A failed call leaves those parts to GrabCut or their boxes."""
        async def one(record: ImageRecord, image: Image.Image | None) -> None:
            waiting = [(region, self._read.pop(region.region_id)) for region in record.regions
                       if region.region_id in self._read]
            if not waiting:
                return
            # (region index, part index) -> SAM's prompt, for the parts whose box meets their object
            prompts = {}
            object_masks = [decode_rle(region.mask).astype(bool) for region, _ in waiting]
            for r, (region, read) in enumerate(waiting):
                for p, named in enumerate(read.named):
                    if points := self._points(object_masks[r], named.box):
                        prompts[r, p] = (xyxy(named.box), points)
            masks: dict[tuple[int, int], np.ndarray] = {}
            if prompts and image is not None:
                try:
                    answers = await self.segment(image, [box for box, _ in prompts.values()],
                                                 [points for _, points in prompts.values()]
                                                 if self.params.masks.sam_points else None)
                    masks = {at: mask for at, (mask, _score) in zip(prompts, answers, strict=True)}
                except Exception as exc:  # one image's part masks fall back; the regions are not lost
                    log.warning("SAM failed on the parts of %s: %s: %s", record.image_key, type(exc).__name__, exc)
            for r, (region, read) in enumerate(waiting):
                self._finish(region, read, [masks.get((r, p)) for p in range(len(read.named))], object_masks[r])

        await asyncio.gather(*(one(record, image) for record, image in items))

    def _points(self, object_mask: np.ndarray, box: list[float]) -> list[tuple[int, int]]:
        """SAM's positive points for a part: `sam_points` inside its box and the object, the deepest
        repeated to make up the count (SAM takes as many for every box). None (empty) when box and object
        do not meet: the part is not SAM's to find (its containment rejects it)."""
        count = max(self.params.masks.sam_points, 1)
        points = prompt_points(object_mask, box, count)
        return points + [points[-1]] * (count - len(points)) if points else []

    def _finish(self, region: RegionRecord, read: _Read, sam_masks: list[np.ndarray | None] | None,
                object_mask: np.ndarray | None = None) -> None:
        """The parts' masks (SAM's when given and accepted, else GrabCut's or the box's), checked, stored."""
        seen = self._seen.pop(region.region_id)
        object_mask = decode_rle(region.mask).astype(bool) if object_mask is None else object_mask
        settings = self.params.masks
        candidates = []
        for i, named in enumerate(read.named):
            sam = sam_masks[i] if sam_masks else None
            accepted = sam_part_mask(sam, object_mask, named.box, settings) if sam is not None else None
            pixels = self._pixels(seen.image) if accepted is None and settings.grabcut else None  # GrabCut's input
            mask, source = part_mask(object_mask, named.box, pixels, settings, sam_mask=accepted)
            candidates.append(PartCandidate(name=named.name, bbox=named.box, mask=mask, source=source,
                                            visibility=named.visibility, reason=named.reason))
        parts = check_parts(region.region_id, candidates, object_mask, settings, region.fine_caption)
        parts += [PartRecord(part_id=f"{region.region_id}:p{len(candidates) + i}", name=named.name,
                             visibility=named.visibility, reason=named.reason, bbox=[0.0, 0.0, 0.0, 0.0], kept=False,
                             reject_reason=why, parent_spans=parent_spans(region.fine_caption, named.name))
                  for i, (named, why) in enumerate(read.unreadable)]
        region.parts = parts
        settle(region)

    def _pixels(self, image: Image.Image) -> np.ndarray:
        """`image` as an RGB array, made once per image (its regions come one after another)."""
        if self._rgb is None or self._rgb[0] is not image:
            self._rgb = (image, np.asarray(image.convert("RGB")))
        return self._rgb[1]


# ------------------------------------------------------------- shared by part_describe and part_verify
def kept_parts(region: RegionRecord) -> list[PartRecord]:
    return [part for part in region.parts or [] if part.kept]


def part_images(ctx: RegionContext, parts: list[PartRecord]) -> list[Image.Image]:
    """One focal crop per part, in order (data/crops.py `focal_crop`: the object and the part outlined)."""
    if ctx.image is None or ctx.region.mask is None:
        raise ValueError("this region has no decoded image or mask")
    object_mask = decode_rle(ctx.region.mask).astype(bool)
    return [focal_crop(ctx.image, object_mask, decode_rle(part.mask).astype(bool), part.bbox, ctx.crops)
            for part in parts]


def part_request(request: ChatRequest, ctx: RegionContext, parts: list[PartRecord], key: str) -> ChatRequest:
    """What part_describe and part_verify send: their prompt's `request`, then one focal crop per part,
    and a JSON schema asking for exactly one item under `key` per part shown."""
    return one_item_per_part(with_images(request, part_images(ctx, parts)), key, len(parts))


def settled_before(region: RegionRecord, stage: str) -> bool:
    """Whether `stage` took this region already under its lineage key (kept in the provenance whatever the
    outcome, cleared when the key changes): a region it settled without parts is not taken again."""
    return region.provenance.of(stage).lineage is not None


def settled_without_parts(region: RegionRecord, parts: list[PartRecord]) -> bool:
    """A part stage's `without_model`: with no `parts` to work on, the region is settled without a call."""
    if parts:
        return False
    settle(region)
    return True


def one_item_per_part(request: ChatRequest, key: str, count: int) -> ChatRequest:
    """`request` whose JSON schema asks for exactly `count` items under `key`: the model's guided decoding
    then writes one per part shown, so a miscount never costs a retry (or the region)."""
    schema = request.json_schema
    if schema is None or key not in schema.get("properties", {}):
        return request
    items = {**schema["properties"][key], "minItems": count, "maxItems": count}
    return dataclasses.replace(request, json_schema={**schema, "properties": {**schema["properties"], key: items}})


def with_images(request: ChatRequest, images: list[Image.Image]) -> ChatRequest:
    """`request` with `images` added to its user turn after the template's own images, before the text:
    the part stages show a number of images that varies by region."""
    messages = [dict(m) for m in request.messages]
    content = list(messages[-1]["content"])
    at = next(i for i, item in enumerate(content) if item.get("type") == "text")
    content[at:at] = [{"type": "image", "image": image} for image in images]
    messages[-1]["content"] = content
    return dataclasses.replace(request, messages=messages)
