"""Answers that are not answers: the rules every stage's answer passes before it is stored.

Real models, asked for a description, also answer with the description under a label (`Merge: ...`),
in markdown, after a preamble ("Here is the description:"), after restating their inputs ("The
object-level description is: ..."), with the prompt's own instruction echoed back, or with the
prompt's worked example copied; asked for a verdict, they give one that their own reason contradicts
(`{"consistent": true, "reason": "The image is inconsistent with ..."}`). Measured with
SmolLM2-135M-Instruct (issue 30); larger models do the same, less often.

The rules are code here; the word lists that are about one stage's prompt or verdict live with that
stage (`Stage.restated_inputs`, validate.py's and negatives.py's `VerdictWords`). What is generic
English (label words, negations) is here. `Stage.review` (stages/base.py) applies them between the
model's result and `Stage.apply`; stages/batch.py retries an answer a rule rejects once, then fails
the region with the rule's reason.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from annotate.engines.base import ChatResult

# The reasons a rule gives; each is also a `StageCounts` counter (spaces as underscores).
ECHO = "echo"
COPIED_EXAMPLE = "copied example"
NO_DESCRIPTION = "no description"
CONTRADICTORY_VERDICT = "contradictory verdict"
RULES: tuple[str, ...] = (ECHO, COPIED_EXAMPLE, NO_DESCRIPTION, CONTRADICTORY_VERDICT)


def counter_of(reason: str) -> str:
    """The `StageCounts` field that counts answers a rule rejected."""
    return reason.replace(" ", "_")


@dataclass(frozen=True)
class NotAnAnswer:
    """A rule's rejection of an answer. The region is asked once more (stages/batch.py); when it
    cannot be, it takes `fallback` if the stage gave one (an answer with the offending part marked
    unverified), else it fails with `reason` as the error kind (`merge: echo: ...`)."""

    reason: str
    message: str
    fallback: ChatResult | None = None


# ----------------------------------------------------------------------------------------------
# Stripping: labels, markdown, preambles, wrapping quotes, restated inputs.

# Words a leading label is made of ("Merge:", "Fine-grained description:", "The merged description
# is:", "Final answer:"). A leading `words:` whose words are all here is a label, not the answer's
# start; "A red mug: glossy ..." is kept because "red" and "mug" are not label words.
LABEL_WORDS = frozenset("""
    answer final caption captions description descriptions summary short merge merged merging combined
    fine grained detailed refined revised improved rewritten object level context output result response
    assistant text sentence new one the a an my your this of for here sure
""".split())
_MAX_LABEL_WORDS = 8  # normalised words ("fine-grained" is two)
_LEADING_LABEL = re.compile(r"^\s*(?P<label>[A-Za-z][\w'-]*(?:\s+[\w'-]+){0,7}?)"
                            r"(?:\s+(?:is|are|reads|would be))?\s*:\s*")
# "Here is the (fine-grained) description (of the object):", "Sure! Here's my answer:".
_HERE_IS = re.compile(r"^\s*(?:(?:sure|certainly|okay|ok|of course|alright)\b[\s,!.]*)?"
                      r"here(?:\s+is|\s+are|'s|\u2019s)\b(?P<rest>[^:\n]{0,80}?)\s*:\s*", re.I)
_HERE_WORDS = 12  # a "Here is ...:" preamble names what follows in a few words, one of these:
_HERE_NOUNS = frozenset("description caption summary answer merge version text result response output sentence "
                        "sentences rewrite".split())
_FENCE = re.compile(r"^\s*(```|~~~).*$", re.M)
_RULE_LINE = re.compile(r"^\s*([-*_=])\1{2,}\s*$", re.M)
_HEADING = re.compile(r"^\s*#{1,6}\s*", re.M)
_BULLET = re.compile(r"^\s*(?:[-*+\u2022\u2023\u25aa\u25cf]|\d{1,2}[.)])\s+", re.M)
_QUOTE_LINE = re.compile(r"^\s*>\s?", re.M)
_EMPHASIS = re.compile(r"\*+|__+|`+|(?<![\w])_(?=\S)|(?<=\S)_(?![\w])")
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}
_ALNUM = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Normalised words: lower case, runs of letters and digits (punctuation and markup dropped)."""
    return _ALNUM.findall(text.lower())


def is_label(phrase: str) -> bool:
    """A short phrase made only of label words ("Fine-grained description", "Merge", "Answer")."""
    found = words(phrase)
    return 0 < len(found) <= _MAX_LABEL_WORDS and all(w in LABEL_WORDS for w in found)


