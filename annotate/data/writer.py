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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from annotate.data.records import ARROW_SCHEMA, FEATURES, SCHEMA_VERSION, ImageRecord, image_record_to_row

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
    status: dict = field(default_factory=dict)
    sha256: str = ""
    bytes: int = 0


def write_parquet_atomic(records: Iterable[ImageRecord], path: Path) -> WriteStats:
    """Stream records into `path` (ARROW_SCHEMA, so `datasets` decodes `image`), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    stats = WriteStats(path=path, status=status_counts([]))
    try:
        with os.fdopen(fd, "wb") as fh:
            with pq.ParquetWriter(fh, ARROW_SCHEMA) as writer:
                batch: list[dict] = []
                for rec in records:
                    batch.append(image_record_to_row(rec))
                    stats.rows += 1
                    for k, v in status_counts([rec]).items():
                        stats.status[k] += v
                    if len(batch) >= ROWS_PER_BATCH:
                        writer.write_table(pa.Table.from_pylist(batch, schema=ARROW_SCHEMA))
                        batch = []
                if batch or stats.rows == 0:
                    writer.write_table(pa.Table.from_pylist(batch, schema=ARROW_SCHEMA))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the dataset is meant to be shared
        stats.sha256, stats.bytes = _sha256(tmp), tmp.stat().st_size
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    stats.regions = stats.status["regions_in"]
    return stats


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
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


def write_dataset_card(out_dir: Path, **info) -> None:
    """OUT/README.md whose YAML front matter points `datasets` at data/*.parquet only, so
    `load_dataset("OUT", split="train")` works even when OUT holds other folders."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # DatasetInfo._to_yaml_dict is what `datasets` itself writes into Hub cards; reusing it keeps the
    # feature YAML exactly in the form `load_dataset` reads back.
    import datasets

    features_yaml = datasets.DatasetInfo(features=FEATURES)._to_yaml_dict()["features"]
    front = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
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
        "One row per image with its regions (bbox in displayed-image pixels, COCO-RLE mask, captions, status).",
        f"Schema version {SCHEMA_VERSION}. Load with `datasets.load_dataset(\"<this folder>\", split=\"train\")`.",
        "",
    ]
    if info:
        lines += ["## Run", "", "```json", json.dumps(info, indent=2, sort_keys=True, default=str), "```", ""]
    path = out_dir / "README.md"
    tmp = out_dir / ".README.md.tmp"
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
