"""Stage 4, merge: one fine-grained description from the object and context captions, written by a
reasoning model (paper: DeepSeek-R1-70B). Its <think> part is split off by the engine and not stored.
A region that gets here and succeeds is `ok`."""

from __future__ import annotations

from typing import Any

from annotate.data.records import RegionRecord
from annotate.engines.base import ChatResult
from annotate.stages.base import RegionContext, Stage, clean_caption


class MergeStage(Stage):
    name = "merge"
    writes = "fine_caption"
    reads = ("object", "validate", "context")  # validate: a rejected region is not `pending`
    # How a model restates its two inputs before (or instead of) merging them, as prompts/merge.yaml and
    # its earlier versions named them: "The object-level description is: ... Context-level: ...".
    restated_inputs = {
        "object_caption": ("object-level description", "object-level caption", "object-level", "object description",
                           "object caption", "what it looks like", "what the object looks like"),
        "context_caption": ("context-level description", "context-level caption", "context-level",
                            "context description", "context caption", "where it is", "where the object is"),
    }

    def wants(self, region: RegionRecord) -> bool:
        return region.status == "pending" and region.context_caption is not None and region.fine_caption is None

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        return {
            "phrase": ctx.region.phrase,
            "object_caption": ctx.region.object_caption,
            "context_caption": ctx.region.context_caption,
        }

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        caption = clean_caption(result.text)
        if not caption:
            return "the model returned an empty description"
        region.fine_caption = caption
        region.status = "ok"
        region.error = None
        return None