def strip_markdown(text: str) -> str:
    """Markdown is not description text: code fences and rules go, heading, bullet, number and quote
    markers go (a heading that is only a label goes whole), bold/italic/code markers go."""
    text = _FENCE.sub("", text)
    text = _RULE_LINE.sub("", text)
    lines = []
    for line in text.splitlines():
        heading = _HEADING.match(line)
        line = _QUOTE_LINE.sub("", _BULLET.sub("", _HEADING.sub("", line)))
        if heading and is_label(line.rstrip(" :")):
            continue
        lines.append(line)
    return _EMPHASIS.sub("", "\n".join(lines))


def _unquoted(text: str) -> str:
    """The text inside quotes that wrap all of it (a final full stop outside them allowed)."""
    if len(text) < 2 or text[0] not in _QUOTES:
        return text
    close = _QUOTES[text[0]]
    body = text[1:-1] if text.endswith(close) else text[1:-2] if text.endswith(close + ".") else None
    if body is None or text[0] in body or (close != text[0] and close in body):
        return text
    return body.strip()


def _without_preamble(text: str) -> str:
    """One leading "Here is the description:" preamble or label removed, if the text starts with one."""
    here = _HERE_IS.match(text)
    named = words(here.group("rest")) if here else []
    if here and len(named) <= _HERE_WORDS and _HERE_NOUNS.intersection(named):
        return text[here.end():]
    label = _LEADING_LABEL.match(text)
    if label and is_label(label.group("label")):
        return text[label.end():]
    return text


def strip_answer(text: str, restated: Sequence[tuple[re.Pattern[str], str]] = ()) -> str:
    """A model's free-text answer as the description to store: markdown, restated inputs (each a
    label pattern and the input value it names), "Here is ...:" preambles, leading labels and
    wrapping quotes removed, repeatedly, and whitespace collapsed. Empty when nothing else is left."""
    while True:
        before = text
        text = " ".join(strip_restatements(strip_markdown(text), restated).split())
        text = _unquoted(_without_preamble(text).strip())
        if text == before:
            return text


# A restatement ends where the input value does: at punctuation, a closing quote or the end.
_AFTER_VALUE = re.compile(r"[\"'\u201d\u2019)\]]*\s*(?:[.;,!?]+[\"'\u201d\u2019)\]]*\s*|\n\s*|$)")


@functools.lru_cache(maxsize=None)
def restatement_pattern(labels: tuple[str, ...]) -> re.Pattern[str]:
    """The pattern of a label a model restates an input under: "Object-level:", "The object-level
    description is:", "and the object-level description is "..."" (hyphens and spaces interchangeable)."""
    alternatives = "|".join(r"[-\s]+".join(map(re.escape, re.split(r"[-\s]+", label.strip())))
                            for label in sorted(labels, key=len, reverse=True))
    return re.compile(r"(?<![\w-])(?:(?:and|while|whereas)\s+)?(?:the\s+)?(?:%s)(?:\s*(?:is|was|reads|says)\b\s*:?|\s*:|(?<=\bas)(?=\s))\s*"
                      % alternatives, re.I)


def _value_end(text: str, start: int, value: list[str]) -> int | None:
    """Where `value` (normalised words) ends, if `text[start:]` begins with it and it ends there."""
    tokens = _ALNUM.finditer(text.lower(), start)
    end = start
    for expected in value:
        token = next(tokens, None)
        gap = text[end:token.start()] if token else ""
        if token is None or token.group() != expected or any(c.isalnum() for c in gap):
            return None
        end = token.end()
    after = _AFTER_VALUE.match(text, end)
    return after.end() if after else None


def strip_restatements(text: str, restated: Sequence[tuple[re.Pattern[str], str]]) -> str:
    """Input values restated under their label ("The object-level description is: a red mug.") are
    not part of the answer: each such label with its value is removed, wherever it stands. A label
    followed by something other than its input is left (the label rule may remove it)."""
    for pattern, value in restated:
        value_words = words(value)
        if not value_words:
            continue
        at = 0
        while match := pattern.search(text, at):
            end = _value_end(text, match.end(), value_words)
            if end is None:
                at = match.end()
                continue
            text = text[:match.start()] + " " + text[end:]
            at = match.start()
    return text


def has_words(text: str) -> bool:
    return any(c.isalnum() for c in text)


# ----------------------------------------------------------------------------------------------
# Echo and copy: an answer repeating a run of the prompt's own words.

# Input values in a template rendered for its own text (see `Stage.review`) are replaced by this:
# no word n-gram spans it, so the inputs, which an answer may legitimately repeat, never count.
MASK = "\x00"
EXAMPLE_START = re.compile(r"\{#-?\s*example\s*-?#\}")
EXAMPLE_END = re.compile(r"\{#-?\s*end example\s*-?#\}")


