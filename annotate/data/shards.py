"""Finding GRIT-20M shards and streaming their samples.

Shards are img2dataset output: `NNNNN.tar` (webdataset: `KEY.jpg` + `KEY.json` [+ `KEY.txt`]) or
`NNNNN.parquet` (an image-bytes column `jpg`, or `image` holding {bytes}, plus the json columns).
Both are read as streams (tar in mode "r|*", parquet by row batches) so a shard of any size costs
the memory of one sample. Tar member names are never used as paths: nothing is extracted. Every input
sample comes out once, under a unique key; a shard that cannot be read to its end says why
(`ShardRead.damage`) instead of passing for a whole one. The tar format is read in `tar_reader.py`,
Parquet here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from annotate.config import ImageConfig
from annotate.data.raw_sample import RawSample, ShardRead, error_text  # ShardRead: re-exported for callers
from annotate.data.tar_reader import iter_tar

ShardFormat = Literal["webdataset", "parquet"]
_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
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


def iter_samples(shard: ShardRef, cfg: ImageConfig, read: ShardRead | list[str] | None = None) -> Iterator[RawSample]:
    """Stream the shard's samples; never raises for a bad file. Pass a `ShardRead` to learn, once the
    stream is exhausted, whether the shard was damaged (a plain list collects the problems only)."""
    if not isinstance(read, ShardRead):
        read = ShardRead(problems=read if read is not None else [])
    raw = iter_tar(shard.path, cfg, read) if shard.format == "webdataset" else _iter_parquet(shard.path, cfg, read)
    yield from _unique_keys(raw)


def _unique_keys(samples: Iterable[RawSample]) -> Iterator[RawSample]:
    """Give every sample a unique key that the same shard bytes always give again.

    A key already taken becomes KEY@N, the first N (from its occurrence count, at least 2) that no
    earlier sample holds, so a genuine `k1@2` before or after a renamed `k1` never clashes; ids of
    regions derive from the key and stay unique too. A renamed sample is annotated like any other: a
    repeated key most often names another image, and dropping or failing it would lose it. Only a
    byte-identical repeat (same key, image, json and text as an earlier sample) is marked `copy_of`,
    so the same image is not annotated twice. Memory: a key and a 16-byte digest per sample.
    """
    taken: set[str] = set()
    count: dict[str, int] = {}
    first_of: dict[tuple[str, bytes], str] = {}
    for s in samples:
        original = s.key
        count[original] = count.get(original, 0) + 1
        if original in taken:
            n = max(2, count[original])
            while f"{original}@{n}" in taken:
                n += 1
            s.key, s.duplicate_of = f"{original}@{n}", original
            s.problems.append(f"key {original!r} already used in this shard: renamed {s.key!r}")
        taken.add(s.key)
        digest = _content_digest(s)
        if digest is not None:
            earlier = first_of.setdefault((original, digest), s.key)
            if earlier != s.key:
                s.copy_of = earlier
                s.problems.append(f"exact copy of sample {earlier!r} (same key, image and json)")
        yield s


def _content_digest(s: RawSample) -> bytes | None:
    if s.error is not None or (s.meta is None and s.image_bytes is None):
        return None
    h = hashlib.blake2b(digest_size=16)
    meta = json.dumps(s.meta, sort_keys=True, default=repr).encode() if s.meta is not None else b""
    for part in (s.image_bytes or b"", meta, (s.text or "").encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def _iter_parquet(path: Path, cfg: ImageConfig, read: ShardRead) -> Iterator[RawSample]:
    """Row group by row group, so one corrupt row group loses only its own rows; those are read again
    without the image column, so their json still comes out (with an image error) when it can."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    except Exception as e:  # noqa: BLE001 - any unreadable file is one damaged shard
        read.damaged(path, f"unreadable parquet ({error_text(e)})")
        return
    names = pf.schema_arrow.names
    image_col = next((c for c in ("jpg", "image", "png", "webp") if c in names), None)
    if image_col is None:
        read.problem(path, f"no image column (jpg or image) among {names}")
    first = 0
    for rg, rows in enumerate(groups):
        done = 0
        try:
            for row in _row_group(pf, rg, None):
                yield _parquet_row_sample(row, image_col, first + done, cfg)
                done += 1
            if done != rows:
                raise ValueError(f"gave {done} of its {rows} rows")
        except Exception as e:  # noqa: BLE001 - a corrupt row group ends that group, not the shard
            error = f"row group {rg} unreadable from row {first + done} ({error_text(e)})"
            kept = 0
            try:
                for i, row in enumerate(_row_group(pf, rg, [c for c in names if c != image_col])):
                    if i >= done:
                        yield _parquet_row_sample(row, None, first + i, cfg, f"image not read: {error}")
                        kept += 1
            except Exception:  # noqa: BLE001 - the json columns are damaged too: those rows are lost
                pass
            lost = rows - done - kept
            read.damaged(path, f"corrupt parquet: {error}; {kept} row(s) kept without their image, {lost} lost")
        first += rows


def _row_group(pf, rg: int, columns: list[str] | None) -> Iterator[dict]:
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[rg], columns=columns):
        yield from batch.to_pylist()


def _parquet_row_sample(row: dict, image_col: str | None, row_no: int, cfg: ImageConfig,
                        no_image: str | None = None) -> RawSample:
    key = row.get("key") or row.get("id") or f"row{row_no:09d}"
    payload = row.pop(image_col, None) if image_col else None
    s = RawSample(str(key), row, None)
    if isinstance(payload, dict):  # datasets-style {"bytes": ..., "path": ...}
        payload = payload.get("bytes")
    if payload is not None and not isinstance(payload, (bytes, bytearray)):
        s.no_image(f"image column holds {type(payload).__name__}, not bytes")
    elif payload is not None and len(payload) > cfg.max_bytes:
        s.no_image(f"image payload {len(payload)} bytes > max_bytes {cfg.max_bytes}")
    elif payload is None and no_image:
        s.no_image(no_image)
    elif payload is None:
        status = row.get("status")
        s.no_image(f"no image in the row (status: {status})" if status else "no image in the row")
    else:
        s.image_bytes = bytes(payload)
    return s
