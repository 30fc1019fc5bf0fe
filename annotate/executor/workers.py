"""The Ray Data actors of a run: the chain worker, which runs every stage of the chain over a batch
of images, and the segment worker.

Both take and return `pyarrow.Table` batches of the flat rows defined in `shard_io`. A record is
parsed once and its image decoded once per batch, however many stages it goes through: the chain runs
in one actor (`stages.chain.run_chain`, which the benchmarks' direct side calls too), so a record never
travels between stages as a row.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pyarrow as pa

from annotate.config import DataConfig, ModelConfig, SegmentConfig, StageConfig
from annotate.data.images import ImageError, decode_image
from annotate.engines.result_cache import CallTally, ResultCache, counting, model_fingerprint
from annotate.executor.progress import StageMetrics
from annotate.executor.shard_io import record_to_row, row_to_record
from annotate.serving.apps import ModelApp
from annotate.serving.client import ModelClient
from annotate.stages.batch import StageCounts, run_stage_async
from annotate.stages.chain import build_stage, run_chain
from annotate.stages.lineage import LineageKey
from annotate.stages.segment import segment_records


@dataclass
class StepSpec:
    """What a chain worker needs to run one stage: its config, its model's deployment and settings."""

    stage_name: str
    stage: StageConfig
    app: ModelApp
    model: ModelConfig | None = None
    lineage: LineageKey | None = None  # the stage's key in this run (stages/lineage.py)
    segment: ModelApp | None = None  # the SAM deployment, for a stage that `uses_segment` in a run that has one

    @property
    def model_key(self) -> str:
        return self.stage.model


class ChainStep:
    """One stage inside a chain worker: its prompt and conventions, its model client (with the stage's
    deadline: a hung replica costs a retryable `timeout`, not a stalled run), its result cache and metrics."""

    def __init__(self, spec: StepSpec, data: DataConfig, limit: asyncio.Semaphore | None = None,
                 cache_root: str | None = None):
        stage, app, model = spec.stage, spec.app, spec.model
        self.stage = build_stage(spec.stage_name, stage, app.model_id, model)  # the model's conventions shape requests
        self.config = stage
        self.data = data
        reasoning = bool(model.reasoning) if model is not None else False
        self.client = ModelClient(app, reasoning, app.max_in_flight, deadline_s=stage.request_deadline_s(), limit=limit)
        self.metrics = StageMetrics(spec.stage_name)
        # OUT/cache (OutputStore.cache_root): finished model results, so a rerun replays them. None: off.
        # The model's own settings key the results when given; else its deployment's name, which
        # covers every setting but changes with the replica count too.
        # With the stage's lineage (a run), its weights, prompt and sampling key the results, so an answer
        # of replaced weights or another prompt is never replayed.
        settings = model.model_dump(mode="json") if model is not None else {"app": app.app_name}
        fingerprint = (spec.lineage.answer_digest if spec.lineage is not None
                       else model_fingerprint(app.model_id, {**settings, "reasoning": reasoning}))
        self.cache = ResultCache(cache_root, spec.stage_name, fingerprint) if cache_root else None
        self.stage.lineage = spec.lineage.digest if spec.lineage is not None else None
        if spec.segment is not None:
            self.stage.segment = segment_call(spec.segment)

    async def run(self, items) -> StageCounts:
        """The stage over a batch, each shard's regions through that shard's stored results (a batch
        may hold images of several shards)."""
        tally = CallTally()
        by_shard: dict[str, list] = {}
        for item in items:
            by_shard.setdefault(item[0].shard, []).append(item)
        parts = await asyncio.gather(*(
            run_stage_async(self.stage, shard_items, self._chat(shard, tally), self.data.crops,
                            self.config.max_attempts, self.config.retry_temperature)
            for shard, shard_items in by_shard.items()))
        counts = StageCounts()
        for part in parts:
            counts.add(part)
        counts.model_calls, counts.replayed = tally.model_calls, tally.replayed
        return counts

    def _chat(self, shard: str, tally: CallTally):
        if self.cache is None:
            return counting(self.client.chat, tally)
        return self.cache.wrap(shard, self.client.chat, tally)


class ChainWorker:
    """A Ray Data actor that runs the whole chain (or, for `--stage X`, a chain of one) over a batch of
    images: each record parsed once and its image decoded once, then every stage in order, each
    region of the batch its own request within the stage.

    `__call__` is a coroutine: Ray Data runs `run.batches_in_flight` batches on one worker at once, at
    different stages, so every model's engine is fed while a batch waits on another. A model's
    requests from this worker are bounded by one semaphore, its in-flight share, whichever stage sends
    them. Each stage's counts go to the tracker per batch, which feeds the bars and the breaker.
    """

    def __init__(self, steps: list[StepSpec], shares: dict[str, int], data: DataConfig, tracker,
                 cache_root: str | None = None):
        limits = {key: asyncio.Semaphore(max(1, n)) for key, n in shares.items()}
        self.steps = [ChainStep(spec, data, limits.get(spec.model_key), cache_root) for spec in steps]
        self.data = data
        self.tracker = tracker
        self.metrics = {step.stage.name: step.metrics for step in self.steps}

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        records = [row_to_record(row) for row in rows]
        await run_chain(self.steps, records, lambda record: decode_or_none(record, self.data), self._report)
        return pa.Table.from_pylist([record_to_row(record, row["shard_total"]) for record, row in zip(records, rows)])

    async def _report(self, stage: str, counts: StageCounts) -> None:
        self.metrics[stage].record(counts)
        # Awaited, so the driver's last look at the tracker sees this batch once it holds the batch.
        await self.tracker.report.remote(stage, counts.__dict__ | {"latencies": []})


class SegmentWorker:
    """A Ray Data actor running the optional segment stage against the SAM deployment."""

    def __init__(self, segment: SegmentConfig, app: ModelApp, data: DataConfig):
        self.config = segment
        self.data = data
        self.segment = segment_call(app)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        items = [(record, decode_or_none(record, self.data)) for record in map(row_to_record, rows)]
        await segment_records(self.segment, items, self.config)
        return pa.Table.from_pylist([record_to_row(record, row["shard_total"]) for (record, _), row in zip(items, rows)])


def segment_call(app: ModelApp):
    """The SAM deployment's `segment` as a coroutine function, at most its in-flight cap at once from
    this worker (stages/segment.py `SegmentFn`)."""
    from ray import serve

    handle = serve.get_deployment_handle(app.deployment_name, app.app_name)
    limit = asyncio.Semaphore(max(1, app.max_in_flight))

    async def segment(image, boxes_xyxy, points=None):
        async with limit:
            return await handle.segment.remote(image, boxes_xyxy, points)
    return segment


def decode_or_none(record, data: DataConfig):
    """The record's image, or None when it has none (the data plane already failed its regions)."""
    if not record.image_bytes:
        return None
    try:
        return decode_image(record.image_bytes, data.images)
    except ImageError:
        return None

