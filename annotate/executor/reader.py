"""The Ray Data source of a run: a read task per shard turns work items into batches of rows.

For the first stage the input is the `prepare` output, made in the read task from the source shard
when it is not finished yet (its manifest line goes to the driver, the manifest's one writer, through
the `ShardLedger` actor); `--retry-failed` puts failed regions back to `pending` here, and a dataset
shard reused by lineage has its changed fields cleared here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import ray

from annotate.config import DataConfig
from annotate.data.prepare import prepare_output
from annotate.data.shards import ShardRef
from annotate.data.store import OutputStore, count_rows, iter_stored_records
from annotate.executor.shard_io import record_to_row
from annotate.stages.chain import reset_for_retry
from annotate.stages.lineage import reset_for_lineage


@ray.remote(num_cpus=0)
class ShardLedger:
    """Read tasks hand the driver the manifest lines of the `prepare` outputs they made, so that the
    driver stays the manifest's one writer (see data/store.py)."""

    def __init__(self) -> None:
        self._lines: list[dict] = []

    def add(self, line: dict) -> None:
        self._lines.append(line)

    def drain(self) -> list[dict]:
        lines, self._lines = self._lines, []
        return lines


def read_shard(batch: pa.Table, *, data: DataConfig, store_root: str, fingerprint: str, rows_per_batch: int,
               ledger, lineage: dict[str, str] | None = None) -> Iterator[pa.Table]:
    """Ray Data task: turn work items (one per shard) into batches of rows from their stored input.

    For the first stage the input is the `prepare` output, made here from the source shard when it is
    not finished yet, so the data plane of many shards runs in parallel on the cluster; its manifest
    line goes to the driver through `ledger` before any of its rows do (`fingerprint` is the prepare
    output's). A dataset shard reused by lineage (`relineage`) has the fields whose key is not in
    `lineage` (stage -> digest) cleared here, so that the chain makes only those again.
    """
    store = OutputStore(Path(store_root))
    for item in batch.to_pylist():
        if item["needs_prepare"]:
            ref = ShardRef(shard_id=item["shard_id"], name=item["shard"], path=Path(item["source_path"]),
                           format=item["source_format"])
            ray.get(ledger.add.remote(prepare_output(ref, data, store, fingerprint)))
        path = store.output_path(item["input"], item["shard"])
        total = count_rows(path)
        rows: list[dict] = []
        for record in iter_stored_records(path, rows_per_batch):
            if item.get("relineage") and lineage:
                reset_for_lineage(record, lineage)
            if item["retry_failed"]:
                reset_for_retry(record)
            rows.append(record_to_row(record, total))
            if len(rows) >= rows_per_batch:
                yield pa.Table.from_pylist(rows)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows)
