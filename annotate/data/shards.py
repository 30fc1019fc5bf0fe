"""Finding GRIT-20M shards and streaming their samples.

Shards are img2dataset output: `NNNNN.tar` (webdataset: `KEY.jpg` + `KEY.json` [+ `KEY.txt`]) or
`NNNNN.parquet` (an image-bytes column `jpg`, or `image` holding {bytes}, plus the json columns).
Both are read as streams (tar in mode "r|*", parquet by row batches) so a shard of any size costs
the memory of one sample. Tar member names are never used as paths: nothing is extracted. Every input
sample comes out once, under a unique key; a shard that cannot be read to its end says why
(`ShardRead.damage`) instead of passing for a whole one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import quote

from annotate.config import ImageConfig

log = logging.getLogger(__name__)

ShardFormat = Literal["webdataset", "parquet"]
_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
PARQUET_BATCH_ROWS = 64
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


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
class ShardRead:
    """What reading one shard found besides its samples.

    `damage` is the first reason the shard could not be read to its proper end (the file cannot be
    opened, the archive is truncated or corrupt, a row group cannot be read), or None for a whole
    shard: a damaged shard must not be taken for a finished one. The samples before the damage still
    come out. `problems` holds the benign notes (ignored members) and the damage too, for the log.
    """

    problems: list[str] = field(default_factory=list)
    damage: str | None = None

    def problem(self, path: Path, msg: str) -> None:
        log.warning("%s: %s", path, msg)
        self.problems.append(f"{path.name}: {msg}")

    def damaged(self, path: Path, reason: str) -> None:
        self.problem(path, f"damaged: {reason}")
        if self.damage is None:
            self.damage = reason


@dataclass
class RawSample:
    """One input sample. Every sample comes out as one, even when nothing of it is usable: then
    `error` (nothing read), `meta_error` or `image_error` say why, and the record carries that."""

    key: str  # unique within the shard, see `_unique_keys`
    meta: dict | None
    image_bytes: bytes | None
    problems: list[str] = field(default_factory=list)  # every note and error about the sample
    text: str | None = None  # KEY.txt when present
    duplicate_of: str | None = None  # the original key when this is a repeated one (renamed)
    copy_of: str | None = None  # the key of an earlier sample with the same key and the same bytes
    meta_error: str | None = None  # why `meta` is None
    image_error: str | None = None  # why `image_bytes` is None
    error: str | None = None  # why nothing of the sample was read

    def no_meta(self, why: str) -> None:
        self.meta, self.meta_error = None, why
        self.problems.append(why)

    def no_image(self, why: str) -> None:
        self.image_bytes, self.image_error = None, why
        self.problems.append(why)


def iter_samples(shard: ShardRef, cfg: ImageConfig, read: ShardRead | list[str] | None = None) -> Iterator[RawSample]:
    """Stream the shard's samples; never raises for a bad file. Pass a `ShardRead` to learn, once the
    stream is exhausted, whether the shard was damaged (a plain list collects the problems only)."""
    if not isinstance(read, ShardRead):
        read = ShardRead(problems=read if read is not None else [])
    raw = _iter_tar(shard.path, cfg, read) if shard.format == "webdataset" else _iter_parquet(shard.path, cfg, read)
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


def _exc(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip().rstrip(":")


def _split_member_name(name: str) -> tuple[str, str, str | None] | None:
    """webdataset convention: KEY.EXT, the key up to the first dot of the basename. None for a name
    that is no sample part (no extension, a hidden file); else (key, ext, why the name is unsafe).

    An unsafe name (absolute, `..`, backslash, control characters) still names a sample, so that it
    appears in the output with an error, under a key quoted so it cannot read as a path."""
    base = name.rsplit("/", 1)[-1]
    stem, _, ext = base.partition(".")
    if not stem or not ext:
        return None
    raw_key = name[: len(name) - len(base)] + stem
    unsafe = (
        "absolute path" if name.startswith("/")
        else "parent directory reference" if ".." in name.split("/")
        else "backslash in the name" if "\\" in name
        else "control character in the name" if any(ord(c) < 32 or ord(c) == 127 for c in name)
        else None
    )
    # bytes that are not UTF-8 (tarfile decodes them as surrogates) are %-escaped: no UTF-8 file holds them
    raw_key = _SURROGATE.sub(lambda m: f"%{ord(m.group()) - 0xDC00:02X}" if "\udc80" <= m.group() <= "\udcff" else "\ufffd", raw_key)
    if unsafe:
        return quote(raw_key, safe=""), ext.lower(), unsafe
    return str(PurePosixPath(raw_key)), ext.lower(), None


class _Group:
    """The members of one tar sample, collected while streaming."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.parts: dict[str, bytes | None] = {}
        self.why_missing: dict[str, str] = {}  # ext -> why its payload was not read
        self.unsafe: dict[str, str] = {}  # unsafe member name -> why: nothing of the sample is read
        self.cut: str | None = None  # the shard's damage, when it falls inside this sample

    def skip(self, ext: str, why: str) -> None:
        self.parts[ext], self.why_missing[ext] = None, why

    def to_sample(self) -> RawSample:
        s = RawSample(self.key, None, None)
        if self.unsafe:
            names = ", ".join(repr(n) for n in self.unsafe)
            why = "; ".join(dict.fromkeys(self.unsafe.values()))
            s.error = f"unsafe member name {names} ({why}): sample not read, member names are never used as paths"
            s.problems.append(s.error)
            return s
        cut = f" (the shard is cut off inside this sample: {self.cut})" if self.cut else ""
        if "json" not in self.parts:
            s.no_meta("no json beside the image" + cut)
        elif self.parts["json"] is None:
            s.no_meta(self.why_missing["json"])
        else:
            s.meta = _parse_json(self.parts["json"], s)
        images = [e for e in self.parts if e in IMAGE_EXTS]
        readable = [e for e in images if self.parts[e] is not None]
        if readable:
            s.image_bytes = self.parts[readable[0]]
        else:
            s.no_image(self.why_missing[images[0]] if images else "no image in the sample" + cut)
        if self.parts.get("txt") is not None:
            s.text = self.parts["txt"].decode("utf-8", errors="replace")  # type: ignore[union-attr]
        return s


