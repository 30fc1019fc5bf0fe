"""Reading a webdataset tar shard as a stream of samples, without trusting it.

Members of one sample are contiguous; a sample is emitted once its key changes, so one sample is held
at a time. Member names are never used as paths (nothing is extracted); a name that is not a safe
KEY.EXT gives a record with an error. A tar cut anywhere, a corrupt header or a compressed stream that
does not end properly is damage (`ShardRead.damaged`), never a silently shorter shard.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from annotate.config import ImageConfig
from annotate.data.raw_sample import IMAGE_EXTS, RawSample, ShardRead, error_text

_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


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
        s.no_meta(f"invalid json: {error_text(e)}")
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
                tar.first_bad = f"{where} ({error_text(e)})"
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


def iter_tar(path: Path, cfg: ImageConfig, read: ShardRead) -> Iterator[RawSample]:
    # Members of one sample are contiguous in webdataset tars; a sample is emitted as soon as the key
    # changes (or the same part repeats: a repeated key), so only one sample is held at a time.
    group: _Group | None = None
    last = reading = None  # the last member header read; the member whose data is being read
    try:
        fh = open(path, "rb")
    except OSError as e:
        read.damaged(path, f"cannot open the file ({error_text(e)})")
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
            damage, cut = f"{kind}: stopped {where} ({error_text(e)})", True
    if damage:
        read.damaged(path, damage)
    if group is not None:
        group.cut = damage if cut else None
        yield group.to_sample()
