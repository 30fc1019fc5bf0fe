"""What every stage shares: the prompt template, the per-region context, and the stage contract.

A stage is one file that says three things: which regions it takes (`wants`), what it sends to the
model for one region (`build_request`) and how it reads the answer into the region (`apply`). Between
the model and `apply`, `review` applies the answer rules (stages/answers.py): labels and markup
stripped, echoes of the prompt and verdicts their reason contradicts refused.
Stages know the record and the engine interface; they know nothing of Ray or of a concrete engine.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from annotate.config import CropConfig, SamplingConfig
from annotate.data.crops import VIEW_NAMES, RegionViews, region_views
from annotate.data.images import fit_within
from annotate.data.masks import decode_rle
from annotate.data.records import ImageRecord, RegionRecord
from annotate.engines.base import ChatRequest, ChatResult
from annotate.stages.answers import (COPIED_EXAMPLE, ECHO, MASK, NO_DESCRIPTION, NotAnAnswer, example_sources,
                                     has_words, masked, repeated, restatement_pattern, strings_in, strip_answer,
                                     template_ngrams, without_examples)
from annotate.engines.conventions import BoxFormat, ModelConventions

# Jinja2 with StrictUndefined: a template naming a field the stage does not provide is an error at
# render time, not a silently empty prompt.
_JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> jinja2.Template:
    """Compile a template once per process (compiling on every region cost 16% of the data plane)."""
    return _JINJA.from_string(source)


@dataclass(frozen=True)
class PromptTemplate:
    """One stage's prompt: a versioned YAML file under prompts/ (system + user Jinja templates)."""

    version: str
    system: str
    user: str
    images: tuple[str, ...] = ()
    json_schema: dict[str, Any] | None = None
    # At most this many tiles per image for a tiling model (InternVL), sent as its processor's
    # argument (engines/conventions.py `tiles_kwarg`); None: the model's own maximum.
    max_tiles: int | None = None
    # The model's makers advise no system prompt (DeepSeek-R1): the system text opens the user turn.
    system_in_user: bool = False

    @classmethod
    @functools.lru_cache(maxsize=None)
    def load(cls, path: str) -> "PromptTemplate":
        raw = yaml.safe_load(Path(path).read_text())
        missing = {"version", "user"} - set(raw)
        if missing:
            raise ValueError(f"prompt template {path} lacks {', '.join(sorted(missing))}")
        return cls(
            version=str(raw["version"]),
            system=raw.get("system", ""),
            user=raw["user"],
            images=tuple(raw.get("images") or ()),
            json_schema=raw.get("json_schema"),
            max_tiles=_positive(raw.get("max_tiles"), "max_tiles", path),
        )

    def tile_cap_for(self, conventions: ModelConventions | None) -> int | None:
        """`max_tiles` if the model tiles its images (InternVL), else None: a model that does not tile
        (Griffon-G, a generic model) is sent no cap, and its lineage does not count one."""
        image = conventions.image if conventions else None
        return self.max_tiles if image is not None and image.tiles_kwarg is not None else None

    def for_model(self, conventions: ModelConventions | None) -> "PromptTemplate":
        """This prompt as the model's conventions want it sent (engines/conventions.py)."""
        fold = bool(conventions and conventions.system_in_user)
        return self if fold == self.system_in_user else dataclasses.replace(self, system_in_user=fold)

    def messages(self, fields: dict[str, Any], images: dict[str, Image.Image]) -> list[dict[str, Any]]:
        """OpenAI-style messages; image parts use the engines' neutral `{"type": "image"}` form. With
        `system_in_user`, the system text and a blank line open the user turn, and no system message is sent."""
        user = _compiled(self.user).render(**fields)
        system = _compiled(self.system).render(**fields) if self.system else None
        if system is not None and self.system_in_user:
            user, system = f"{system}\n\n{user}" if system else user, None
        content: list[dict[str, Any]] = [{"type": "image", "image": images[name]} for name in self.images]
        content.append({"type": "text", "text": user})
        messages: list[dict[str, Any]] = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": content})
        return messages