def _parse_json(data: bytes, s: RawSample) -> dict | None:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        s.no_meta(f"invalid json: {_exc(e)}")
        return None
    if not isinstance(meta, dict):
        s.no_meta(f"json is a {type(meta).__name__}, not an object")
        return None
    return _no_surrogates(meta) if _ESCAPED_SURROGATE.search(data) else meta


def _no_surrogates(x):
    """JSON escapes can spell lone surrogates, which no UTF-8 file can hold (writing them would fail
    the whole shard): each becomes U+FFFD, one character for one, so char spans stay right."""
    if isinstance(x, str):
        return _SURROGATE.sub("\ufffd", x)
    if isinstance(x, dict):
        return {_no_surrogates(k): _no_surrogates(v) for k, v in x.items()}
    return [_no_surrogates(v) for v in x] if isinstance(x, list) else x


class _Tar(tarfile.TarFile):
    """A tar stream read with `ignore_zeros` (so archives concatenated into one shard are all read,
    and a corrupt header is skipped rather than ending the stream) that keeps what the stdlib passes
    over silently: skipped invalid header blocks, and whether the stream ended after a zero block
    (the end-of-archive marker) or at a cut, which the stdlib also takes for a proper end."""

    after_zero_block = False
    bad_blocks = 0
    first_bad: str | None = None
    cut_in_header = False


class _HeaderWatch(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tar: _Tar):
        try:
            info = super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.after_zero_block = True
            raise
        except tarfile.InvalidHeaderError as e:
            tar.bad_blocks += 1
            if tar.first_bad is None:
                where = f"after member {tar.members[-1].name!r}" if tar.members else "before the first member"
                tar.first_bad = f"{where} ({_exc(e)})"
            raise
        except tarfile.TruncatedHeaderError:
            tar.cut_in_header = True
            raise
        tar.after_zero_block = tar.cut_in_header = False
        return info


