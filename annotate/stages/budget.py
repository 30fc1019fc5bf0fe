"""Token budgets, checked when the models are loaded, before any shard is read.

A stage whose longest prompt plus its `max_tokens` does not fit the model's context fails every
region that gets near that size, hours into a run. So at load time each stage renders its worst-case
request and the model's own deployment counts it (vLLM's renderer: chat template, image processor,
dynamic tiling; the `hf` engine: its prompt builder), and the run refuses to start
when a stage does not fit. The worst case:
  * images at every aspect ratio in `ASPECT_RATIOS`, at `crops.max_side` (the data plane's largest):
    tiling processors (InternVL) make the most tiles at some ratio, not always at a square;
  * model-written fields (object and context captions, the description) as long as their stage's
    `max_tokens`; the negatives' checks get all K candidates, each the description plus an edit;
    `ground` gets every other region of a full image; `part_describe` and `part_verify` get `parts.k`
    parts, one focal crop each;
  * the phrase and the image caption as long as `run.budget_phrase_words` / `budget_caption_words`.
Stop tokens given as strings are checked here too (the stage's own and its model family's,
engines/conventions.py): each must be one token of the model's tokenizer.
The counts go into the run record, where `annotate plan --from-run` reads them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Awaitable, Callable

import numpy as np
from PIL import Image

from annotate.config import PipelineConfig, StageConfig
from annotate.data.masks import encode_rle
from annotate.data.records import HardNegative, ImageRecord, PartRecord, RegionRecord, Verdict
from annotate.engines.base import ChatRequest
from annotate.engines.conventions import effective_stop_tokens
from annotate.stages.base import PromptTemplate, RegionContext
from annotate.stages.chain import build_stage
from annotate.stages.negatives import NegativesParams
from annotate.stages.parts import PartsParams

# width / height. InternVL2's tiling (max 12 tiles + a thumbnail) is largest at 4:3 and 3:4 (a 4 x 3 grid,
# 13 tiles), above a square's 3 x 3 + 1: tests/test_budget_shapes.py checks these hold the maximum.
ASPECT_RATIOS = (1.0, 4 / 3, 0.75, 2.0, 0.5, 3.0, 1 / 3, 5.0, 0.2)
FILLER = "the "  # one token in every tokenizer we know (the tiny ones too): a caption of N tokens is about N of these

# (messages) -> {"count", "max_model_len"} or {"error"}, and (token) -> id, both answered by the model
Counter = Callable[[ChatRequest], Awaitable[dict]]
TokenLookup = Callable[[str], Awaitable[int]]


@dataclass
class StageBudget:
    stage: str
    model: str
    prompt_tokens: int  # the worst case over the shapes tried
    max_tokens: int
    max_model_len: int | None
    worst_image: str  # "WxH" of the images in the worst case ("" when the prompt has none)

    @property
    def fits(self) -> bool:
        return self.max_model_len is None or self.prompt_tokens + self.max_tokens <= self.max_model_len

    def describe(self) -> str:
        limit = "no known limit" if self.max_model_len is None else f"max_model_len {self.max_model_len:,}"
        images = f", images {self.worst_image}" if self.worst_image else ""
        return (f"{self.stage} ({self.model}): worst-case prompt {self.prompt_tokens:,} tokens{images} + max_tokens "
                f"{self.max_tokens:,} = {self.prompt_tokens + self.max_tokens:,}; {limit}")

    def as_dict(self) -> dict:
        return asdict(self)


class BudgetError(ValueError):
    """A stage's worst-case request does not fit its model, or a stop token is unknown to it."""


def image_shapes(max_side: int) -> list[tuple[int, int]]:
    """The image sizes tried: every ratio of ASPECT_RATIOS with its long side at `max_side`."""
    shapes = []
    for ratio in ASPECT_RATIOS:
        w, h = (max_side, round(max_side / ratio)) if ratio >= 1 else (round(max_side * ratio), max_side)
        shapes.append((max(16, w), max(16, h)))
    return shapes


