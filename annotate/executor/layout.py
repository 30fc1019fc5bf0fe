"""Where a run keeps its files, and the manifest that says which shard outputs are finished.

    OUT/data/NNNNN.parquet            final output, one file per shard (the dataset)
    OUT/stages/STAGE/NNNNN.parquet    a stage's stored output (prepare, object, validate, context)
    OUT/manifest.jsonl                one line per finished (output, shard), appended after the rename
    OUT/README.md                     the dataset card

A shard output is finished only when its file was renamed into place *and* the newest manifest line
for it says `finished`, under the run's config fingerprint, with the checksum the file still has.
Anything else is redone by the next run, which then replaces the file atomically: a crash at any
moment never leaves a half file where a reader looks, and never produces a second copy of a shard.
A shard read only in part (a truncated or corrupt input) gets a `damaged` line instead: its output
holds what could be read, and the next run tries it again.

One writer: only the driver appends to the manifest (read tasks on other nodes report to it), and only
while it holds the output lock, so lines never interleave, and file order is time order; that is why
"newest line wins" can simply mean "last line in the file". Appends from several NFS clients would not
be atomic; one marker file per shard would be, but would lose the history a line-per-event log keeps.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from annotate.data.writer import file_sha256

FINAL = "final"
FINISHED, DAMAGED = "finished", "damaged"  # the `state` of a manifest line (lines without one are finished)
# Which stored output each `--stage` reads and writes; `all` runs the whole chain.
STAGE_IO: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "all": ("prepare", FINAL, ("object", "validate", "context", "merge")),
    "object": ("prepare", "object", ("object",)),
    "validate": ("object", "validate", ("validate",)),
    "context": ("validate", "context", ("context",)),
    "merge": ("context", FINAL, ("merge",)),
}
MODEL_STAGE_PREFIXES = tuple(f"{name}:" for name in ("object", "validate", "context", "merge"))
# Region errors `--retry-failed` redoes: a model stage's, and `pipeline:` (no stage completed the region).
RETRYABLE_PREFIXES = (*MODEL_STAGE_PREFIXES, "pipeline:")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def output_path(self, output: str, shard: str) -> Path:
        if output == FINAL:
            return self.root / "data" / f"{shard}.parquet"
        return self.root / "stages" / output / f"{shard}.parquet"

    @property
    def cache_root(self) -> Path:
        """OUT/cache: finished model results of shards in flight, one folder per shard."""
        return self.root / "cache"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.jsonl"

    def manifest(self) -> list[dict[str, Any]]:
        if not self.manifest_path.exists():
            return []
        lines = []
        for line in self.manifest_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write counts as not written
        return lines

    def latest(self, output: str) -> dict[str, dict[str, Any]]:
        """shard -> its newest manifest line for `output`, whatever its config and state."""
        return {entry["shard"]: entry for entry in self.manifest()
                if entry.get("output") == output and isinstance(entry.get("shard"), str)}

    def finished(self, output: str, fingerprint: str) -> dict[str, dict[str, Any]]:
        """shard -> manifest line, for outputs whose newest line is `finished` and still holds."""
        return self._in_state(output, fingerprint, FINISHED)

    def damaged(self, output: str, fingerprint: str) -> dict[str, dict[str, Any]]:
        """shard -> manifest line, for outputs whose newest line is `damaged` (read in part) and still holds."""
        return self._in_state(output, fingerprint, DAMAGED)

    def _in_state(self, output: str, fingerprint: str, state: str) -> dict[str, dict[str, Any]]:
        return {shard: entry for shard, entry in self.latest(output).items() if self.is_current(entry, fingerprint, state)}

    def is_current(self, entry: dict[str, Any], fingerprint: str, *states: str) -> bool:
        """The line is in one of `states` (lines without a state are finished) and `holds`."""
        return entry.get("state", FINISHED) in states and self.holds(entry, fingerprint)

    def holds(self, entry: dict[str, Any], fingerprint: str) -> bool:
        """The line's config is this run's and its file is on disk with the checksum the line recorded
        (a file replaced, damaged or truncated since is redone)."""
        if entry.get("config") != fingerprint:
            return False
        path = self.output_path(entry["output"], entry["shard"])
        if not path.is_file():
            return False
        return file_sha256(path) == entry.get("sha256")

    def record_finished(self, entry: dict[str, Any]) -> None:
        """Append one manifest line and fsync it; called only after the output file is in place.

        `entry["state"]` is `finished` unless given (`damaged`)."""
        entry = {"state": FINISHED, **entry, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.manifest_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove_stale_temporaries(self) -> int:
        """Half-written files of a run that died; they never count as output."""
        removed = 0
        for path in list(self.root.glob("data/.*.tmp*")) + list(self.root.glob("stages/*/.*.tmp*")):
            path.unlink(missing_ok=True)
            removed += 1
        return removed


class OutputLock:
    """One run per output folder at a time (two drivers would race on the same shard files).

    An flock is released by the kernel when its holder dies, so a `kill -9` never leaves a stale lock.
    """

    def __init__(self, root: Path):
        self.path = root / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RuntimeError(
                f"another `annotate run` is writing to {self.path.parent}; wait for it to finish "
                "or choose another --output"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)


def iter_manifest_shards(layout: RunLayout, output: str) -> Iterator[dict[str, Any]]:
    """Latest manifest entry per shard for one output, whatever the config (for `annotate status`)."""
    latest = layout.latest(output)
    yield from (latest[k] for k in sorted(latest))