@dataclass
class RegionContext:
    """Everything a stage may use to build a request for one region; crops are made on first use."""

    record: ImageRecord
    region: RegionRecord
    image: Image.Image | None
    crops: CropConfig
    _views: RegionViews | None = field(default=None, repr=False)
    # The whole image fitted to a size, shared by the contexts of one image's regions (`_requests` passes
    # one dict per image): a stage that shows every region the whole image resizes it once, not per region.
    fitted: dict[int, Image.Image] = field(default_factory=dict, repr=False)

    @property
    def views(self) -> RegionViews:
        if self._views is None:
            if self.image is None or self.region.mask is None:
                raise ValueError("this region has no decoded image or mask")
            mask = decode_rle(self.region.mask).astype(bool)
            self._views = region_views(self.image, mask, self.region.bbox, self.crops)
        return self._views

    def image_part(self, name: str) -> Image.Image:
        """The named image a template asks for (`IMAGE_NAMES`, data/crops.py says what each is)."""
        if name == "image":
            if self.crops.max_side not in self.fitted:
                self.fitted[self.crops.max_side] = _fit(self.image, self.crops.max_side)
            return self.fitted[self.crops.max_side]
        if name in IMAGE_NAMES:
            return _fit(getattr(self.views, name), self.crops.max_side)
        raise ValueError(f"prompt asks for unknown image {name!r} ({', '.join(IMAGE_NAMES)})")

    def box(self, fmt: BoxFormat) -> str:
        """The region's box as the stage's model writes boxes (engines/conventions.py `BoxFormat`)."""
        return fmt.format(self.region.bbox, self.record.width, self.record.height)


IMAGE_NAMES = ("image",) + VIEW_NAMES  # what a prompt's `images:` may name


def _positive(value: Any, key: str, path: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"prompt template {path}: {key} must be a positive integer, not {value!r}")
    return value


def _fit(image: Image.Image | None, max_side: int) -> Image.Image:
    if image is None:
        raise ValueError("image is missing")
    return fit_within(image, max_side)


class StageParams(BaseModel):
    """A stage's own settings (`params:` of its entry in the pipeline file); a stage with some
    subclasses this. Unknown keys are errors, as everywhere in the config tree."""

    model_config = ConfigDict(extra="forbid")

    echo_words: int = Field(8, ge=3, description=(
        "a free-text answer sharing a run of this many words with its prompt's own text (not its inputs) "
        "is an echo (or a copied example), not an answer (stages/answers.py)"))


