"""The Ray Data operators of a run: a shard source, and one worker class that runs any stage.

Both take and return `pyarrow.Table` batches of the flat rows defined in `shard_io`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from annotate.config import DataConfig, SegmentConfig, StageConfig
from annotate.data.images import ImageError, decode_image
from annotate.data.prepare import prepare_shard
from annotate.data.shards import ShardRef
from annotate.executor.layout import MODEL_STAGE_PREFIXES, RunLayout
from annotate.executor.progress import StageMetrics
from annotate.data.writer import ShardWriter
from annotate.executor.shard_io import (
    count_rows,
    iter_stored_records,
    record_to_row,
    row_to_record,
)
from annotate.serving.apps import ModelApp
from annotate.serving.client import ModelClient
from annotate.stages import PromptTemplate, stage_class
from annotate.stages.batch import run_stage_async
from annotate.stages.segment import segment_records

# The fields each stage writes, in chain order: a retry clears the failed stage's field and all later ones.
STAGE_FIELDS = (("object", "object_caption"), ("validate", "validation"), ("context", "context_caption"), ("merge", "fine_caption"))


def reset_for_retry(record) -> int:
    """Put regions that a model stage failed back to `pending`; data-plane failures stay failed."""
    reset = 0
    for region in record.regions:
        if region.status != "failed" or not (region.error or "").startswith(MODEL_STAGE_PREFIXES):
            continue
        failed_stage = region.error.split(":", 1)[0]
        names = [name for name, _ in STAGE_FIELDS]
        for _, field in STAGE_FIELDS[names.index(failed_stage):]:
            setattr(region, field, None)
        region.status, region.error = "pending", None
        reset += 1
    return reset


def prepare_output(shard: ShardRef, data: DataConfig, layout: RunLayout, fingerprint: str) -> None:
    """Run the data plane over one source shard and store it as the `prepare` output."""
    writer = ShardWriter(layout.output_path("prepare", shard.name))
    try:
        for prepared in prepare_shard(shard, data):
            writer.add(prepared.record)
    except BaseException:
        writer.abort()
        raise
    stats = writer.commit()
    layout.record_finished({"output": "prepare", "shard": shard.name, "config": fingerprint, "sha256": stats.sha256,
                            **stats.summary()})


def read_shard(batch: pa.Table, *, data: DataConfig, layout_root: str, fingerprint: str, rows_per_batch: int) -> Iterator[pa.Table]:
    """Ray Data task: turn work items (one per shard) into batches of rows from their stored input.

    For the first stage the input is the `prepare` output, made here from the source shard when it is
    not finished yet, so the data plane of many shards runs in parallel on the cluster.
    """
    layout = RunLayout(root=Path(layout_root))
    for item in batch.to_pylist():
        if item["needs_prepare"]:
            ref = ShardRef(shard_id=item["shard_id"], name=item["shard"], path=Path(item["source_path"]),
                           format=item["source_format"])
            prepare_output(ref, data, layout, fingerprint)
        path = layout.output_path(item["input"], item["shard"])
        total = count_rows(path)
        rows: list[dict] = []
        for record in iter_stored_records(path, rows_per_batch):
            if item["retry_failed"]:
                reset_for_retry(record)
            rows.append(record_to_row(record, total))
            if len(rows) >= rows_per_batch:
                yield pa.Table.from_pylist(rows)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows)


class StageWorker:
    """A Ray Data actor that runs one stage against its model's Serve deployment.

    `__call__` is a coroutine: Ray Data runs `run.batches_in_flight` batches on one worker at once,
    and within a batch every region is its own request, so the next batch's requests are queued at the
    engine while the last batch's slowest answer is still being generated.
    """

    def __init__(self, stage_name: str, stage: StageConfig, app: ModelApp, reasoning: bool, max_in_flight: int,
                 data: DataConfig, tracker):
        cls = stage_class(stage_name, stage.stage_class)
        self.stage = cls(PromptTemplate.load(stage.prompt), stage.sampling, app.model_id)
        self.config = stage
        self.data = data
        self.client = ModelClient(app, reasoning, max_in_flight)
        self.tracker = tracker
        self.metrics = StageMetrics(stage_name)
        self.needs_pixels = bool(self.stage.prompt.images)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        items = []
        for row in rows:
            record = row_to_record(row)
            items.append((record, decode_or_none(record, self.data) if self.needs_pixels else None))
        counts = await run_stage_async(
            self.stage, items, self.client.chat, self.data.crops, self.config.max_attempts, self.config.retry_temperature
        )
        self.metrics.record(counts)
        self.tracker.report.remote(self.stage.name, counts.__dict__ | {"latencies": []})
        return pa.Table.from_pylist([record_to_row(record, row["shard_total"]) for (record, _), row in zip(items, rows)])


class SegmentWorker:
    """A Ray Data actor running the optional segment stage against the SAM deployment."""

    def __init__(self, segment: SegmentConfig, app: ModelApp, data: DataConfig):
        from ray import serve

        self.config = segment
        self.data = data
        self.handle = serve.get_deployment_handle(app.deployment_name, app.app_name)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        items = [(record, decode_or_none(record, self.data)) for record in map(row_to_record, rows)]
        await segment_records(self.handle.segment.remote, items, self.config)
        return pa.Table.from_pylist([record_to_row(record, row["shard_total"]) for (record, _), row in zip(items, rows)])


def decode_or_none(record, data: DataConfig):
    """The record's image, or None when it has none (the data plane already failed its regions)."""
    if not record.image_bytes:
        return None
    try:
        return decode_image(record.image_bytes, data.images)
    except ImageError:
        return None


def finalize_record(record) -> None:
    """Last step before the dataset: a region no stage finished is `failed`, never silently pending."""
    for region in record.regions:
        if region.status == "pending":
            region.status = "failed"
            region.error = "pipeline: the region was not completed by any stage (internal error)"
