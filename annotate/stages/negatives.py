"""Optional stages after merge: verified hard negatives (FG-CLIP, NegCLIP style), in three steps.

1. `negatives`: a text model proposes K single-span edits of the description (colour, material,
   count, size, state, part, relation, object swap). Code keeps an edit only if the new text differs
   from the description in exactly one contiguous span of at most `max_span_words` words; the stored
   negative is rebuilt from that span, so `text == fine_caption[:start] + replacement + fine_caption[end:]`.
2. `negatives_text`: a text model judges, for every candidate, whether it contradicts the description.
3. `negatives_visual`: the VLM, looking at the region, judges whether each candidate that passed step 2
   is false of it. Only candidates both judge so are kept in `negatives`, with both verdicts.

Each check sends one request per region with all its candidates numbered, not one per candidate: the
region's image is encoded once instead of K times, and the shared prompt prefix is computed once.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from annotate.data.records import EDIT_TYPES, HardNegative, RegionRecord, Verdict
from annotate.engines.base import ChatResult
from annotate.stages.answers import CONTRADICTORY_VERDICT, NotAnAnswer, VerdictWords, contradiction
from annotate.stages.base import DescribedStage, RegionContext, StageParams, settle
from annotate.stages.validate import CONSISTENCY_WORDS

_WORD = re.compile(r"\S+")

# Verdicts their own reasons contradict (stages/answers.py `contradiction`); each check's schema asks
# for the reason before the verdict. In `negatives_text` a verdict that holds says "the edit contradicts
# the description":
CONTRADICTION_WORDS = VerdictWords(
    # a `holds: true` whose reason says the two are compatible
    against_true=("paraphrase", "paraphrases", "compatible", "same meaning", "means the same", "equivalent",
                  "synonym", "synonyms", "synonymous", "vaguer", "less specific", "more general", "adds detail",
                  "both can be true", "can both be true", "no contradiction", "does not contradict",
                  "doesn't contradict", "not contradict", "consistent", "identical"),
    # a `holds: false` whose reason says they contradict, with no negation
    against_false=("contradicts", "contradict", "contradiction", "contradictory", "incompatible",
                   "mutually exclusive", "opposite", "conflicts", "conflict"),
)
# In `negatives_visual` a verdict that holds says "the text is true of the object", as validate's does.
TRUTH_WORDS = VerdictWords(
    against_true=CONSISTENCY_WORDS.against_true + ("not true", "untrue", "false", "is not", "isn't", "are not",
                                                  "aren't", "not visible", "not shown"),
    against_false=CONSISTENCY_WORDS.against_false + ("true", "is true"),
)


def single_span_edit(original: str, edited: str, max_span_words: int) -> tuple[int, int, str] | None:
    """(start, end, replacement) when `edited` differs from `original` in exactly one contiguous run
    of words (replaced, inserted or deleted, at most `max_span_words` on either side); else None.
    Whitespace is the original's: the replacement is placed so that the rebuilt text keeps it."""
    old, new = list(_WORD.finditer(original)), list(_WORD.finditer(edited))
    ops = [op for op in difflib.SequenceMatcher(None, [m.group() for m in old], [m.group() for m in new],
                                                autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(ops) != 1:
        return None
    _, i1, i2, j1, j2 = ops[0]
    if max(i2 - i1, j2 - j1) > max_span_words:
        return None
    inserted = " ".join(m.group() for m in new[j1:j2])
    if i2 > i1:  # replace or delete: the words i1..i2 of the original
        start, end = old[i1].start(), old[i2 - 1].end()
        if not inserted:  # a deletion takes the space after the words too (or before, at the end)
            end = old[i2].start() if i2 < len(old) else end
            start = start if i2 < len(old) else (old[i1 - 1].end() if i1 else start)
        return start, end, inserted
    # an insertion before word i1 (or after the last word)
    if i1 < len(old):
        return old[i1].start(), old[i1].start(), inserted + " "
    end = old[-1].end() if old else 0
    return end, end, " " + inserted if old else inserted


class NegativesParams(StageParams):
    k: int = Field(8, ge=1, le=32, description="edits asked for per region")
    max_span_words: int = Field(5, ge=1, description="an edit may change at most this many consecutive words")


class _Edit(BaseModel):
    type: str
    text: str


class _Edits(BaseModel):
    edits: list[_Edit]


class _Check(BaseModel):
    holds: bool
    reason: str = ""


class _Checks(BaseModel):
    verdicts: list[_Check]


def read_verdicts(result: ChatResult, count: int) -> list[Verdict] | str:
    """The answer's verdicts, one per candidate in order; a candidate the answer skips is not
    verified (holds false), so a short answer costs that candidate, not the region."""
    try:
        checks = _Checks.model_validate(result.parsed).verdicts
    except ValidationError as exc:
        return f"answer does not match the schema: {exc.errors()[0]['msg']}"
    out = [Verdict(holds=c.holds, reason=" ".join(c.reason.split())) for c in checks[:count]]
    return out + [Verdict(holds=False, reason="no verdict given")] * (count - len(out))


def review_verdicts(result: ChatResult, count: int, cues: VerdictWords, unverified: bool) -> ChatResult | NotAnAnswer:
    """An answer with verdicts their reasons contradict is asked again once; if it cannot be, those
    verdicts (only) are recorded as `unverified` with the reason `contradictory verdict: ...`, so that
    one bad verdict costs its candidate, not the region."""
    try:
        checks = _Checks.model_validate(result.parsed).verdicts[:count]
    except ValidationError:
        return result  # `apply` reports it
    marked, said = [], []
    for i, check in enumerate(checks, 1):
        cue = contradiction(check.holds, check.reason, cues)
        if cue is None:
            marked.append(check.model_dump())
        else:
            said.append(f'{i}: "holds": {str(check.holds).lower()} but the reason says "{cue}"')
            marked.append({"holds": unverified, "reason": f"{CONTRADICTORY_VERDICT}: {check.reason}"})
    if not said:
        return result
    return NotAnAnswer(CONTRADICTORY_VERDICT, "; ".join(said),
                       fallback=dataclasses.replace(result, parsed={"verdicts": marked}))


class NegativesStage(DescribedStage):
    name = "negatives"
    writes = "negative_candidates"
    reads = ("merge",)
    Params = NegativesParams


    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        return {"phrase": ctx.region.phrase, "fine_caption": ctx.region.fine_caption, "k": self.params.k}

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        try:
            edits = _Edits.model_validate(result.parsed).edits
        except ValidationError as exc:
            return f"answer does not match the schema: {exc.errors()[0]['msg']}"
        original, seen, candidates = region.fine_caption, set(), []
        for edit in edits[: self.params.k]:
            span = single_span_edit(original, " ".join(edit.text.split()), self.params.max_span_words)
            if span is None or edit.type not in EDIT_TYPES:
                continue
            start, end, replacement = span
            text = original[:start] + replacement + original[end:]
            if text != original and text not in seen:
                seen.add(text)
                candidates.append(HardNegative(text=text, edit_type=edit.type, start=start, end=end,
                                               replacement=replacement))
        region.negative_candidates = candidates
        settle(region)
        return None


class NegativesTextStage(DescribedStage):
    name = "negatives_text"
    writes = "negative_text_verdicts"
    reads = ("merge", "negatives")

    def wants(self, region: RegionRecord) -> bool:
        return super().wants(region) and region.negative_candidates is not None

    def without_model(self, region: RegionRecord) -> bool:
        if region.negative_candidates:
            return False
        region.negative_text_verdicts = []
        settle(region)
        return True

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        return {"fine_caption": ctx.region.fine_caption,
                "candidates": [c.text for c in ctx.region.negative_candidates]}

    def review(self, ctx: RegionContext, result: ChatResult) -> ChatResult | NotAnAnswer:
        # unverified: not found contradicting, so the candidate is dropped
        return review_verdicts(result, len(ctx.region.negative_candidates), CONTRADICTION_WORDS, unverified=False)

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        verdicts = read_verdicts(result, len(region.negative_candidates))
        if isinstance(verdicts, str):
            return verdicts
        region.negative_text_verdicts = verdicts
        for candidate, verdict in zip(region.negative_candidates, verdicts):
            candidate.contradiction = verdict
        settle(region)
        return None


class NegativesVisualStage(DescribedStage):
    name = "negatives_visual"
    writes = "negatives"
    reads = ("negatives", "negatives_text")  # the description only through the candidates

    def wants(self, region: RegionRecord) -> bool:
        return super().wants(region) and region.negative_text_verdicts is not None

    @staticmethod
    def _to_check(region: RegionRecord) -> list[HardNegative]:
        """Only candidates the text model found contradicting go to the (costlier) VLM."""
        return [c for c in region.negative_candidates or [] if c.contradiction is not None and c.contradiction.holds]

    def without_model(self, region: RegionRecord) -> bool:
        if self._to_check(region):
            return False
        region.negatives = []
        settle(region)
        return True

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        return {"phrase": ctx.region.phrase, "candidates": [c.text for c in self._to_check(ctx.region)]}

    def review(self, ctx: RegionContext, result: ChatResult) -> ChatResult | NotAnAnswer:
        # unverified: taken as true of the object, so the candidate is not kept as a negative
        return review_verdicts(result, len(self._to_check(ctx.region)), TRUTH_WORDS, unverified=True)

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        checked = self._to_check(region)
        verdicts = read_verdicts(result, len(checked))
        if isinstance(verdicts, str):
            return verdicts
        # The VLM is asked whether each text is TRUE of the region; a negative needs it false.
        for candidate, verdict in zip(checked, verdicts):
            candidate.visual = Verdict(holds=not verdict.holds, reason=verdict.reason)
        region.negatives = [c.model_copy(deep=True) for c in checked if c.visual.holds]
        settle(region)
        return None
