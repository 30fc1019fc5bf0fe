"""Optional stage after merge, summarize: a short summary of the description that fits CLIP's text
window (MulCLIP's short-text branch trains on it), and the description split into sentences.

The summary is counted with open_clip's own tokenizer, start and end tokens included, so "fits" means
what a CLIP text tower will see; one over the limit is asked again (hotter), never cut. Sentences are
split in code, not by the model: offsets into `fine_caption` must be exact, and a model would
paraphrase.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from pydantic import Field

from annotate.data.records import RegionRecord, TextSpan
from annotate.engines.base import ChatResult
from annotate.stages.base import DescribedStage, RegionContext, StageParams, clean_caption, settle

CLIP_CONTEXT_LENGTH = 77  # open_clip's text window, start and end tokens included

# A sentence ends at . ! or ? (and any closing quotes or brackets) followed by space and an upper-case
# letter, a digit or an opening quote. Common abbreviations do not end one. A regex, not a library:
# pysbd and nltk's punkt are not in the lock file (punkt also needs a data download), and model
# descriptions are plain prose.
_SENTENCE_END = re.compile(r"""[.!?]+["')\]]*\s+(?=["'(\[]?[A-Z0-9])""")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "approx.", "vs.", "mr.", "mrs.", "ms.", "dr.", "st.", "no.", "cf.")


@functools.cache
def _clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer  # imported on first use: it pulls in torch

    return SimpleTokenizer()


def clip_token_count(text: str) -> int:
    """Tokens of `text` in open_clip's tokenizer, with its start and end tokens."""
    return len(_clip_tokenizer().encode(text)) + 2


def split_sentences(text: str) -> list[TextSpan]:
    """The sentences of `text` as spans: `text[s.start:s.end] == s.text`, in order, none empty."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end() - len(match.group()) + len(match.group().rstrip())
        if text[start:end].lower().endswith(_ABBREVIATIONS):
            continue
        spans.append((start, end))
        start = match.end()
    spans.append((start, len(text.rstrip())))
    out = []
    for s, e in spans:
        s += len(text[s:e]) - len(text[s:e].lstrip())
        if e > s:
            out.append(TextSpan(start=s, end=e, text=text[s:e]))
    return out


class SummarizeParams(StageParams):
    max_clip_tokens: int = Field(CLIP_CONTEXT_LENGTH, ge=3, le=CLIP_CONTEXT_LENGTH,
                                 description="the summary's limit in open_clip tokens, start and end included")


class SummarizeStage(DescribedStage):
    name = "summarize"
    writes = "summary"
    reads = ("merge",)
    Params = SummarizeParams
    # The description a model may restate before its summary ("Description: ... Summary: ...").
    restated_inputs = {"fine_caption": ("description", "the original description", "fine-grained description")}


    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        return {"phrase": ctx.region.phrase, "fine_caption": ctx.region.fine_caption}

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        summary = clean_caption(result.text)
        if not summary:
            return "the model returned an empty summary"
        tokens = clip_token_count(summary)
        if tokens > self.params.max_clip_tokens:
            return f"the summary has {tokens} CLIP tokens, over the limit of {self.params.max_clip_tokens}"
        region.summary, region.summary_tokens = summary, tokens
        region.sentences = split_sentences(region.fine_caption)
        settle(region)
        return None
