"""Finding GRIT-20M shards and streaming their samples.

Shards are img2dataset output: `NNNNN.tar` (webdataset: `KEY.jpg` + `KEY.json` [+ `KEY.txt`]) or
`NNNNN.parquet` (an image-bytes column `jpg`, or `image` holding {bytes}, plus the json columns).
Both are read as streams (tar in mode "r|*", parquet by row batches) so a shard of any size costs
the memory of one sample. Tar member names are never used as paths: nothing is extracted.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from annotate.config import ImageConfig

log = logging.getLogger(__name__)

ShardFormat = Literal["webdataset", "parquet"]
_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
PARQUET_BATCH_ROWS = 64


def parse_shard_spec(spec: str) -> list[int]:
    """'0-99,120,130-135' -> sorted unique shard ids."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty shard spec; expected e.g. '0-99,120,130-135'")
    ids: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = _RANGE.match(part)
        if not m:
            raise ValueError(
                f"bad shard spec part {part!r} in {spec!r}; expected N or N-M with non-negative integers"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"bad shard range {part!r} in {spec!r}: end {hi} is before start {lo}")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


@dataclass(frozen=True)
class ShardRef:
    shard_id: int
    name: str  # "00000"
    path: Path
    format: ShardFormat


def find_shards(input_dir: str | Path, shard_ids: list[int], fmt: str = "auto") -> list[ShardRef]:
    """Locate NNNNN.tar / NNNNN.parquet for each id; all missing ids are reported at once."""
    input_dir = Path(input_dir)
    if fmt not in ("auto", "webdataset", "parquet"):
        raise ValueError(f"unknown shard format {fmt!r}; use auto, webdataset or parquet")
    if not input_dir.is_dir():
        raise FileNotFoundError(f"shard directory {input_dir} does not exist")
    formats: list[ShardFormat] = ["webdataset", "parquet"] if fmt == "auto" else [fmt]  # type: ignore[list-item]
    found: list[ShardRef] = []
    missing: list[int] = []
    for sid in shard_ids:
        name = f"{sid:05d}"
        for f in formats:
            path = input_dir / f"{name}{_SUFFIX[f]}"
            if path.exists() and not path.is_dir():
                found.append(ShardRef(sid, name, path, f))
                break
        else:
            missing.append(sid)
    if missing:
        existing = sorted(p.name for p in input_dir.iterdir() if p.suffix in (".tar", ".parquet"))
        shown = ", ".join(existing[:20]) + (" ..." if len(existing) > 20 else "") if existing else "none"
        wanted = "/".join(_SUFFIX[f] for f in formats)
        raise FileNotFoundError(
            f"shard(s) {', '.join(f'{m:05d}' for m in missing)} ({wanted}) not found in {input_dir}; "
            f"shards there: {shown}"
        )
    return found


@dataclass
class RawSample:
    key: str  # unique within the shard: a repeated key gets "@2", "@3", ...
    meta: dict | None
    image_bytes: bytes | None
    problems: list[str] = field(default_factory=list)
    text: str | None = None  # KEY.txt when present
    duplicate_of: str | None = None  # the original key when this is a repeated one


def iter_samples(
    shard: ShardRef, cfg: ImageConfig, shard_problems: list[str] | None = None
) -> Iterator[RawSample]:
    """Stream the shard's samples. Shard-level problems (ignored members, a truncated tar) are
    appended to `shard_problems` when given, and logged either way; they never raise."""
    sink = shard_problems if shard_problems is not None else []
    raw = _iter_tar(shard.path, cfg, sink) if shard.format == "webdataset" else _iter_parquet(shard.path, cfg, sink)
    yield from _dedupe_keys(raw)


def _dedupe_keys(samples: Iterable[RawSample]) -> Iterator[RawSample]:
    # Only keys are kept (not samples), so memory stays ~ number of keys in one shard.
    seen: dict[str, int] = {}
    for s in samples:
        n = seen.get(s.key, 0) + 1
        seen[s.key] = n
        if n > 1:
            s.duplicate_of = s.key
            s.problems.append(f"duplicate key {s.key!r} (occurrence {n})")
            s.key = f"{s.key}@{n}"
        yield s


def _problem(sink: list[str], msg: str) -> None:
    log.warning(msg)
    sink.append(msg)