def worst_case_request(cfg: PipelineConfig, stage_name: str, width: int, height: int) -> ChatRequest:
    """The stage's request for a region covering a `width` x `height` image, with every text field at
    its longest (see the module docstring)."""
    stage_cfg = cfg.stages[stage_name]
    stage = build_stage(stage_name, stage_cfg, "", cfg.models[stage_cfg.model])

    def text(stage_or_words: str | int) -> str:
        words = stage_or_words if isinstance(stage_or_words, int) else (
            cfg.stages[stage_or_words].sampling.max_tokens if stage_or_words in cfg.stages else 0)
        return (FILLER * words).strip()

    record = ImageRecord(image_key="budget", shard="budget", width=width, height=height,
                         caption=text(cfg.run.budget_caption_words))
    mask = encode_rle(np.ones((height, width), dtype=np.uint8))
    regions = [RegionRecord(region_id=f"budget:budget:{i}", region_index=i, phrase=text(cfg.run.budget_phrase_words),
                            bbox=[0.0, 0.0, float(width), float(height)], mask=mask, mask_source="given")
               for i in range(cfg.data.regions.max_regions_per_image)]  # ground lists the image's other regions
    record.regions = regions
    region = regions[0]
    region.object_caption, region.context_caption = text("object"), text("context")
    # The stages after merge: the description at merge's longest, and (negatives) every candidate
    # as long as the description plus an edit, all passed by the text check.
    region.fine_caption = text("merge")
    k = NegativesParams.model_validate(cfg.stages["negatives"].params).k if "negatives" in cfg.stages else 0
    edited = f"{region.fine_caption} {text(NegativesParams().max_span_words)}"
    region.negative_candidates = [HardNegative(text=edited, edit_type="colour", start=0, end=0, replacement="",
                                               contradiction=Verdict(holds=True, reason="")) for _ in range(k)]
    # The part stages: k kept parts, each described (part_verify shows the described ones), so that
    # part_describe and part_verify send their most images: the prompt's own and one focal crop per part.
    k = PartsParams.model_validate(cfg.stages["parts"].params).k if "parts" in cfg.stages else 0
    region.parts = [PartRecord(part_id=f"{region.region_id}:p{i}", name=text(cfg.run.budget_phrase_words),
                               visibility="full", bbox=[0.0, 0.0, float(width), float(height)], mask=mask, kept=True,
                               short_caption=text("part_describe"), long_caption=text("part_describe"))
                    for i in range(k)]
    if stage_name == "part_describe":
        for part in region.parts:
            part.short_caption = part.long_caption = None
    image = Image.new("RGB", (width, height), (127, 127, 127))
    return stage.build_request(RegionContext(record=record, region=region, image=image, crops=cfg.data.crops))


async def stage_budget(cfg: PipelineConfig, stage_name: str, count: Counter) -> StageBudget:
    """Count the stage's worst case over the image shapes (one shape when its prompt has no image)."""
    stage_cfg: StageConfig = cfg.stages[stage_name]
    has_images = bool(PromptTemplate.load(stage_cfg.prompt).images)
    shapes = image_shapes(cfg.data.crops.max_side) if has_images else [(64, 64)]
    worst: tuple[int, str] = (-1, "")
    limit = None
    for width, height in shapes:
        answer = await count(worst_case_request(cfg, stage_name, width, height))
        if "error" in answer:
            raise BudgetError(f"stage {stage_name}: {stage_cfg.model} could not count its worst-case prompt "
                              f"({width}x{height} images): {answer['error'].get('message', answer['error'])}")
        limit = answer.get("max_model_len")
        if answer["count"] > worst[0]:
            worst = (answer["count"], f"{width}x{height}" if has_images else "")
    return StageBudget(stage=stage_name, model=stage_cfg.model, prompt_tokens=worst[0],
                       max_tokens=stage_cfg.sampling.max_tokens, max_model_len=limit, worst_image=worst[1])


async def check_budgets(cfg: PipelineConfig, chain: tuple[str, ...], counters: dict[str, Counter],
                        lookups: dict[str, TokenLookup]) -> list[StageBudget]:
    """Every stage of `chain` fits its model and names stop tokens its tokenizer knows, or BudgetError
    naming each problem and what to change."""
    budgets, problems = [], []
    for name in chain:
        stage_cfg = cfg.stages[name]
        for token in effective_stop_tokens(stage_cfg.sampling, cfg.models[stage_cfg.model]):
            if isinstance(token, str):
                try:
                    await lookups[stage_cfg.model](token)
                except ValueError as exc:
                    problems.append(f"stage {name}: {exc}")
        budget = await stage_budget(cfg, name, counters[stage_cfg.model])
        budgets.append(budget)
        if not budget.fits:
            problems.append(f"stage {budget.describe()}: it does not fit. Lower crops.max_side or the stage's "
                            "max_tokens, or raise the model's vllm.max_model_len")
    if problems:
        raise BudgetError("token budget check failed at load time:\n  " + "\n  ".join(problems))
    return budgets
