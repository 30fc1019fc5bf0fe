"""Writing records as a Hugging Face-loadable Parquet dataset: OUT/data/*.parquet + OUT/README.md.

Files are written to a hidden temp file in the target folder, fsynced and renamed with os.replace, so
a reader (or a resumed run) sees either the whole file or none; the temp name starts with "." so a
`data/*.parquet` glob never picks it up.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel

from annotate.data.records import (
    SCHEMA_VERSION,
    ImageRecord,
    PartRecord,
    RegionRecord,
    arrow_schema,
    features,
    image_record_to_row,
)

ROWS_PER_BATCH = 64


def status_counts(records: Iterable[ImageRecord]) -> dict:
    """regions_in, ok, rejected, failed, pending; regions_in is always the sum of the other four."""
    counts = {"regions_in": 0, "ok": 0, "rejected": 0, "failed": 0, "pending": 0}
    for rec in records:
        for r in rec.regions:
            counts["regions_in"] += 1
            counts[r.status] += 1
    return counts


@dataclass
class WriteStats:
    path: Path
    rows: int = 0
    regions: int = 0
    image_errors: int = 0  # rows whose image-level `error` is set
    status: dict = field(default_factory=lambda: status_counts([]))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    sha256: str = ""
    bytes: int = 0

    def summary(self) -> dict:
        """The counts a manifest line and a run summary carry."""
        return {"images": self.rows, "image_errors": self.image_errors, "regions": self.regions,
                **{k: self.status[k] for k in ("ok", "rejected", "failed", "pending")},
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


class ShardWriter:
    """Writes one shard's records incrementally (row group by row group) into a hidden temp file in the
    target folder, then `commit()` fsyncs and renames it into place. Memory stays at one row group.

    `expected_rows` lets a streaming caller ask `complete` once every image of the shard has arrived;
    a second record with an already written image key is refused (`add` returns False).
    """

    def __init__(self, path: Path, expected_rows: int = 0, row_group_rows: int = ROWS_PER_BATCH):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.expected_rows = expected_rows
        self.row_group_rows = row_group_rows
        self.stats = WriteStats(path=self.path)
        self._keys: set[str] = set()
        self._batch: list[dict] = []
        self._tmp: Path | None = None
        self._fh = None
        self._writer: pq.ParquetWriter | None = None

    @property
    def complete(self) -> bool:
        return self.stats.rows >= self.expected_rows

    def add(self, record: ImageRecord) -> bool:
        if record.image_key in self._keys:
            return False
        self._keys.add(record.image_key)
        self._batch.append(image_record_to_row(record))
        self.stats.rows += 1
        self.stats.image_errors += record.error is not None
        for k, v in status_counts([record]).items():
            self.stats.status[k] += v
        for region in record.regions:
            for _, prov in region.provenance:  # every stage's entry
                self.stats.prompt_tokens += prov.prompt_tokens
                self.stats.completion_tokens += prov.completion_tokens
        if len(self._batch) >= self.row_group_rows:
            self._flush()
        return True

    def _open(self) -> None:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp_name)
        self._fh = os.fdopen(fd, "wb")
        self._writer = pq.ParquetWriter(self._fh, arrow_schema())

    def _flush(self) -> None:
        if self._writer is None:
            self._open()
        if self._batch:
            self._writer.write_table(pa.Table.from_pylist(self._batch, schema=arrow_schema()))
            self._batch = []

    def commit(self) -> WriteStats:
        try:
            if self._writer is None or self._batch:
                self._flush()
            if self.stats.rows == 0:  # an empty shard still gets a valid (empty) file
                self._writer.write_table(pa.Table.from_pylist([], schema=arrow_schema()))
            self._writer.close()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.chmod(self._tmp, 0o644)  # mkstemp makes it 0600; the dataset is meant to be shared
            self.stats.sha256, self.stats.bytes = file_sha256(self._tmp), self._tmp.stat().st_size
            os.replace(self._tmp, self.path)
            fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        self.stats.regions = self.stats.status["regions_in"]
        return self.stats

    def abort(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if self._fh is not None and not self._fh.closed:
                self._fh.close()
        finally:
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)


def fill(writer: ShardWriter, records: Iterable[ImageRecord]) -> ShardWriter:
    """Add every record to `writer`, ready to commit. When reading the records fails, or an image key
    comes twice (every sample has its own key), the writer is aborted (nothing is left behind) and
    the error raised."""
    try:
        for record in records:
            if not writer.add(record):
                raise ValueError(f"image key {record.image_key!r} written twice to {writer.path}")
    except BaseException:
        writer.abort()
        raise
    return writer


def write_parquet_atomic(records: Iterable[ImageRecord], path: Path) -> WriteStats:
    """Stream records into `path` (`arrow_schema()`, so `datasets` decodes `image`), atomically."""
    return fill(ShardWriter(path), records).commit()


def file_sha256(path: Path) -> str:
    """The checksum a manifest line records for an output file (and `OutputStore.holds` checks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` survive a power loss (the rename is a change of the folder, not the file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` whole or not at all: written to a hidden temporary in the same
    folder (a rename never crosses file systems), fsynced, renamed over `path`, the folder fsynced. An
    error inside leaves the previous file and no temporary; readers never see a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it 0600; outputs are meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes | Iterable[bytes]) -> Path:
    """`data` (bytes, or chunks so a large page is never held whole) at `path`, by `atomic_file`."""
    with atomic_file(path) as fh:
        for chunk in [data] if isinstance(data, bytes) else data:
            fh.write(chunk)
    return Path(path)


