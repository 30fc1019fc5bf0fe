"""Stored shard outputs: stream records out of one (writing is `annotate.data.writer.ShardWriter`).

Rows travel between Ray Data operators as flat dicts (`ROW_*` keys): the record as JSON without its
image, and the image's encoded bytes beside it, so a batch is cheap to serialise and the image is
decoded only where a stage needs pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from annotate.data.records import ImageRecord, row_to_image_record

ROW_SHARD, ROW_TOTAL, ROW_KEY, ROW_RECORD, ROW_IMAGE = "shard", "shard_total", "image_key", "record", "image"


def record_to_row(record: ImageRecord, shard_total: int) -> dict:
    return {
        ROW_SHARD: record.shard,
        ROW_TOTAL: shard_total,
        ROW_KEY: record.image_key,
        ROW_RECORD: record.model_dump_json(exclude={"image_bytes"}, by_alias=True),
        ROW_IMAGE: record.image_bytes or b"",
    }


def row_to_record(row: dict) -> ImageRecord:
    record = ImageRecord.model_validate_json(row[ROW_RECORD])
    record.image_bytes = row[ROW_IMAGE] or None
    return record


def count_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def iter_stored_records(path: Path, batch_rows: int = 64) -> Iterator[ImageRecord]:
    """Stream a stored shard output; never holds more than `batch_rows` images in memory."""
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            yield row_to_image_record(row)
