"""`annotate doctor`: the preflight before a long run. It deploys (or finds) every model of the chain,
sends a handful of real requests per stage, built from the first images of a shard through the stages'
own code (`build_stage`, `run_stage_async` with a `ModelClient`, one attempt, so what the model does is
what is seen), and prints per stage the raw answers, their finish reason and token counts, and what the
stage's rules made of them. It fails (non-zero exit) on an answer cut by `max_tokens` or on a stage
whose regions fail above a threshold, each with what to change.

Not done yet (issue 22): the answer's last token and a stop-token mismatch, and token counts compared
with the planner's assumption (plan.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from annotate.config import PipelineConfig
from annotate.data.records import ImageRecord
from annotate.engines.base import ChatRequest, ChatResult
from annotate.stages.batch import StageCounts, run_stage_async
from annotate.stages.breaker import advice
from annotate.stages.chain import build_stage, chain_of

ChatOne = Callable[[ChatRequest], Awaitable[ChatResult]]


@dataclass
class Exchange:
    request_id: str
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None


@dataclass
class StageCheck:
    stage: str
    model: str
    max_tokens: int
    counts: StageCounts
    exchanges: list[Exchange] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)  # per region: status, and error or the stored field
    problems: list[str] = field(default_factory=list)


@dataclass
class DoctorReport:
    stages: list[StageCheck] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [p for s in self.stages for p in s.problems]

    @property
    def ok(self) -> bool:
        return not self.problems


def first_items(cfg: PipelineConfig, input_dir: str | Path, shard_id: int, images: int, regions: int):
    """The first `images` images of a shard that have regions, each with at most `regions` regions, as
    (record, decoded image) pairs: what a stage worker holds."""
    from annotate.data.prepare import prepare_shard
    from annotate.data.shards import find_shards

    (ref,) = find_shards(Path(input_dir), [shard_id], cfg.data.shard_format)
    items: list[tuple[ImageRecord, object]] = []
    for prepared in prepare_shard(ref, cfg.data):
        record = prepared.record
        wanted = [r for r in record.regions if r.status == "pending"][:regions]
        if prepared.image is None or not wanted:
            continue
        record.regions = wanted
        items.append((record, prepared.image))
        if len(items) >= images:
            break
    return items


async def check_stages(cfg: PipelineConfig, items, chats: dict[str, ChatOne], model_ids: dict[str, str],
                       max_failed_share: float = 0.5) -> DoctorReport:
    """Run the chain's stages in order over `items` (changed in place, as a run does), one attempt per
    region, through `chats[model name]`; what each stage saw and what to fix."""
    report = DoctorReport()
    for name in chain_of(cfg):
        stage_cfg = cfg.stages[name]
        model = cfg.models[stage_cfg.model]
        stage = build_stage(name, stage_cfg, model_ids.get(stage_cfg.model, model.path), model)
        seen: list[ChatResult] = []
        chat = chats[stage_cfg.model]

        async def recorded(request: ChatRequest, chat=chat, seen=seen) -> ChatResult:
            result = await chat(request)
            seen.append(result)
            return result

        pixels = items if stage.prompt.images else [(record, None) for record, _ in items]
        counts = await run_stage_async(stage, pixels, recorded, cfg.data.crops, max_attempts=1)
        check = StageCheck(name, stage_cfg.model, stage_cfg.sampling.max_tokens, counts)
        check.exchanges = [Exchange(r.request_id, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens,
                                    r.error) for r in seen]
        for record, _ in items:
            for region in record.regions:
                if stage.writes and region.status != "failed" and getattr(region, stage.writes, None) is not None:
                    check.outcomes.append(f"{region.region_id}: {region.status}: {stage.writes} = "
                                          f"{_short(getattr(region, stage.writes))}")
                elif region.status == "failed" and region.error and region.error.startswith(f"{name}:"):
                    check.outcomes.append(f"{region.region_id}: failed: {region.error[:200]}")
        cut = [r for r in seen if r.finish_reason == "length"]
        if cut:
            check.problems.append(
                f"{name}: {len(cut)} of {len(seen)} answers cut by max_tokens ({stage_cfg.sampling.max_tokens}, "
                f"finish_reason length): raise stages.{name}.sampling.max_tokens, or check the model's stop "
                "tokens (a stop token the model never emits lets it run on)")
        asked = counts.regions_in
        if asked and counts.failed / asked > max_failed_share:
            kind, n = max(counts.failures_by_kind.items(), key=lambda kv: kv[1])
            check.problems.append(
                f"{name}: {counts.failed} of {asked} regions failed (most: {n} `{kind}`); check {advice(kind)}")
        report.stages.append(check)
    return report


def _short(value, n: int = 160) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[:n] + "..."


def run_doctor(cfg: PipelineConfig, input_dir: str | Path, shard_id: int = 0, address: str | None = None,
               images: int = 2, regions: int = 2, max_failed_share: float = 0.5,
               on_event: Callable[[str], None] = print) -> DoctorReport:
    """Deploy (or find) the chain's models and check every stage on the first images of a shard."""
    from annotate.cluster import ensure_ray
    from annotate.serving.apps import ensure_apps, needed_models
    from annotate.serving.client import ModelClient

    chain = chain_of(cfg)
    items = first_items(cfg, input_dir, shard_id, images, regions)
    if not items:
        raise ValueError(f"shard {shard_id} of {input_dir} has no image with regions to ask about")
    ensure_ray(cfg.run, address)
    models = {n: m for n, m in needed_models(cfg, chain).items() if n in cfg.models}  # no SAM: not a chat model
    apps = ensure_apps(models, cfg.run, on_event=on_event)

    async def main() -> DoctorReport:
        chats = {}
        for name, app in apps.items():
            deadline = max(cfg.stages[s].request_deadline_s() for s in chain if cfg.stages[s].model == name)
            chats[name] = ModelClient(app, cfg.models[name].reasoning, max_in_flight=8, deadline_s=deadline).chat
        return await check_stages(cfg, items, chats, {n: a.model_id for n, a in apps.items()}, max_failed_share)

    return asyncio.run(main())


def describe(report: DoctorReport, answers_per_stage: int = 3) -> str:
    """The report as text: per stage, raw answers with finish reason and tokens, what the rules made of
    each region, and the problems with what to change."""
    lines = []
    for check in report.stages:
        c = check.counts
        lines.append(f"== {check.stage} (model {check.model}, max_tokens {check.max_tokens}): {c.regions_in} regions, "
                     f"{c.done} answered ({c.rejected} rejected), {c.failed} failed"
                     + (f" {dict(c.failures_by_kind)}" if c.failures_by_kind else ""))
        for ex in check.exchanges[:answers_per_stage]:
            what = f"error: {ex.error[:200]}" if ex.error else repr(_short(ex.text, 300))
            lines.append(f"  answer {ex.request_id}: finish {ex.finish_reason}, tokens {ex.prompt_tokens} prompt + "
                         f"{ex.completion_tokens} completion: {what}")
        lines += [f"  region {o}" for o in check.outcomes[:answers_per_stage]]
        lines += [f"  PROBLEM {p}" for p in check.problems]
    lines.append("doctor: all stages answered as they should" if report.ok
                 else f"doctor: {len(report.problems)} problem(s); fix them before a long run")
    return "\n".join(lines)
