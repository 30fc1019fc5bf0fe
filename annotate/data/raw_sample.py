"""What reading a shard yields, whatever its format: samples (`RawSample`) and what the reading found
besides them (`ShardRead`: benign problems, and damage). Shared by `shards.py` and `tar_reader.py`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

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


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip().rstrip(":")
