"""The Ray Data source of a run: a read task per shard turns work items into batches of rows.

For the first stage the input is the `prepare` output, made in the read task from the source shard
when it is not finished yet (its manifest line goes to the driver, the manifest's one writer, through
the `ShardLedger` actor); `--retry-failed` puts failed regions back to `pending` here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import ray

from annotate.config import DataConfig
from annotate.data.prepare import ShardStats, prepare_shard
from annotate.data.shards import ShardRef
from annotate.data.store import PREPARE, OutputStore
from annotate.stages.chain import RETRYABLE_PREFIXES
from annotate.data.store import count_rows, iter_stored_records
from annotate.executor.shard_io import record_to_row


# The fields each stage writes, in chain order: a retry clears the failed stage's field and all later ones.
STAGE_FIELDS = (("object", "object_caption"), ("validate", "validation"), ("context", "context_caption"), ("merge", "fine_caption"))


def reset_for_retry(record) -> int:
    """Put regions that a model stage failed (or that no stage completed: `pipeline:`) back to
    `pending`; data-plane failures stay failed."""
    reset = 0
    names = [name for name, _ in STAGE_FIELDS]
    for region in record.regions:
        if region.status != "failed" or not (region.error or "").startswith(RETRYABLE_PREFIXES):
            continue
        prefix = region.error.split(":", 1)[0]
        # A `pipeline:` region stopped where its first missing field is: redo from that stage on.
        first = names.index(prefix) if prefix in names else next(
            (i for i, (_, field) in enumerate(STAGE_FIELDS) if getattr(region, field) is None), 0)
        for _, field in STAGE_FIELDS[first:]:
            setattr(region, field, None)
        region.status, region.error = "pending", None
        reset += 1
    return reset


@ray.remote(num_cpus=0)
class ShardLedger:
    """Read tasks hand the driver the manifest lines of the `prepare` outputs they made, so that the
    driver stays the manifest's one writer (see layout.py)."""

    def __init__(self) -> None:
        self._lines: list[dict] = []

    def add(self, line: dict) -> None:
        self._lines.append(line)

    def drain(self) -> list[dict]:
        lines, self._lines = self._lines, []
        return lines


def prepare_output(shard: ShardRef, data: DataConfig, layout: OutputStore, fingerprint: str) -> dict:
    """Run the data plane over one source shard and store it as the `prepare` output; returns its
    manifest line (`damaged`, with the reason and the samples read, when the shard was read in part)."""
    writer = layout.writer(PREPARE, shard.name)
    stats = ShardStats()
    try:
        for prepared in prepare_shard(shard, data, stats):
            if not writer.add(prepared.record):
                raise RuntimeError(f"shard {shard.name}: image key {prepared.record.image_key!r} came twice "
                                   "out of the data plane, which gives every sample its own key")
    except BaseException:
        writer.abort()
        raise
    damage = {"damage": stats.damage, "samples_read": stats.images} if stats.damage else None
    return layout.commit_file(writer, PREPARE, shard.name, fingerprint, damage)


def read_shard(batch: pa.Table, *, data: DataConfig, layout_root: str, fingerprint: str, rows_per_batch: int,
               ledger) -> Iterator[pa.Table]:
    """Ray Data task: turn work items (one per shard) into batches of rows from their stored input.

    For the first stage the input is the `prepare` output, made here from the source shard when it is
    not finished yet, so the data plane of many shards runs in parallel on the cluster; its manifest
    line goes to the driver through `ledger` before any of its rows do.
    """
    layout = OutputStore(Path(layout_root))
    for item in batch.to_pylist():
        if item["needs_prepare"]:
            ref = ShardRef(shard_id=item["shard_id"], name=item["shard"], path=Path(item["source_path"]),
                           format=item["source_format"])
            ray.get(ledger.add.remote(prepare_output(ref, data, layout, fingerprint)))
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
