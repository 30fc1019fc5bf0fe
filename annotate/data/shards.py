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

from annotate.config import ImageConfig, LimitsConfig
from annotate.data.raw_sample import RawSample, ShardRead, error_text, printable, safe_key  # ShardRead: re-exported
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


def iter_samples(shard: ShardRef, cfg: ImageConfig, read: ShardRead | list[str] | None = None,
                 limits: LimitsConfig | None = None, columns: Iterable[str] = ()) -> Iterator[RawSample]:
    """Stream the shard's samples; never raises for a bad file. Pass a `ShardRead` to learn, once the
    stream is exhausted, whether the shard was damaged (a plain list collects the problems only).
    `columns`: json fields some step reads besides `META_COLUMNS` (Parquet reads no others)."""
    if not isinstance(read, ShardRead):
        read = ShardRead(problems=read if read is not None else [])
    limits = limits or LimitsConfig()
    raw = (iter_tar(shard.path, cfg, read, limits) if shard.format == "webdataset"
           else _iter_parquet(shard.path, cfg, read, limits, columns))
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


# the json columns some step reads (both region sources, the default given-mask field); others are never decoded
META_COLUMNS = ("key", "id", "url", "caption", "width", "height", "status", "ref_exps", "noun_chunks", "seudo_masks")


class _Bad:
    """A Parquet value that could not be read: it fails its row, not its batch."""

    def __init__(self, why: str) -> None:
        self.why = why


def _iter_parquet(path: Path, cfg: ImageConfig, read: ShardRead, limits: LimitsConfig,
                  columns: Iterable[str] = ()) -> Iterator[RawSample]:
    """Row group by row group, so one corrupt row group loses only its own rows; those are read again
    without the image column, so their json still comes out (with an image error) when it can. Only
    the columns some step reads are read (`META_COLUMNS`, `columns`, the image), column by column, so
    a bad value in a column no step reads costs nothing, and a bad value in one it does fails its row."""
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
        read.problem(path, f"no image column (jpg or image) among {names[:20]}")
    wanted = set(META_COLUMNS) | set(columns)
    meta_cols = [c for c in names if c in wanted and c != image_col]
    first = 0
    for rg, rows in enumerate(groups):
        done = 0
        try:
            for row in _row_group(pf, rg, meta_cols + ([image_col] if image_col else []), limits, image_col, cfg):
                yield _parquet_row_sample(row, image_col, first + done, cfg)
                done += 1
            if done != rows:
                raise ValueError(f"gave {done} of its {rows} rows")
        except Exception as e:  # noqa: BLE001 - a corrupt row group ends that group, not the shard
            error = f"row group {rg} unreadable from row {first + done} ({error_text(e)})"
            kept = 0
            try:
                for i, row in enumerate(_row_group(pf, rg, meta_cols, limits, None, cfg)):
                    if i >= done:
                        yield _parquet_row_sample(row, None, first + i, cfg, f"image not read: {error}")
                        kept += 1
            except Exception:  # noqa: BLE001 - the json columns are damaged too: those rows are lost
                pass
            lost = rows - done - kept
            read.damaged(path, f"corrupt parquet: {error}; {kept} row(s) kept without their image, {lost} lost")
        first += rows


def _row_group(pf, rg: int, columns: list[str], limits: LimitsConfig, image_col: str | None,
               cfg: ImageConfig) -> Iterator[dict]:
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[rg], columns=columns):
        values = {name: _column_values(batch.column(i), name, cfg.max_bytes if name == image_col else limits.max_json_bytes)
                  for i, name in enumerate(batch.schema.names)}
        for i in range(batch.num_rows):
            yield {name: v[i] for name, v in values.items()}


def _column_values(col, name: str, max_bytes: int) -> list:
    """A column as Python values; a value that cannot be converted (not UTF-8, a date out of range) or
    is larger than `max_bytes` becomes a `_Bad` for its row alone."""
    import pyarrow as pa
    import pyarrow.compute as pc

    too_big: dict[int, int] = {}
    if pa.types.is_string(col.type) or pa.types.is_binary(col.type) or pa.types.is_large_string(col.type) \
            or pa.types.is_large_binary(col.type):
        lengths = pc.binary_length(col).to_pylist()
        too_big = {i: n for i, n in enumerate(lengths) if n is not None and n > max_bytes}
        if too_big:
            col = pc.if_else(pa.array([i in too_big for i in range(len(col))]), pa.scalar(None, col.type), col)
    try:
        values = col.to_pylist()
    except Exception:  # noqa: BLE001 - one value spoils the column's conversion: convert value by value
        values = []
        for i in range(len(col)):
            try:
                values.append(col[i].as_py())
            except Exception as e:  # noqa: BLE001
                values.append(_Bad(f"column {name!r}: value not readable ({error_text(e)})"))
    for i, n in too_big.items():
        values[i] = _Bad(f"column {name!r}: value of {n} bytes > {max_bytes}: not read")
    return values


def _parquet_row_sample(row: dict, image_col: str | None, row_no: int, cfg: ImageConfig,
                        no_image: str | None = None) -> RawSample:
    payload = row.pop(image_col, None) if image_col else None
    raw_key = next((row[c] for c in ("key", "id") if row.get(c) not in (None, "") and not isinstance(row[c], _Bad)),
                   f"row{row_no:09d}")
    key, unsafe = safe_key(str(raw_key))
    s = RawSample(key, None, None)
    if unsafe:
        s.error = (f"unsafe key {printable(repr(str(raw_key))[:120])} ({unsafe}): sample not read, "
                   "keys are never used as paths")
        s.problems.append(s.error)
        return s
    bad = [v.why for v in row.values() if isinstance(v, _Bad)]
    if bad:
        s.no_meta("; ".join(bad))
    else:
        s.meta = row
    if isinstance(payload, _Bad):
        s.no_image(payload.why.replace(f"> {cfg.max_bytes}", f"> max_bytes {cfg.max_bytes}"))
        return s
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
        s.no_image(f"no image in the row (status: {printable(str(status))[:80]})" if status and not isinstance(status, _Bad)
                   else "no image in the row")
    else:
        s.image_bytes = bytes(payload)
    return s
