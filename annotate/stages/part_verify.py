"""Optional stage after `part_describe`, part_verify (issue 29): one yes/no verdict per described part,
"is this the named part of this object?", on the same focal crops. One request per region, verdicts in
order, each with its reason first; a verdict its reason contradicts is asked again once, then recorded
as not holding (stages/negatives.py `review_verdicts`). A part whose verdict does not hold stays in the
record; training leaves it out (data/records.py `is_trainable_part`).
"""

from __future__ import annotations

from typing import Any

from annotate.data.records import PartRecord, RegionRecord
from annotate.engines.base import ChatRequest, ChatResult
from annotate.stages.answers import NotAnAnswer
from annotate.stages.base import DescribedStage, RegionContext, described, settle
from annotate.stages.negatives import TRUTH_WORDS, read_verdicts, review_verdicts
from annotate.stages.parts import kept_parts, part_request, settled_before, settled_without_parts


def described_parts(region: RegionRecord) -> list[PartRecord]:
    return [part for part in kept_parts(region) if part.short_caption is not None]


def unchecked(region: RegionRecord) -> list[PartRecord]:
    return [part for part in described_parts(region) if part.verdict is None]


class PartVerifyStage(DescribedStage):
    name = "part_verify"
    writes = "parts"
    reads = ("parts", "part_describe")  # which parts are described (the captions are not shown)

    @classmethod
    def clear(cls, region: RegionRecord) -> None:
        for part in region.parts or []:
            part.verdict = None

    def wants(self, region: RegionRecord) -> bool:
        # Once every kept part is described; a region with none described is settled without a model call.
        if not described(region) or region.parts is None:
            return False
        if any(part.short_caption is None for part in kept_parts(region)):
            return False
        if described_parts(region):
            return bool(unchecked(region))
        return not settled_before(region, self.name)  # none described: settled once, without a model call

    def without_model(self, region: RegionRecord) -> bool:
        return settled_without_parts(region, described_parts(region))

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        return {"phrase": ctx.region.phrase, "parts": [part.name for part in unchecked(ctx.region)]}

    def build_request(self, ctx: RegionContext) -> ChatRequest:
        return part_request(super().build_request(ctx), ctx, unchecked(ctx.region), "verdicts")

    def review(self, ctx: RegionContext, result: ChatResult) -> ChatResult | NotAnAnswer:
        # unverified: not confirmed as the named part, so it is left out of training
        return review_verdicts(result, len(unchecked(ctx.region)), TRUTH_WORDS, unverified=False)

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        parts = unchecked(region)
        verdicts = read_verdicts(result, len(parts))
        if isinstance(verdicts, str):
            return verdicts
        for part, verdict in zip(parts, verdicts):
            part.verdict = verdict
        settle(region)
        return None