class Stage:
    """Base of the stages. Subclasses set `name` and `writes` and implement wants/fields/apply; their
    order is the chain's (stages/chain.py)."""

    name: ClassVar[str]
    writes: ClassVar[str]  # the region field this stage fills in (cleared again when the region is retried)
    # The earlier stages whose output, when present, shapes this stage's request, which regions it takes
    # (their fields, or the status they set: validate's `rejected`) or how it reads the answer. Its
    # lineage key holds theirs (stages/lineage.py); what they read counts through them.
    reads: ClassVar[tuple[str, ...]]
    Params: ClassVar[type[StageParams]] = StageParams
    # Whether the run's segment model (`segment:`, SAM) serves this stage: the executor then deploys it
    # and sets the stage's `segment` call (stages/parts.py).
    uses_segment: ClassVar[bool] = False
    # A free-text stage's inputs that a model may restate before its answer ("The object-level
    # description is: ..."), as field -> the labels its prompt gives them (stages/answers.py).
    restated_inputs: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, prompt: PromptTemplate, sampling: SamplingConfig, model_id: str,
                 params: dict[str, Any] | None = None, conventions: ModelConventions | None = None):
        self.prompt = prompt
        self.sampling = sampling
        self.model_id = model_id
        self.params = self.Params.model_validate(params or {})
        # The conventions of the stage's model (stages/chain.build_stage): what ends its turn, how it
        # writes boxes (context), whether its system prompt goes into the user turn. None: generic.
        self.conventions = conventions
        # This stage's lineage key in the run (stages/lineage.py), recorded in the provenance of every
        # region it takes; None where nothing keeps outputs (doctor, the benchmarks' direct side).
        self.lineage: str | None = None

    @classmethod
    def clear(cls, region: RegionRecord) -> None:
        """Remove what this stage made in `region` (a retry or a lineage change redoes it). Stages that
        share a field (the part stages all write `parts`) clear only their own part of it."""
        setattr(region, cls.writes, None)

    def wants(self, region: RegionRecord) -> bool:
        raise NotImplementedError

    def without_model(self, region: RegionRecord) -> bool:
        """Settle a wanted region that needs no model call (e.g. nothing left to check); True when done."""
        return False

    async def complete(self, items: list[tuple[ImageRecord, Image.Image | None]]) -> None:
        """Work after every answer of a batch is applied, per image over its regions (stages/batch.py
        `run_stage_async`): the `parts` stage's SAM masks, one call per image. Most stages have none."""

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        """Template variables for one region."""
        raise NotImplementedError

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        """Write a successful result into the region; return why the answer is unusable, else None."""
        raise NotImplementedError

    def review(self, ctx: RegionContext, result: ChatResult) -> ChatResult | NotAnAnswer:
        """The answer rules (stages/answers.py), between a successful result and `apply`: the result to
        apply, or why the answer is not one (stages/batch.py asks once more, then fails the region).

        A free-text answer (a prompt without a JSON schema) is stripped of markdown, restated inputs,
        preambles, labels and quotes, and must not repeat a run of its prompt's own words (the worked
        example: `copied example`; the instruction: `echo`). An empty answer is left to `apply` (the
        model said nothing: a parse problem). A JSON stage checks what it needs by overriding this."""
        if self.prompt.json_schema is not None or not result.text.strip():
            return result
        fields = self.fields(ctx)
        restated = [(restatement_pattern(labels), fields[name]) for name, labels in self.restated_inputs.items()
                    if isinstance(fields.get(name), str)]
        text = strip_answer(result.text, restated)
        if not has_words(text):
            return NotAnAnswer(NO_DESCRIPTION, "only labels, markup or the inputs restated: " + _excerpt(result.text))
        return self.repeats_prompt(text, fields) or dataclasses.replace(result, text=text)

    def repeats_prompt(self, text: str, fields: dict[str, Any]) -> NotAnAnswer | None:
        """`echo` when `text` shares a run of `params.echo_words` words with the prompt's own text (its
        instruction), else `copied example` when it shares one with its marked worked example. The
        prompt is rendered with its inputs masked, so repeating them (as a merge should) never counts."""
        n, hidden = self.params.echo_words, {k: masked(v) for k, v in fields.items()}
        inputs = [s for v in fields.values() for s in strings_in(v)]
        sources = [src for src in (self.prompt.system, self.prompt.user) if src]
        own = MASK.join(_compiled(without_examples(src)).render(**hidden) for src in sources)
        if run := repeated(text, template_ngrams(own, n), inputs, n):
            return NotAnAnswer(ECHO, f'the answer repeats the prompt ("{run} ..."): {_excerpt(text)}')
        example = MASK.join(_compiled(part).render(**hidden) for src in sources for part in example_sources(src))
        if run := repeated(text, template_ngrams(example, n), inputs, n):
            return NotAnAnswer(COPIED_EXAMPLE, f'the answer copies the prompt\'s example ("{run} ..."): '
                                               f'{_excerpt(text)}')
        return None

    def build_request(self, ctx: RegionContext) -> ChatRequest:
        images = {name: ctx.image_part(name) for name in self.prompt.images}
        return ChatRequest(
            messages=self.prompt.messages(self.fields(ctx), images),
            sampling=self.sampling,
            json_schema=self.prompt.json_schema,
            request_id=ctx.region.region_id,
            mm_processor_kwargs=self.processor_kwargs(),
        )

    def processor_kwargs(self) -> dict[str, Any] | None:
        """The prompt's tile cap as the stage's model takes it, or None (no cap, or a model that does not tile)."""
        cap = self.prompt.tile_cap_for(self.conventions)
        return None if cap is None else {self.conventions.image.tiles_kwarg: cap}

    def record_provenance(self, region: RegionRecord, result: ChatResult) -> None:
        prov = region.provenance.of(self.name)
        prov.model = self.model_id
        prov.prompt_version = self.prompt.version
        prov.prompt_tokens += result.prompt_tokens
        prov.completion_tokens += result.completion_tokens
        prov.attempts += 1

    def fail(self, region: RegionRecord, kind: str, message: str) -> None:
        region.status = "failed"
        region.error = f"{self.name}: {kind}: {message}"


def described(region: RegionRecord) -> bool:
    """A region the optional stages after `merge` work on: it has its description and has not been
    rejected or failed (`pending` again when `--retry-failed` redoes one of them)."""
    return region.fine_caption is not None and region.status in ("ok", "pending")


class DescribedStage(Stage):
    """Base of the optional stages after `merge`: they take every described region whose field is
    still empty, and finish it `ok`."""

    def wants(self, region: RegionRecord) -> bool:
        return described(region) and getattr(region, self.writes) is None


def settle(region: RegionRecord) -> None:
    """An optional stage after `merge` finished its part: the region is `ok` (again)."""
    region.status, region.error = "ok", None


def clean_caption(text: str) -> str:
    """Model text to a caption: markdown, "Here is ...:" preambles, leading labels and wrapping quotes
    removed, whitespace collapsed (stages/answers.py `strip_answer`); empty when nothing else is left."""
    return strip_answer(text)


def _excerpt(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")
