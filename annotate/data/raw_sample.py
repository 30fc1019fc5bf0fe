"""What reading a shard yields, whatever its format: samples (`RawSample`) and what the reading found
besides them (`ShardRead`: benign problems, and damage). Shared by `shards.py` and `tar_reader.py`."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import quote

log = logging.getLogger("annotate.data.shards")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


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
        msg = printable(msg)
        log.warning("%s: %s", printable(str(path)), msg)
        self.problems.append(f"{printable(path.name)}: {msg}")

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


def error_text(e: BaseException) -> str:
    return printable(f"{type(e).__name__}: {e}".strip().rstrip(":"))[:500]


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` safe for a terminal or a log: control characters (escape sequences, bidi overrides,
    line breaks) and lone surrogates are written as \\xNN / \\uNNNN escapes."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


def unsafe_reason(name: str) -> str | None:
    """Why a tar member name or a Parquet key cannot be trusted as a key: it reads as a path outside
    the shard, or holds characters a terminal or a file system would act on. None when it is safe."""
    return ("absolute path" if name.startswith("/")
            else "parent directory reference" if ".." in name.split("/")
            else "backslash in the name" if "\\" in name
            else "control character in the name" if _CONTROL.search(name) or "\x00" in name
            else None)


def safe_key(raw_key: str) -> tuple[str, str | None]:
    """(the key to store, why the raw key is unsafe or None): one rule for tar member names and Parquet
    keys. Bytes that are not UTF-8 (decoded as surrogates) are %-escaped; an unsafe key is %-quoted
    whole, so it can never read as a path or reach a terminal raw."""
    raw_key = _SURROGATE.sub(lambda m: f"%{ord(m.group()) - 0xDC00:02X}" if "\udc80" <= m.group() <= "\udcff"
                             else "\ufffd", raw_key)
    unsafe = unsafe_reason(raw_key)
    if unsafe:
        return quote(raw_key, safe=""), unsafe
    return str(PurePosixPath(raw_key)) if raw_key else raw_key, None
