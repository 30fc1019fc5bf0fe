"""The chain: the stages in order, the region field each writes, which stored output each `--stage`
reads and writes, the reset of failed regions for `--retry-failed`, and the last step before the
dataset, and `run_chain`, the one function that runs a chain over a batch of records (the executor's
chain worker and the benchmarks' direct side both call it). All of it is derived from the stage
classes below, in one place.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from annotate.config import ENGINE_KINDS, CropConfig, ModelConfig, PipelineConfig, QualityConfig, StageConfig
from annotate.data.records import ImageRecord
from annotate.data.store import FINAL, PREPARE
from annotate.engines.base import ChatRequest, ChatResult
from annotate.engines.conventions import conventions_of, effective_sampling
from annotate.stages.base import PromptTemplate, Stage
from annotate.stages.batch import StageCounts, run_stage
from annotate.stages.context import ContextStage
from annotate.stages.ground import GroundStage
from annotate.stages.merge import MergeStage
from annotate.stages.negatives import NegativesStage, NegativesTextStage, NegativesVisualStage
from annotate.stages.object import ObjectStage
from annotate.stages.part_describe import PartDescribeStage
from annotate.stages.part_verify import PartVerifyStage
from annotate.stages.parts import PartsStage
from annotate.stages.quality import assess
from annotate.stages.summarize import SummarizeStage
from annotate.stages.validate import ValidateStage

# The chain, in order: the paper's four stages, then the optional ones that add fields to a finished
# description. A new stage is a class here; everything below follows from this tuple.
STAGE_CLASSES: dict[str, type[Stage]] = {cls.name: cls for cls in (
    ObjectStage, ValidateStage, ContextStage, MergeStage,
    SummarizeStage, GroundStage, NegativesStage, NegativesTextStage, NegativesVisualStage,
    PartsStage, PartDescribeStage, PartVerifyStage)}
STAGE_ORDER: tuple[str, ...] = tuple(STAGE_CLASSES)
# Every pipeline runs these; the others run when the pipeline file defines them.
CORE_STAGES: tuple[str, ...] = ("object", "validate", "context", "merge")
# Stages that only make sense together: proposing hard negatives and the two checks that keep them;
# naming parts, describing them and checking them.
STAGE_GROUPS: tuple[tuple[str, ...], ...] = (("negatives", "negatives_text", "negatives_visual"),
                                             ("parts", "part_describe", "part_verify"))
# The region field each stage fills in, in chain order: a retry clears the failed stage's and all later ones
# (each stage's `clear`: the part stages share `parts`, and each clears only its own part of it).
STAGE_FIELDS: tuple[tuple[str, str], ...] = tuple((name, cls.writes) for name, cls in STAGE_CLASSES.items())
# Region errors `--retry-failed` redoes: a model stage's, and `pipeline:` (no stage completed the region).
PIPELINE_ERROR = "pipeline"
RETRYABLE_PREFIXES: tuple[str, ...] = tuple(f"{name}:" for name in (*STAGE_ORDER, PIPELINE_ERROR))


@dataclass(frozen=True)
class StageIO:
    """What one `annotate run --stage` reads, writes and runs."""

    reads: str  # a stored output: `prepare` or a stage's
    writes: str  # a stage's stored output, or FINAL (the dataset)
    stages: tuple[str, ...]


def chain_of(cfg: PipelineConfig) -> tuple[str, ...]:
    """The stages a pipeline file runs, in chain order: the core ones and the optional ones it defines."""
    return tuple(name for name in STAGE_ORDER if name in CORE_STAGES or name in cfg.stages)


def stage_io(stage: str, chain: tuple[str, ...] = CORE_STAGES) -> StageIO:
    """`all` runs the whole `chain` from `prepare` to the dataset; one stage reads the output of the
    stage before it and writes its own (the chain's last one writes the dataset)."""
    if stage == "all":
        return StageIO(PREPARE, FINAL, chain)
    if stage not in chain:
        raise ValueError(f"unknown stage {stage!r}; choose one of all, {', '.join(chain)}"
                         + ("" if stage not in STAGE_CLASSES else " (define it in the pipeline file to run it)"))
    i = chain.index(stage)
    return StageIO(chain[i - 1] if i else PREPARE, FINAL if i == len(chain) - 1 else stage, (stage,))


def stage_writing(output: str, chain: tuple[str, ...] = CORE_STAGES) -> str | None:
    """The `--stage` whose run writes `output` (None for `prepare`, which the data plane writes)."""
    return next((name for name in chain if stage_io(name, chain).writes == output), None)


# Every output a run can store, whatever its chain: `prepare`, each stage's own, the dataset.
STORED_OUTPUTS: tuple[str, ...] = (PREPARE, *STAGE_ORDER[:-1], FINAL)


def check_stages(cfg: PipelineConfig, stages: Iterable[str] = CORE_STAGES) -> None:
    """The pipeline file names only stages of the chain, defines every one in `stages`, and defines
    the stages of a group all together or none of them."""
    unknown = [name for name in cfg.stages if name not in STAGE_CLASSES]
    if unknown:
        raise ValueError(f"unknown stage {', '.join(unknown)} in the pipeline file; stages are {', '.join(STAGE_ORDER)}")
    missing = [name for name in stages if name not in cfg.stages]
    if missing:
        raise ValueError(f"the pipeline file defines no stage {', '.join(missing)}")
    for name, stage in cfg.stages.items():
        try:
            stage_class(name, stage.stage_class).Params.model_validate(stage.params)
        except ValueError as exc:
            raise ValueError(f"stage {name}: bad params: {exc}") from None
    for group in STAGE_GROUPS:
        defined = [name for name in group if name in cfg.stages]
        if defined and len(defined) < len(group):
            raise ValueError(f"stages {', '.join(group)} go together; the pipeline file defines only {', '.join(defined)}")
    check_part_images(cfg)


# The stages that send one image per part besides their prompt's own images.
PART_IMAGE_STAGES = ("part_describe", "part_verify")


def focal_crops_per_region(cfg: PipelineConfig, stage: str) -> int:
    """The most focal crops `stage` sends per region besides its prompt's images: the `parts` stage's `k`
    for a stage of PART_IMAGE_STAGES (a region may keep fewer parts), else 0."""
    if stage not in PART_IMAGE_STAGES or "parts" not in cfg.stages:
        return 0
    parts = cfg.stages["parts"]
    return stage_class("parts", parts.stage_class).Params.model_validate(parts.params).k


def check_part_images(cfg: PipelineConfig) -> None:
    """A part stage sends its prompt's images and one focal crop per part, up to the `parts` stage's `k`:
    its model must take that many images in one prompt (vLLM's `limit_mm_per_prompt`), or every region
    with k parts fails at run time."""
    for name in PART_IMAGE_STAGES:
        stage = cfg.stages.get(name)
        k = focal_crops_per_region(cfg, name)
        if stage is None or not k:
            continue
        model = cfg.models[stage.model]
        if ENGINE_KINDS[model.engine].served_by != "llm":  # only vLLM's engine enforces the limit
            continue
        fixed = len(PromptTemplate.load(stage.prompt).images)
        limit = model.vllm.limit_mm_per_prompt.get("image", 1)
        if fixed + k > limit:
            raise ValueError(f"stage {name} sends up to {fixed + k} images ({fixed} of its prompt and one per part, "
                             f"parts.params.k = {k}), but model {stage.model!r} takes {limit} "
                             f"(models.{stage.model}.vllm.limit_mm_per_prompt.image): raise that limit to "
                             f"{fixed + k} or lower k")


def stage_class(name: str, override: str | None = None) -> type[Stage]:
    """The class that runs stage `name`: the built-in one, or `module:Class` from the stage's config."""
    if override is None:
        return STAGE_CLASSES[name]
    module, _, attr = override.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Stage) and cls.name == name):
        raise ValueError(f"stage_class {override!r} must be a Stage subclass named {name!r}")
    return cls


