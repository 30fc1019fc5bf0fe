"""Stage 2, validate: a structured verdict on the object caption (paper: Qwen2-72B).

Inconsistent captions end the region as `rejected` with the model's reason; it stays in the output.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from annotate.data.records import RegionRecord, Validation
from annotate.engines.base import ChatResult
from annotate.stages.base import RegionContext, Stage


class ValidateStage(Stage):
    name = "validate"
    writes = "validation"

    def wants(self, region: RegionRecord) -> bool:
        return region.status == "pending" and region.object_caption is not None and region.validation is None

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        return {
            "phrase": ctx.region.phrase,
            "image_caption": ctx.record.caption,
            "object_caption": ctx.region.object_caption,
        }

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        try:
            verdict = Validation.model_validate(result.parsed)
        except ValidationError as exc:
            return f"verdict does not match the schema: {exc.errors()[0]['msg']}"
        verdict.reason = " ".join(verdict.reason.split())
        region.validation = verdict
        if not verdict.consistent:
            region.status = "rejected"
            region.error = f"validate: inconsistent: {verdict.reason or 'no reason given'}"
        return None
