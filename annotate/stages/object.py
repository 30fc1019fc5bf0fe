"""Stage 1, object: an object-level caption from the tight crop and its mask (paper: InternVL2-76B)."""

from __future__ import annotations

from typing import Any

from annotate.data.records import RegionRecord
from annotate.engines.base import ChatResult
from annotate.stages.base import RegionContext, Stage, clean_caption


class ObjectStage(Stage):
    name = "object"
    writes = "object_caption"
    reads = ()  # the image, its caption and the region's phrase and mask: data only
    # The phrase a model may restate before its caption ("The object was referred to as "a mug".").
    restated_inputs = {"phrase": ("the object was referred to as", "the object is referred to as", "referred to as",
                                  "phrase")}

    def wants(self, region: RegionRecord) -> bool:
        return region.status == "pending" and region.mask is not None and region.object_caption is None

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        return {"phrase": ctx.region.phrase, "image_caption": ctx.record.caption}

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        caption = clean_caption(result.text)
        if not caption:
            return "the model returned an empty caption"
        region.object_caption = caption
        return None
