"""What every stage shares: the prompt template, the per-region context, and the stage contract.

A stage is one file that says three things: which regions it takes (`wants`), what it sends to the
model for one region (`build_request`) and how it reads the answer into the region (`apply`).
Stages know the record and the engine interface; they know nothing of Ray or of a concrete engine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict

from annotate.config import CropConfig, SamplingConfig
from annotate.data.crops import RegionViews, region_views
from annotate.data.images import fit_within
from annotate.data.masks import decode_rle
from annotate.data.records import ImageRecord, RegionRecord
from annotate.engines.base import ChatRequest, ChatResult

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
        )

    def messages(self, fields: dict[str, Any], images: dict[str, Image.Image]) -> list[dict[str, Any]]:
        """OpenAI-style messages; image parts use the engines' neutral `{"type": "image"}` form."""
        content: list[dict[str, Any]] = [{"type": "image", "image": images[name]} for name in self.images]
        content.append({"type": "text", "text": _compiled(self.user).render(**fields)})
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": _compiled(self.system).render(**fields)})
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

    @property
    def views(self) -> RegionViews:
        if self._views is None:
            if self.image is None or self.region.mask is None:
                raise ValueError("this region has no decoded image or mask")
            mask = decode_rle(self.region.mask).astype(bool)
            self._views = region_views(self.image, mask, self.region.bbox, self.crops)
        return self._views

    def image_part(self, name: str) -> Image.Image:
        """The named image a template asks for: image | highlighted | crop | crop_mask."""
        if name == "image":
            return _fit(self.image, self.crops.max_side)
        if name in ("highlighted", "crop", "crop_mask"):
            return _fit(getattr(self.views, name), self.crops.max_side)
        raise ValueError(f"prompt asks for unknown image {name!r} (image, highlighted, crop, crop_mask)")

    def box_norm(self) -> list[int]:
        """[x1, y1, x2, y2] on a 0-1000 grid, the convention of grounding VLMs (Griffon, Qwen-VL)."""
        x, y, w, h = self.region.bbox
        W, H = self.record.width, self.record.height
        return [round(1000 * x / W), round(1000 * y / H), round(1000 * (x + w) / W), round(1000 * (y + h) / H)]


def _fit(image: Image.Image | None, max_side: int) -> Image.Image:
    if image is None:
        raise ValueError("image is missing")
    return fit_within(image, max_side)


class StageParams(BaseModel):
    """A stage's own settings (`params:` of its entry in the pipeline file); a stage with some
    subclasses this. Unknown keys are errors, as everywhere in the config tree."""

    model_config = ConfigDict(extra="forbid")


class Stage:
    """Base of the stages. Subclasses set `name` and `writes` and implement wants/fields/apply; their
    order is the chain's (stages/chain.py)."""

    name: ClassVar[str]
    writes: ClassVar[str]  # the region field this stage fills in (cleared again when the region is retried)
    Params: ClassVar[type[StageParams]] = StageParams

    def __init__(self, prompt: PromptTemplate, sampling: SamplingConfig, model_id: str,
                 params: dict[str, Any] | None = None):
        self.prompt = prompt
        self.sampling = sampling
        self.model_id = model_id
        self.params = self.Params.model_validate(params or {})

    def wants(self, region: RegionRecord) -> bool:
        raise NotImplementedError

    def without_model(self, region: RegionRecord) -> bool:
        """Settle a wanted region that needs no model call (e.g. nothing left to check); True when done."""
        return False

    def fields(self, ctx: RegionContext) -> dict[str, Any]:
        """Template variables for one region."""
        raise NotImplementedError

    def apply(self, region: RegionRecord, result: ChatResult) -> str | None:
        """Write a successful result into the region; return why the answer is unusable, else None."""
        raise NotImplementedError

    def build_request(self, ctx: RegionContext) -> ChatRequest:
        images = {name: ctx.image_part(name) for name in self.prompt.images}
        return ChatRequest(
            messages=self.prompt.messages(self.fields(ctx), images),
            sampling=self.sampling,
            json_schema=self.prompt.json_schema,
            request_id=ctx.region.region_id,
        )

    def record_provenance(self, region: RegionRecord, result: ChatResult) -> None:
        prov = region.provenance.of(self.name)
        prov.model = self.model_id
        prov.prompt_version = self.prompt.version
        prov.prompt_tokens += result.prompt_tokens
        prov.completion_tokens += result.completion_tokens

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
    """Model text to a caption: whitespace collapsed, wrapping quotes removed."""
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text