def _split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset convention: key = path up to the first dot of the basename; None if odd."""
    if not name or "\\" in name or "\x00" in name:
        return None
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("..", ".", "") for part in p.parts):
        return None
    base = p.name
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    key = str(p.parent / stem) if str(p.parent) != "." else stem
    return key, ext.lower()


class _Group:
    def __init__(self, key: str) -> None:
        self.key = key
        self.parts: dict[str, bytes | None] = {}
        self.problems: list[str] = []

    def to_sample(self) -> RawSample:
        meta = None
        problems = list(self.problems)
        if "json" in self.parts:
            meta = _parse_json(self.parts["json"], problems)
        else:
            problems.append("no json beside the image")
        image = None
        img_exts = [e for e in self.parts if e in IMAGE_EXTS]
        if img_exts:
            image = self.parts[img_exts[0]]
        elif not any("image" in p for p in problems):
            problems.append("no image in the sample")
        text = None
        if self.parts.get("txt") is not None:
            text = self.parts["txt"].decode("utf-8", errors="replace")  # type: ignore[union-attr]
        return RawSample(self.key, meta, image, problems, text)


def _parse_json(data: bytes | None, problems: list[str]) -> dict | None:
    if data is None:
        return None
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"invalid json: {e}")
        return None
    if not isinstance(meta, dict):
        problems.append(f"json is a {type(meta).__name__}, not an object")
        return None
    return meta


def _iter_tar(path: Path, cfg: ImageConfig, sink: list[str]) -> Iterator[RawSample]:
    # Members of one sample are contiguous in webdataset tars; a sample is emitted as soon as the key
    # changes (or the same part repeats: a repeated key), so only one sample is held at a time.
    group: _Group | None = None
    with open(path, "rb") as fh:
        try:
            with tarfile.open(fileobj=fh, mode="r|*") as tar:
                for member in tar:
                    if not member.isreg():
                        if not member.isdir():
                            _problem(sink, f"{path.name}: ignored non-regular member {member.name!r}")
                        continue
                    parsed = _split_member_name(member.name)
                    if parsed is None:
                        _problem(sink, f"{path.name}: ignored member with odd name {member.name!r}")
                        continue
                    key, ext = parsed
                    if group is not None and (group.key != key or ext in group.parts):
                        yield group.to_sample()
                        group = None
                    if group is None:
                        group = _Group(key)
                    if member.size > cfg.max_bytes:
                        group.parts[ext] = None
                        what = "image" if ext in IMAGE_EXTS else ext
                        group.problems.append(f"{what} payload {member.size} bytes > max_bytes {cfg.max_bytes}")
                        continue
                    f = tar.extractfile(member)
                    group.parts[ext] = f.read() if f is not None else None
        except (tarfile.TarError, EOFError, OSError) as e:
            _problem(sink, f"{path.name}: tar read stopped early ({type(e).__name__}: {e})")
    if group is not None:
        yield group.to_sample()


def _iter_parquet(path: Path, cfg: ImageConfig, sink: list[str]) -> Iterator[RawSample]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one shard problem
        _problem(sink, f"{path.name}: unreadable parquet ({type(e).__name__}: {e})")
        return
    names = pf.schema_arrow.names
    image_col = next((c for c in ("jpg", "image", "png", "webp") if c in names), None)
    if image_col is None:
        _problem(sink, f"{path.name}: no image column (jpg or image) among {names}")
    row_no = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                yield _parquet_row_sample(row, image_col, row_no, cfg)
                row_no += 1
    except Exception as e:  # noqa: BLE001 - a corrupt row group ends the shard, not the run
        _problem(sink, f"{path.name}: parquet read stopped at row {row_no} ({type(e).__name__}: {e})")


def _parquet_row_sample(row: dict, image_col: str | None, row_no: int, cfg: ImageConfig) -> RawSample:
    problems: list[str] = []
    payload = row.pop(image_col, None) if image_col else None
    if isinstance(payload, dict):  # datasets-style {"bytes": ..., "path": ...}
        payload = payload.get("bytes")
    if payload is not None and not isinstance(payload, (bytes, bytearray)):
        problems.append(f"image column holds {type(payload).__name__}, not bytes")
        payload = None
    if payload is not None and len(payload) > cfg.max_bytes:
        problems.append(f"image payload {len(payload)} bytes > max_bytes {cfg.max_bytes}")
        payload = None
    if payload is None and not problems:
        status = row.get("status")
        problems.append(f"no image in the row (status: {status})" if status else "no image in the row")
    key = row.get("key") or row.get("id") or f"row{row_no:09d}"
    return RawSample(str(key), row, bytes(payload) if payload is not None else None, problems)
