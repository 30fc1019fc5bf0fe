"""Optional stage after merge, ground: the noun phrases of the description as character spans, each
tied to what it names (PixelLLM-style grounding of a caption's words): the region itself (its mask),
another region of the same image (by id), or nothing known.

The model lists the phrases and their referents (`self`, `R<index>` of a region it is shown, `none`);
the spans are found in code, in order of mention, so offsets are exact. A phrase not found verbatim in
the description, or naming a region the image does not have, is dropped or marked ungrounded: a model's
slip never becomes a wrong offset or a wrong link.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from annotate.data.records import GroundedPhrase, RegionRecord
from annotate.engines.base import ChatResult
from annotate.stages.base import DescribedStage, RegionContext, settle


class _Phrase(BaseModel):
    text: str
    refers_to: str


class _Answer(BaseModel):
    phrases: list[_Phrase]


def find_span(text: str, phrase: str, taken: list[tuple[int, int]], after: int) -> tuple[int, int] | None:
    """Where `phrase` occurs in `text` (case-insensitive), preferring the first occurrence at or after
    `after` (phrases come in order of mention), never overlapping a span already `taken`."""
    lowered, needle = text.lower(), phrase.lower()
    starts, at = [], lowered.find(needle)
    while at >= 0 and needle:
        starts.append(at)
        at = lowered.find(needle, at + 1)
    free = [s for s in starts if all(s + len(needle) <= a or s >= b for a, b in taken)]
    best = next((s for s in free if s >= after), free[0] if free else None)
    return None if best is None else (best, best + len(needle))


def ground_phrases(region: RegionRecord, others: dict[int, str], answer: list[_Phrase]) -> list[GroundedPhrase]:
    """The answer's phrases as spans of `region.fine_caption`, sorted by position; `others` maps a
    region index of the same image to its region id."""
    text, taken, out, after = region.fine_caption or "", [], [], 0
    for item in answer:
        phrase = " ".join(item.text.split()).strip(" .,;:")
        span = find_span(text, phrase, taken, after) if phrase else None
        if span is None:
            continue
        ref = item.refers_to.strip().lower()
        if ref == "self" or ref == f"r{region.region_index}":
            target, region_id = "self", None
        elif ref.startswith("r") and ref[1:].isdigit() and int(ref[1:]) in others:
            target, region_id = "region", others[int(ref[1:])]
        else:
            target, region_id = "none", None
        taken.append(span)
        after = span[1]
        out.append(GroundedPhrase(start=span[0], end=span[1], text=text[span[0]:span[1]], target=target,
                                  region_id=region_id))
    return sorted(out, key=lambda p: p.start)


class GroundStage(DescribedStage):
    name = "ground"
    writes = "phrases"
    reads = ("merge",)  # the other regions' phrases and boxes are data

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # region id -> {region index: region id} of the other regions of its image, from build_request
        # to apply (which sees only the region); an entry of a region that ends failed stays (a few bytes).
        self._others: dict[str, dict[int, str]] = {}


    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        others = [{"id": f"R{r.region_index}", "phrase": r.phrase, "bbox": [round(v) for v in r.bbox]}
                  for r in ctx.record.regions if r.region_id != ctx.region.region_id]
        return {"phrase": ctx.region.phrase, "fine_caption": ctx.region.fine_caption, "others": others,
                "bbox": [round(v) for v in ctx.region.bbox]}

    def build_request(self, ctx: RegionContext):
        request = super().build_request(ctx)
        # The ids the model may name, kept with the request for `apply` (which sees only the region).
        self._others[ctx.region.region_id] = {r.region_index: r.region_id for r in ctx.record.regions
                                              if r.region_id != ctx.region.region_id}
        return request

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        try:
            answer = _Answer.model_validate(result.parsed)
        except ValidationError as exc:
            return f"answer does not match the schema: {exc.errors()[0]['msg']}"
        region.phrases = ground_phrases(region, self._others.pop(region.region_id, {}), answer.phrases)
        settle(region)
        return None
