"""Reading a webdataset tar shard as a stream of samples, without trusting it.

Members of one sample are contiguous; a sample is emitted once its key changes, so one sample is held
at a time. Member names are never used as paths (nothing is extracted); a name that is not a safe
KEY.EXT gives a record with an error. A tar cut anywhere, a corrupt header or a compressed stream that
does not end properly is damage (`ShardRead.damaged`), never a silently shorter shard.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from annotate.config import ImageConfig, LimitsConfig
from annotate.data.raw_sample import IMAGE_EXTS, RawSample, ShardRead, error_text, printable, safe_key, unsafe_reason

_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
READ_PARTS = ("json", "txt")  # besides the image: the parts of a sample some step reads; others are skipped unread
MAX_PARTS = 16  # parts kept track of per sample; more (all of them unread) are only counted


def _split_member_name(name: str) -> tuple[str, str, str | None] | None:
    """webdataset convention: KEY.EXT, the key up to the first dot of the basename. None for a name
    that is no sample part (no extension, a hidden file); else (key, ext, why the name is unsafe).

    An unsafe name (absolute, `..`, backslash, control characters) still names a sample, so that it
    appears in the output with an error, under a key quoted so it cannot read as a path (`safe_key`:
    the same rule as Parquet keys)."""
    base = name.rsplit("/", 1)[-1]
    stem, _, ext = base.partition(".")
    if not stem or not ext:
        return None
    key, unsafe_key = safe_key(name[: len(name) - len(base)] + stem)
    unsafe = unsafe_reason(name) or unsafe_key
    if unsafe and not unsafe_key:
        key = quote(key, safe="")
    return key, ext.lower(), unsafe


class _Group:
    """The members of one tar sample, collected while streaming."""

    def __init__(self, key: str, limits: LimitsConfig) -> None:
        self.key = key
        self.limits = limits
        self.parts: dict[str, bytes | None] = {}
        self.why_missing: dict[str, str] = {}  # ext -> why its payload was not read
        self.unsafe: dict[str, str] = {}  # unsafe member name -> why: nothing of the sample is read
        self.cut: str | None = None  # the shard's damage, when it falls inside this sample
        self.unread = 0  # parts no step reads (or past MAX_PARTS): skipped, only counted

    def skip(self, ext: str, why: str) -> None:
        self.parts[ext], self.why_missing[ext] = None, why

    def has_image(self) -> bool:
        return any(self.parts[e] is not None for e in self.parts if e in IMAGE_EXTS)

    def to_sample(self) -> RawSample:
        s = RawSample(self.key, None, None)
        if self.unsafe:
            names = ", ".join(repr(n) for n in self.unsafe)
            why = "; ".join(dict.fromkeys(self.unsafe.values()))
            s.error = f"unsafe member name {names} ({why}): sample not read, member names are never used as paths"
            s.problems.append(s.error)
            return s
        cut = f" (the shard is cut off inside this sample: {self.cut})" if self.cut else ""
        if self.unread > MAX_PARTS:
            s.problems.append(f"{self.unread} parts no step reads were skipped unread")
        if "json" not in self.parts:
            s.no_meta("no json beside the image" + cut)
        elif self.parts["json"] is None:
            s.no_meta(self.why_missing["json"])
        else:
            s.meta = parse_json(self.parts["json"], s, self.limits)
        images = [e for e in self.parts if e in IMAGE_EXTS]
        readable = [e for e in images if self.parts[e] is not None]
        if readable:
            s.image_bytes = self.parts[readable[0]]
        else:
            s.no_image(self.why_missing[images[0]] if images else "no image in the sample" + cut)
        if self.parts.get("txt") is not None:
            s.text = self.parts["txt"].decode("utf-8", errors="replace")  # type: ignore[union-attr]
        return s


_HUGE_INT_DIGITS = 300  # past a float's range: such a number can only fail what holds it


def _parse_int(text: str) -> int | float:
    # Python refuses to parse ints of more than 4300 digits (a ValueError for the whole json); a number
    # this long is out of every range anyway, so it becomes an infinity that fails only its own field.
    if len(text) > _HUGE_INT_DIGITS:
        return float("-inf") if text.startswith("-") else float("inf")
    return int(text)


class _DuplicateKey(ValueError):
    pass


def _object(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def parse_json(data: bytes, s: RawSample, limits: LimitsConfig) -> dict | None:
    """The sample's json object, or None with `s.no_meta(why)`; never raises (whatever the bytes)."""
    if len(data) > limits.max_json_bytes:
        s.no_meta(f"json payload {len(data)} bytes > max_json_bytes {limits.max_json_bytes}")
        return None
    try:
        meta = json.loads(data.decode("utf-8"), parse_int=_parse_int, object_pairs_hook=_object)
    except _DuplicateKey as e:
        s.no_meta(f"invalid json: key {str(e)[:80]!r} appears twice in one object (which one is meant is unknown)")
        return None
    except RecursionError:
        s.no_meta(f"invalid json: nested deeper than max_json_depth {limits.max_json_depth}")
        return None
    except Exception as e:  # noqa: BLE001 - UnicodeDecodeError, JSONDecodeError, ValueError, MemoryError...
        s.no_meta(f"invalid json: {error_text(e)}")
        return None
    if not isinstance(meta, dict):
        s.no_meta(f"json is a {type(meta).__name__}, not an object")
        return None
    if _deeper_than(meta, limits.max_json_depth):
        s.no_meta(f"invalid json: nested deeper than max_json_depth {limits.max_json_depth}")
        return None
    return _no_surrogates(meta) if _ESCAPED_SURROGATE.search(data) else meta