def _end_of_tar(tar: _Tar, last: str | None) -> str | None:
    """None when the archive was read whole to its end-of-archive marker, else the damage."""
    damage = []
    if tar.bad_blocks:
        damage.append(f"corrupt tar: {tar.bad_blocks} invalid header block(s) skipped, the first {tar.first_bad}")
    if not tar.after_zero_block:
        where = f"after member {last!r}" if last else "before the first member"
        damage.append(f"truncated tar: the file ends inside the header {where}" if tar.cut_in_header
                      else f"truncated tar: the file ends {where} without the end-of-archive marker")
    # A compressed file cut after the tar's end marker still lacks its own end (and a gzip its 8-byte
    # trailer); bytes past that (another gzip member) would never be read. The stream is at its EOF here.
    cmp, comp = getattr(tar.fileobj, "cmp", None), getattr(tar.fileobj, "comptype", "tar")
    if cmp is not None and comp != "tar" and (not getattr(cmp, "eof", True) or (comp == "gz" and len(cmp.unused_data) != 8)):
        trailing = comp == "gz" and cmp.eof and len(cmp.unused_data) > 8
        damage.append(f"{comp} stream: {len(cmp.unused_data) - 8} byte(s) after its end were not read" if trailing
                      else f"truncated {comp} stream: the file ends before the compressed stream does")
    return "; ".join(damage) or None


def _iter_tar(path: Path, cfg: ImageConfig, read: ShardRead) -> Iterator[RawSample]:
    # Members of one sample are contiguous in webdataset tars; a sample is emitted as soon as the key
    # changes (or the same part repeats: a repeated key), so only one sample is held at a time.
    group: _Group | None = None
    last = reading = None  # the last member header read; the member whose data is being read
    try:
        fh = open(path, "rb")
    except OSError as e:
        read.damaged(path, f"cannot open the file ({_exc(e)})")
        return
    damage, cut = None, False
    with fh:
        try:
            with _Tar.open(fileobj=fh, mode="r|*", tarinfo=_HeaderWatch, ignore_zeros=True) as tar:
                for member in tar:
                    last = member.name
                    if member.isdir():
                        continue
                    parsed = _split_member_name(member.name)
                    if parsed is None:
                        read.problem(path, f"ignored member {member.name!r}: not KEY.EXT")
                        continue
                    key, ext, unsafe = parsed
                    if group is not None and (group.key != key or ext in group.parts):
                        yield group.to_sample()
                        group = None
                    if group is None:
                        group = _Group(key)
                    if unsafe:
                        group.unsafe[member.name] = unsafe
                        group.skip(ext, unsafe)
                    elif not member.isreg():
                        kind = "link" if member.issym() or member.islnk() else "special file"
                        to = f" to {member.linkname!r}" if member.linkname else ""
                        group.skip(ext, f"member {member.name!r} is a {kind}{to}, not a regular file: not followed")
                    elif member.size > cfg.max_bytes:
                        what = "image" if ext in IMAGE_EXTS else ext
                        group.skip(ext, f"{what} payload {member.size} bytes > max_bytes {cfg.max_bytes}")
                    else:
                        reading = member.name
                        group.parts[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
                        reading = None
                damage, cut = _end_of_tar(tar, last), not tar.after_zero_block
        except Exception as e:  # noqa: BLE001 - whatever stops the stream damages the shard, not the run
            kind = "truncated tar" if "unexpected end of data" in str(e) or isinstance(e, EOFError) else "unreadable tar"
            where = (f"while reading member {reading!r}" if reading else f"after member {last!r}" if last
                     else "before the first member")
            damage, cut = f"{kind}: stopped {where} ({_exc(e)})", True
    if damage:
        read.damaged(path, damage)
    if group is not None:
        group.cut = damage if cut else None
        yield group.to_sample()


def _iter_parquet(path: Path, cfg: ImageConfig, read: ShardRead) -> Iterator[RawSample]:
    """Row group by row group, so one corrupt row group loses only its own rows; those are read again
    without the image column, so their json still comes out (with an image error) when it can."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    except Exception as e:  # noqa: BLE001 - any unreadable file is one damaged shard
        read.damaged(path, f"unreadable parquet ({_exc(e)})")
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
            error = f"row group {rg} unreadable from row {first + done} ({_exc(e)})"
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