def build_stage(name: str, config: StageConfig, model_id: str, model: ModelConfig | None = None) -> Stage:
    """Stage `name` with its prompt template and sampling, recording `model_id` as its model. The
    model's conventions (`model.family`, engines/conventions.py) shape what the stage sends: the
    family's end-of-turn tokens join the stage's stop tokens, its system prompt is folded into the
    user turn where the model's makers advise it, and a stage that writes a box writes it the model's way."""
    conventions = conventions_of(model)
    return stage_class(name, config.stage_class)(PromptTemplate.load(config.prompt).for_model(conventions),
                                                 effective_sampling(config.sampling, model), model_id, config.params,
                                                 conventions)


def is_retryable(status: str, error: str | None) -> bool:
    """A region `--retry-failed` redoes: failed by a model stage, or by no stage completing it. Takes the
    two fields, so that a stored row is checked without building its RegionRecord."""
    return status == "failed" and (error or "").startswith(RETRYABLE_PREFIXES)


def reset_for_retry(record: ImageRecord) -> int:
    """Put regions that a model stage failed (or that no stage completed: `pipeline:`) back to
    `pending`, with the failed stage's field and all later ones cleared; data-plane failures stay failed."""
    reset = 0
    for region in record.regions:
        if not is_retryable(region.status, region.error):
            continue
        prefix = region.error.split(":", 1)[0]
        # A `pipeline:` region stopped where its first missing field is: redo from that stage on.
        first = STAGE_ORDER.index(prefix) if prefix in STAGE_CLASSES else next(
            (i for i, (_, name) in enumerate(STAGE_FIELDS) if getattr(region, name) is None), 0)
        for cls in list(STAGE_CLASSES.values())[first:]:
            cls.clear(region)
        region.status, region.error = "pending", None
        reset += 1
    return reset