def _deeper_than(x, limit: int) -> bool:
    """Whether containers nest more than `limit` levels (iterative: no recursion on hostile input).
    Empty containers are judged without a stack entry: a JSON of a million `{}` would otherwise double
    its parsed size in work-list entries (bench/hostile_shards.py, dense_json)."""
    if not isinstance(x, (dict, list)):
        return False
    stack = [(x, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        for c in (v.values() if isinstance(v, dict) else v):
            if isinstance(c, (dict, list)):
                if c:
                    stack.append((c, depth + 1))
                elif depth + 1 > limit:
                    return True
    return False


def _no_surrogates(x):
    """JSON escapes can spell lone surrogates, which no UTF-8 file can hold (writing them would fail
    the whole shard): each becomes U+FFFD, one character for one, so char spans stay right. Only called
    on json within max_json_depth, so the recursion is bounded."""
    if isinstance(x, str):
        return _SURROGATE.sub("\ufffd", x)
    if isinstance(x, dict):
        return {_no_surrogates(k): _no_surrogates(v) for k, v in x.items()}
    return [_no_surrogates(v) for v in x] if isinstance(x, list) else x


class _Refused(Exception):
    """The archive's structure cannot be right: reading stops here (the shard is damaged)."""


class _Tar(tarfile.TarFile):
    """A tar stream read with `ignore_zeros` (so archives concatenated into one shard are all read,
    and a corrupt header is skipped rather than ending the stream) that keeps what the stdlib passes
    over silently: skipped invalid header blocks, zero blocks and what follows them, and whether the
    stream ended after a zero block (the end-of-archive marker) or at a cut, which the stdlib also
    takes for a proper end. A subclass per file sets `limits` and `file_size` (None: compressed)."""

    limits = LimitsConfig()
    file_size: int | None = None
    after_zero_block = False
    bad_blocks = 0
    first_bad: str | None = None
    cut_in_header = False
    zero_start: int | None = None  # where the current run of zero blocks began
    holes: tuple[str, ...] = ()  # zero runs that are no end-of-archive marker, with what followed
    zero_tail: str | None = None

    def after_zeros(self, at: int, what: str, valid: bool) -> None:
        """A header block (valid or not) at `at`: was it preceded by zeros that are no end marker?"""
        if self.zero_start is not None:
            run = at - self.zero_start
            # An end-of-archive marker before a concatenated archive: at most one record of zeros, and the
            # next archive starts on a record boundary (tar writers pad to whole records). Anything else
            # is a zero-filled hole where members were.
            if not valid or run > self.limits.max_end_zero_bytes or at % tarfile.RECORDSIZE:
                self.holes = (*self.holes, f"{run} zero bytes at offset {self.zero_start} followed by {what} at offset {at}")
            self.zero_start = None


class _HeaderWatch(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tar: _Tar):
        at = tar.offset
        try:
            info = super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.after_zero_block = True
            if tar.zero_start is None:
                tar.zero_start = at
            raise
        except tarfile.InvalidHeaderError as e:
            tar.after_zeros(at, "non-zero bytes that are no header", valid=False)
            tar.bad_blocks += 1
            if tar.first_bad is None:
                where = f"after member {tar.members[-1].name!r}" if tar.members else "before the first member"
                tar.first_bad = f"{where} at offset {at} ({error_text(e)})"
            raise
        except tarfile.TruncatedHeaderError:
            tar.cut_in_header = True
            raise
        except tarfile.EmptyHeaderError:  # the end of the file
            if tar.zero_start is not None and at - tar.zero_start > tar.limits.max_end_zero_bytes:
                tar.zero_tail = (f"zero-filled tail: {at - tar.zero_start} zero bytes from offset {tar.zero_start} "
                                 f"to the end of the file, more than an end-of-archive marker "
                                 f"(max_end_zero_bytes {tar.limits.max_end_zero_bytes}): data is missing")
            raise
        tar.after_zeros(at, f"member {info.name!r}", valid=True)
        tar.after_zero_block = tar.cut_in_header = False
        return info


def _past_the_end(tar: _Tar, member: tarfile.TarInfo) -> str | None:
    """Why the member cannot be whole: its declared size (a pax `size` included) runs past the file's
    end. Said at once, before the stdlib skips or reads towards it (10**15 bytes would take days)."""
    has_data = member.isreg() or member.type not in tarfile.SUPPORTED_TYPES
    if tar.file_size is None or not has_data or member.offset_data + member.size <= tar.file_size:
        return None
    return (f"member {member.name!r} declares {member.size} bytes at offset {member.offset_data}, past the "
            f"file's end at {tar.file_size}")


def _bounded_seek(stream) -> None:
    """tarfile's stream skips a member by reading forward block by block even past the end of the data
    (a declared size of 10**15 bytes takes days): stop at the end of the data instead."""

    def seek(pos: int = 0) -> int:
        while stream.pos < pos:
            want = min(stream.bufsize, pos - stream.pos)
            if len(stream.read(want)) < want:
                break  # the end of the data: the caller's next read finds nothing, "unexpected end of data"
        return stream.pos

    stream.seek = seek


def _end_of_tar(tar: _Tar, last: str | None) -> str | None:
    """None when the archive was read whole to its end-of-archive marker, else the damage."""
    damage = []
    if tar.holes:
        damage.append(f"data after a zero block: {len(tar.holes)} zero-filled hole(s), the first {tar.holes[0]}; "
                      "members in them are lost")
    if tar.zero_tail:
        damage.append(tar.zero_tail)
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


def iter_tar(path: Path, cfg: ImageConfig, read: ShardRead, limits: LimitsConfig | None = None) -> Iterator[RawSample]:
    # Members of one sample are contiguous in webdataset tars; a sample is emitted as soon as the key
    # changes (or the same part repeats: a repeated key), so only one sample is held at a time.
    limits = limits or LimitsConfig()
    group: _Group | None = None
    last = reading = None  # the last member header read; the member whose data is being read
    try:
        st = os.stat(path)
        size, regular = st.st_size, stat.S_ISREG(st.st_mode)  # a pipe has no size to check against
        fh = open(path, "rb")
    except OSError as e:
        read.damaged(path, f"cannot open the file ({error_text(e)})")
        return
    damage, cut, tar, plain = None, False, None, False
    with fh:
        try:
            tar_class = type("_ThisTar", (_Tar,), {"limits": limits})
            with tar_class.open(fileobj=fh, mode="r|*", tarinfo=_HeaderWatch, ignore_zeros=True) as tar:
                plain = regular and getattr(tar.fileobj, "comptype", None) == "tar"
                tar.file_size = size if plain else None
                _bounded_seek(tar.fileobj)
                for member in tar:
                    last = member.name
                    del tar.members[:-1]  # the stdlib keeps every header read: memory would grow with the shard
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
                        group = _Group(key, limits)
                    bound = cfg.max_bytes if ext in IMAGE_EXTS else limits.max_json_bytes
                    if past := _past_the_end(tar, member):
                        raise _Refused(f"stopped while reading member {member.name!r}: {past} (the file is cut off "
                                       "or the header is false; not read)")
                    if len(group.parts) >= MAX_PARTS or (not unsafe and ext not in IMAGE_EXTS and ext not in READ_PARTS):
                        group.unread += 1  # not held, not even its name: a sample of a million parts costs nothing
                    elif unsafe:
                        group.unsafe[member.name] = unsafe
                        group.skip(ext, unsafe)
                    elif ext in IMAGE_EXTS and group.has_image():
                        group.skip(ext, f"second image .{ext} of the sample: not read")
                    elif not member.isreg():
                        kind = "link" if member.issym() or member.islnk() else "special file"
                        to = f" to {member.linkname!r}" if member.linkname else ""
                        group.skip(ext, f"member {member.name!r} is a {kind}{to}, not a regular file: not followed")
                    elif member.size > bound:
                        what, limit = ("image", "max_bytes") if ext in IMAGE_EXTS else (ext, f"max_{ext}_bytes")
                        limit = "max_json_bytes" if ext not in IMAGE_EXTS else limit
                        group.skip(ext, f"{what} payload {member.size} bytes > {limit} {bound}")
                    else:
                        reading = member.name
                        group.parts[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
                        reading = None
                damage, cut = _end_of_tar(tar, last), not tar.after_zero_block or tar.zero_tail is not None
        except Exception as e:  # noqa: BLE001 - whatever stops the stream damages the shard, not the run
            kind = "truncated tar" if "unexpected end of data" in str(e) or isinstance(e, EOFError) else "unreadable tar"
            where = (f"while reading member {reading!r}" if reading else f"after member {last!r}" if last
                     else "before the first member")
            damage = f"truncated tar: {e}" if isinstance(e, _Refused) else f"{kind}: stopped {where} ({error_text(e)})"
            cut = True
        if damage:
            offset = getattr(tar, "offset", None) if tar is not None else None
            how_far = (f"read to offset {min(offset, size)} of {size} bytes" if offset is not None and plain
                       else f"a compressed file of {size} bytes" if tar is not None else f"a file of {size} bytes")
            damage = printable(f"{damage}; {how_far}")
    if damage:
        read.damaged(path, damage)
    if group is not None:
        group.cut = damage if cut else None
        yield group.to_sample()
