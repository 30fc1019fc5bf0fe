"""The Ray Data source of a run: a read task per shard turns work items into batches of rows.

For the first stage the input is the `prepare` output, made in the read task from the source shard
when it is not finished yet; `--retry-failed` puts failed regions back to `pending` here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from annotate.config import DataConfig
from annotate.data.prepare import prepare_shard
from annotate.data.shards import ShardRef
from annotate.data.writer import ShardWriter
from annotate.executor.layout import MODEL_STAGE_PREFIXES, RunLayout
from annotate.executor.shard_io import count_rows, iter_stored_records, record_to_row


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
