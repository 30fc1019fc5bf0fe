"""Rows travel between Ray Data operators as flat dicts (`ROW_*` keys): the record as JSON without its
image, and the image's encoded bytes beside it, so a batch is cheap to serialise and the image is
decoded only where a stage needs pixels.
"""

from __future__ import annotations

from annotate.data.records import ImageRecord

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