def masked(value: Any) -> Any:
    """`value` with every string in it replaced by MASK (lists and dicts keep their shape, so the
    template's loops and conditions render as they do for the real values)."""
    if isinstance(value, str):
        return MASK
    if isinstance(value, Mapping):
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(v) for v in value]
    return value


def strings_in(value: Any) -> list[str]:
    """Every string in a field value (recursively)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in strings_in(v)]
    return []


def example_sources(source: str) -> list[str]:
    """The parts of a template source marked as its worked example: between `{# example #}` and
    `{# end example #}` (Jinja comments: the model sees the example, not the markers)."""
    out, at = [], 0
    while start := EXAMPLE_START.search(source, at):
        end = EXAMPLE_END.search(source, start.end())
        if end is None:
            raise ValueError("a prompt template opens {# example #} without {# end example #}")
        out.append(source[start.end():end.start()])
        at = end.end()
    return out


def without_examples(source: str) -> str:
    """A template source with its marked worked examples cut out (the rest of the prompt's own text)."""
    for example in example_sources(source):
        source = source.replace(example, "")
    return source


def ngrams(items: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(items[i:i + n]) for i in range(len(items) - n + 1)}


@functools.lru_cache(maxsize=1024)
def template_ngrams(rendered: str, n: int) -> frozenset[tuple[str, ...]]:
    """The word n-grams of a template rendered with MASKed inputs, none spanning an input."""
    return frozenset(g for part in rendered.split(MASK) for g in ngrams(words(part), n))


def repeated(answer: str, prompt_grams: frozenset[tuple[str, ...]], inputs: Iterable[str], n: int) -> str | None:
    """The first run of `n` words the answer shares with the prompt's own text (not with its inputs:
    a merge that reuses its object caption is not an echo), or None."""
    allowed = set()
    for value in inputs:
        allowed |= ngrams(words(value), n)
    answer_words = words(answer)
    for i in range(len(answer_words) - n + 1):
        gram = tuple(answer_words[i:i + n])
        if gram in prompt_grams and gram not in allowed:
            return " ".join(gram)
    return None


# ----------------------------------------------------------------------------------------------
# Verdicts that contradict their own reason.

# Negations: a cue (below) a few words after one of them is negated ("does not contradict", "nothing
# in it contradicts", "no mismatch") and does not count. A `false` verdict whose reason has a negation
# or a contrast word is never called contradictory (it may well be saying what is wrong).
NEGATIONS = frozenset("not no never nothing none neither nor without cannot hardly barely".split())
CONTRASTS = frozenset("but however although though while whereas instead rather except only yet despite".split())
_NEGATION_WINDOW = 4  # words before a cue that may negate it


@dataclass(frozen=True)
class VerdictWords:
    """A verdict stage's cues (phrases, matched as whole words in the lower-cased reason).

    `against_true`: a `true` verdict whose reason says one of these (not negated) contradicts itself.
    `against_false`: a `false` verdict whose reason says one of these, with no negation and no
    `against_true` cue anywhere, contradicts itself. Cues in `against_false` must not contain a
    negation (their point is the absence of one)."""

    against_true: tuple[str, ...]
    against_false: tuple[str, ...]

    def __post_init__(self):
        bad = [cue for cue in self.against_false if _negated_word(cue.split())]
        if bad:
            raise ValueError(f"against_false cues must not contain a negation: {bad}")


def _negated_word(tokens: Sequence[str]) -> bool:
    return any(t in NEGATIONS or t.endswith("n't") for t in tokens)


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower().replace("\u2019", "'"))


def _cues_said(tokens: list[str], cues: Iterable[str]) -> list[str]:
    """The cues the tokens say, each not negated by a word just before it (unless the cue itself
    carries its negation: "does not match", "not a")."""
    said = []
    for cue in cues:
        parts = _tokens(cue)
        own_negation = _negated_word(parts)
        for i in range(len(tokens) - len(parts) + 1):
            if tokens[i:i + len(parts)] != parts:
                continue
            if own_negation or not _negated_word(tokens[max(0, i - _NEGATION_WINDOW):i]):
                said.append(cue)
                break
    return said


def contradiction(holds: bool, reason: str, cues: VerdictWords) -> str | None:
    """The cue by which `reason` says the opposite of the verdict `holds`, or None."""
    tokens = _tokens(reason)
    against_true = _cues_said(tokens, cues.against_true)
    if holds:
        return against_true[0] if against_true else None
    if against_true or _negated_word(tokens) or CONTRASTS.intersection(tokens):
        return None
    against_false = _cues_said(tokens, cues.against_false)
    return against_false[0] if against_false else None