def finalize_record(record: ImageRecord, quality: QualityConfig | None = None) -> None:
    """Last step before the dataset: a region no stage finished is `failed`, never silently pending;
    every described region gets its quality record when the pipeline file asks for one."""
    for region in record.regions:
        if region.status == "pending":
            region.status = "failed"
            region.error = f"{PIPELINE_ERROR}: the region was not completed by any stage (internal error)"
        if quality is not None and region.fine_caption:
            region.quality = assess(region, quality)


class ChainLink(Protocol):
    """One stage of a chain, ready to run over a batch: the executor's `ChainStep` (a served model,
    one request per region in flight) and `direct_links`' (an in-process engine, batch calls) alike."""

    stage: Stage

    async def run(self, items: list[tuple[ImageRecord, Image.Image | None]]) -> StageCounts: ...


async def run_chain(links: Sequence[ChainLink], records: list[ImageRecord],
                    decode: Callable[[ImageRecord], Image.Image | None],
                    report: Callable[[str, StageCounts], Awaitable[None]] | None = None) -> dict[str, StageCounts]:
    """The one way a chain runs, in the executor's chain worker and in the benchmarks' direct side:
    each record's image decoded once (when a stage's prompt shows pixels), then every link in chain
    order over the whole batch, in place. `report(stage, counts)` is awaited after each stage (the
    executor's tracker: bars and breaker). Records are not finalised here: the run's driver does
    that once per record, after every stage of every `--stage` run (`finalize_record`)."""
    pixels = any(link.stage.prompt.images for link in links)
    items = [(record, decode(record) if pixels else None) for record in records]
    totals: dict[str, StageCounts] = {}
    for link in links:
        counts = totals[link.stage.name] = await link.run(items)
        if report is not None:
            await report(link.stage.name, counts)
    return totals


@dataclass
class DirectLink:
    """A stage against a batch engine in this process (`chat(requests) -> results`), in its batch size:
    the benchmarks' direct side, with no Ray and no Serve."""

    stage: Stage
    config: StageConfig
    chat: Callable[[list[ChatRequest]], list[ChatResult]]
    crops: CropConfig

    async def run(self, items) -> StageCounts:
        counts = StageCounts()
        for start in range(0, len(items), self.config.batch_size):
            counts.add(run_stage(self.stage, items[start:start + self.config.batch_size], self.chat, self.crops,
                                 self.config.max_attempts, self.config.retry_temperature))
        return counts


def direct_links(cfg: PipelineConfig, chat: Callable[[str], Callable[[list[ChatRequest]], list[ChatResult]]],
                 stages: Iterable[str] | None = None) -> list[DirectLink]:
    """The chain of `cfg` (or `stages`) against in-process engines, `chat(model_key)` giving each
    model's batch call."""
    links = []
    for name in chain_of(cfg) if stages is None else stages:
        config = cfg.stages[name]
        model = cfg.models[config.model]
        links.append(DirectLink(build_stage(name, config, model.paper_model or model.path, model), config,
                                chat(config.model), cfg.data.crops))
    return links
