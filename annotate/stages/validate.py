"""Stage 2, validate: a structured verdict on the object caption (paper: Qwen2-72B).

Inconsistent captions end the region as `rejected` with the model's reason; it stays in the output.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from annotate.data.records import RegionRecord, Validation
from annotate.engines.base import ChatResult
from annotate.stages.answers import CONTRADICTORY_VERDICT, NotAnAnswer, VerdictWords, contradiction
from annotate.stages.base import RegionContext, Stage

# A verdict its own reason contradicts is not a verdict (stages/answers.py `contradiction`). Measured:
# SmolLM2-135M answered {"consistent": true, "reason": "The image is inconsistent with ..."} for 19 of 20
# regions. The reason comes first in the schema, so that the model decides after reasoning. "not a" is
# matched as "is not a": "a mug, not a vase" is a consistent caption's contrast, not a contradiction.
CONSISTENCY_WORDS = VerdictWords(
    # a `consistent: true` whose reason says one of these (not negated) contradicts itself
    against_true=("inconsistent", "not consistent", "does not match", "doesn't match", "do not match",
                  "don't match", "not match", "mismatch", "mismatched", "mismatches", "contradict", "contradicts",
                  "contradicted", "contradictory", "contradiction", "different object", "a different",
                  "different from", "is not a", "is not an", "isn't a", "isn't an", "was not a", "are not", "aren't",
                  "not a description", "not the same", "incorrect", "inaccurate", "wrong",
                  "unrelated", "does not describe", "doesn't describe", "not describe", "not described",
                  "instead of", "not accurate", "not correct"),
    # a `consistent: false` whose reason says one of these, and nothing negative, contradicts itself
    against_false=("consistent", "consistently", "matches", "match", "matching", "correct", "correctly",
                   "accurate", "accurately", "agrees", "agree", "fits", "same object", "aligns", "corresponds"),
)


class ValidateStage(Stage):
    name = "validate"
    writes = "validation"
    reads = ("object",)

    def wants(self, region: RegionRecord) -> bool:
        return region.status == "pending" and region.object_caption is not None and region.validation is None

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        return {
            "phrase": ctx.region.phrase,
            "image_caption": ctx.record.caption,
            "object_caption": ctx.region.object_caption,
        }

    def review(self, ctx: RegionContext, result: ChatResult) -> ChatResult | NotAnAnswer:
        """A verdict whose reason says the opposite is asked again once, then fails the region."""
        try:
            verdict = Validation.model_validate(result.parsed)
        except ValidationError:
            return result  # `apply` reports it
        cue = contradiction(verdict.consistent, verdict.reason, CONSISTENCY_WORDS)
        if cue is None:
            return result
        return NotAnAnswer(CONTRADICTORY_VERDICT, f'"consistent": {str(verdict.consistent).lower()} but the reason '
                                                  f'says "{cue}": {" ".join(verdict.reason.split())[:200]}')

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
