"""Stage 3, context: where the object is and what surrounds it, from the full image and its box
(paper: Griffon-G-26B). Only regions whose object caption was validated reach it."""

from __future__ import annotations

from typing import Any

from annotate.data.records import RegionRecord
from annotate.engines.base import ChatResult
from annotate.engines.conventions import box_format
from annotate.stages.base import RegionContext, Stage, clean_caption


class ContextStage(Stage):
    name = "context"
    writes = "context_caption"
    reads = ("validate",)  # only validated regions; the object caption is not in its prompt

    def wants(self, region: RegionRecord) -> bool:
        return (
            region.status == "pending"
            and region.validation is not None
            and region.validation.consistent
            and region.context_caption is None
        )

    # The box is written the way the stage's model reads boxes (`self.conventions`, set by
    # stages/chain.build_stage; Griffon-G: [0.123,0.456,0.789,0.900]; InternVL2: <box>[[123, 456, 789, 900]]</box>).

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        fmt = box_format(self.conventions)
        return {"phrase": ctx.region.phrase, "image_caption": ctx.record.caption, "box": ctx.box(fmt),
                "box_note": fmt.note}

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        caption = clean_caption(result.text)
        if not caption:
            return "the model returned an empty caption"
        region.context_caption = caption
        return None
