"""Stage 3, context: where the object is and what surrounds it, from the full image and its box
(paper: Griffon-G-26B). Only regions whose object caption was validated reach it."""

from __future__ import annotations

from typing import Any

from annotate.data.records import RegionRecord
from annotate.engines.base import ChatResult
from annotate.stages.base import RegionContext, Stage, clean_caption


class ContextStage(Stage):
    name = "context"
    writes = "context_caption"

    def wants(self, region: RegionRecord) -> bool:
        return (
            region.status == "pending"
            and region.validation is not None
            and region.validation.consistent
            and region.context_caption is None
        )

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        return {"phrase": ctx.region.phrase, "image_caption": ctx.record.caption, "box_norm": ctx.box_norm()}

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        caption = clean_caption(result.text)
        if not caption:
            return "the model returned an empty caption"
        region.context_caption = caption
        return None
