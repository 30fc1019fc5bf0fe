"""Optional stage after `parts`, part_describe (issue 29): a short and a long description of each kept
part. One request per region: the object crop, then one focal crop per kept part in order (the object
outlined in red, the part in cyan), and the answer gives one {short, long} per part, in order. A short
caption must fit open_clip's 77-token window (PA-CLIP's part texts train a CLIP text tower); an answer
with the wrong count or an over-long short caption is asked again, never cut.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from annotate.data.records import PartRecord, RegionRecord
from annotate.engines.base import ChatRequest, ChatResult
from annotate.stages.base import DescribedStage, RegionContext, clean_caption, described, settle
from annotate.stages.parts import kept_parts, part_request, settled_before, settled_without_parts
from annotate.stages.summarize import CLIP_CONTEXT_LENGTH, clip_token_count


class _Description(BaseModel):
    short: str
    long: str


class _Answer(BaseModel):
    parts: list[_Description]


def undescribed(region: RegionRecord) -> list[PartRecord]:
    return [part for part in kept_parts(region) if part.short_caption is None]


class PartDescribeStage(DescribedStage):
    name = "part_describe"
    writes = "parts"
    reads = ("parts",)  # the part names and masks; the description only through `parts`

    @classmethod
    def clear(cls, region: RegionRecord) -> None:
        for part in region.parts or []:
            part.short_caption = part.long_caption = None

    def wants(self, region: RegionRecord) -> bool:
        if not described(region) or region.parts is None:
            return False
        if kept_parts(region):
            return bool(undescribed(region))
        # None kept: taken once and settled without a model call (a rerun does not count it again).
        return not settled_before(region, self.name)

    def without_model(self, region: RegionRecord) -> bool:
        return settled_without_parts(region, kept_parts(region))

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        return {"phrase": ctx.region.phrase, "parts": [part.name for part in undescribed(ctx.region)],
                "max_clip_tokens": CLIP_CONTEXT_LENGTH}

    def build_request(self, ctx: RegionContext) -> ChatRequest:
        return part_request(super().build_request(ctx), ctx, undescribed(ctx.region), "parts")

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        try:
            answer = _Answer.model_validate(result.parsed).parts
        except ValidationError as exc:
            return f"answer does not match the schema: {exc.errors()[0]['msg']}"
        parts = undescribed(region)
        if len(answer) != len(parts):
            return f"the answer describes {len(answer)} parts, not the {len(parts)} shown"
        texts = [(clean_caption(a.short), clean_caption(a.long)) for a in answer]
        for i, (short, long) in enumerate(texts, 1):
            if not short or not long:
                return f"part {i}: an empty {'short' if not short else 'long'} description"
            if (tokens := clip_token_count(short)) > CLIP_CONTEXT_LENGTH:
                return f"part {i}: the short description has {tokens} CLIP tokens, over the limit of {CLIP_CONTEXT_LENGTH}"
        for part, (short, long) in zip(parts, texts):
            part.short_caption, part.long_caption = short, long
        settle(region)
        return None