def field_descriptions(model: type[BaseModel]) -> dict[str, str]:
    """What the card says of each field of `model`: its description there (one place), by schema name."""
    return {info.alias or name: info.description or "" for name, info in model.model_fields.items()}


def region_field_descriptions() -> dict[str, str]:
    """The card's region fields (`RegionRecord`)."""
    return field_descriptions(RegionRecord)


def part_field_descriptions() -> dict[str, str]:
    """The card's part fields: each item of a region's `parts` (`PartRecord`)."""
    return field_descriptions(PartRecord)


def write_dataset_card(out_dir: Path, data_files: str, **info) -> None:
    """OUT/README.md whose YAML front matter points `datasets` at `data_files` (a glob relative to
    OUT) only, so `load_dataset("OUT", split="train")` works even when OUT holds other folders."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # DatasetInfo._to_yaml_dict is what `datasets` itself writes into Hub cards; reusing it keeps the
    # feature YAML exactly in the form `load_dataset` reads back.
    import datasets

    features_yaml = datasets.DatasetInfo(features=features())._to_yaml_dict()["features"]
    front = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}],
        "dataset_info": {"features": features_yaml},
    }
    title = info.pop("title", "LongGRIT annotations")
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        "One row per input image with its regions (bbox in displayed-image pixels, COCO-RLE mask, captions, status,",
        "and the object's parts when the part stages ran).",
        "A row whose `error` is set is an input sample that could not be used (the reason is in `error`); its",
        "regions, if any, are failed.",
        f"Schema version {SCHEMA_VERSION}. Load with `datasets.load_dataset(\"<this folder>\", split=\"train\")`.",
        "",
        "## Region fields",
        "",
        "| Field | What it holds |",
        "| --- | --- |",
        *(f"| `{name}` | {text} |" for name, text in region_field_descriptions().items()),
        "",
        "## Part fields",
        "",
        "Each item of a region's `parts` (PACO-style: a part belongs to its region, `part_id` is `region_id:pN`).",
        "Parts the mask checks rejected stay with `kept` false and their `reject_reason`; parts without a `verdict`",
        "are unverified and left out of training by default.",
        "",
        "| Field | What it holds |",
        "| --- | --- |",
        *(f"| `{name}` | {text} |" for name, text in part_field_descriptions().items()),
        "",
        "Fields of stages a run did not have are null. Near-duplicate clusters are in `quality/near_duplicates.parquet`",
        "(`region_id`, `cluster_id`: the smallest region id of the cluster, `cluster_size`), written after the",
        "shards when the pipeline has a `quality:` section; its metadata names the data files it covers.",
        "`annotate score OUT --checkpoint RUN` writes a PixCLIP checkpoint's region-text score of every described",
        "region to `quality/region_text_scores.parquet` (`region_id`, `score`: cosine of region and description).",
        "",
    ]
    if info:
        lines += ["## Run", "", "```json", json.dumps(info, indent=2, sort_keys=True, default=str), "```", ""]
    write_bytes_atomic(out_dir / "README.md", "\n".join(lines).encode("utf-8"))
