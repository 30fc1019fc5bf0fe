"""The output store: where a run keeps its files, how they are read back, and the manifest that says
which shard outputs are finished. Every reader and writer of an output folder goes through here.

    OUT/data/NNNNN.parquet            final output, one file per shard (the dataset)
    OUT/stages/STAGE/NNNNN.parquet    a stored intermediate output (`prepare`, or one model stage's)
    OUT/cache/NNNNN/                  model results of a shard in flight (engines/result_cache.py)
    OUT/manifest.jsonl                one line per committed (output, shard), appended after the rename
    OUT/runs/TIME.json                what each `annotate run` did
    OUT/README.md                     the dataset card

A shard output is finished only when its file was renamed into place *and* the newest manifest line
for it says `finished`, under the run's config fingerprint, with the checksum the file still has (a
`--stage` output also when made under another config with the same lineage through its stage: the
run decides that, executor/runner.py `plan_work`).
Anything else is redone by the next run, which then replaces the file atomically: a crash at any
moment never leaves a half file where a reader looks, and never produces a second copy of a shard.
A shard read only in part (a truncated or corrupt input) gets a `damaged` line instead: its output
holds what could be read, and the next run tries it again.

One writer: only one process appends to the manifest (the run's driver; read tasks on other nodes
hand it their lines), and only while it holds the output lock, so lines never interleave and file
order is time order; that is why "newest line wins" can simply mean "last line in the file". Appends
from several NFS clients would not be atomic; one marker file per shard would be, but would lose the
history a line-per-event log keeps.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from annotate.config import PipelineConfig
from annotate.data.records import SCHEMA_VERSION, ImageRecord, RegionRecord, row_to_image_record, stored_columns
from annotate.data.writer import ShardWriter, atomic_file, file_sha256, write_bytes_atomic, write_dataset_card

FINAL = "final"  # the output name of the dataset itself (OUT/data)
PREPARE = "prepare"  # the data plane's output: regions and masks, before any model stage
FINISHED, DAMAGED = "finished", "damaged"  # the `state` of a manifest line (lines without one are finished)


class NoDataset(FileNotFoundError):
    """An OUT with no finished dataset shard."""


def config_fingerprint(cfg: PipelineConfig) -> str:
    """What a manifest line's `config` holds: a hash of every setting that changes a record and of the
    record schema's version (a new schema redoes older outputs: `datasets` cannot load a folder mixing
    two). A run computes it once: it reads every prompt file."""
    payload = {**cfg.record_settings(), "schema_version": SCHEMA_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def data_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """What the prepared regions and their masks depend on (the `data` and `segment` settings), with the
    record schema's version: all that the `prepare` output is keyed by, so that a new prompt or model
    keeps it (stages/lineage.py builds every stage's key on it)."""
    settings = cfg.record_settings()
    return {"data": settings["data"], "segment": settings.get("segment"), "schema_version": SCHEMA_VERSION}


def prepare_fingerprint(cfg: PipelineConfig) -> str:
    """The `config` of a `prepare` output's manifest line: a hash of `data_settings` alone."""
    payload = {"prepare": data_settings(cfg)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def json_bytes(obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> bytes:
    """What `write_json_atomic` writes for `obj`, for a caller that compares a file with it first."""
    return (json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n").encode()


def write_json_atomic(path: Path, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """The one way the store's JSON files (run records, frozen benchmarks) are written: whole or not at
    all, fsynced with their folder (`write_bytes_atomic`), so a crash never leaves a torn file to read."""
    return write_bytes_atomic(path, json_bytes(obj, indent=indent, sort_keys=sort_keys))


@dataclass(frozen=True)
class OutputStore:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------ paths
    def folder(self, output: str) -> Path:
        """Where one output's shard files lie: OUT/data for FINAL, else OUT/stages/OUTPUT."""
        return self.root / "data" if output == FINAL else self.root / "stages" / output

    def output_path(self, output: str, shard: str) -> Path:
        return self.folder(output) / f"{shard}.parquet"

    def files(self, output: str) -> list[Path]:
        """The Parquet files of one output, in shard order (hidden temporaries never count)."""
        return sorted(p for p in self.folder(output).glob("*.parquet") if not p.name.startswith("."))

    def dataset_files(self) -> list[Path]:
        """The dataset's Parquet files (OUT/data), in shard order."""
        return self.files(FINAL)

    def write_card(self, output: str, **info: Any) -> None:
        """OUT/README.md, pointing `datasets.load_dataset(OUT)` at `output`'s files."""
        write_dataset_card(self.root, (self.folder(output) / "*.parquet").relative_to(self.root).as_posix(), **info)

    @property
    def cache_root(self) -> Path:
        """OUT/cache: finished model results of shards in flight, one folder per shard."""
        return self.root / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def finished_dataset(self) -> tuple[dict[str, Path], list[str]]:
        """shard -> its dataset file, for the shards whose newest line is `finished` and still holds under
        that line's own config (what `diff` and `export` read, whatever config made the output), and the
        shards left out. NoDataset when no shard is finished."""
        done, left_out = {}, []
        for shard, entry in self.latest(FINAL).items():
            if self.is_current(entry, entry.get("config", ""), FINISHED):
                done[shard] = self.output_path(FINAL, shard)
            else:
                left_out.append(shard)
        if not done:
            raise NoDataset(f"{self.root} holds no finished dataset shard in {self.folder(FINAL)}"
                            f"{f' (not finished: {len(left_out)})' if left_out else ''}; run `annotate run` into it first")
        return done, left_out

    def run_records(self) -> list[dict[str, Any]]:
        """Every readable run record (OUT/runs/*.json), oldest first (their names start with the time)."""
        records = []
        for path in sorted(self.runs_dir.glob("*.json")) if self.runs_dir.is_dir() else []:
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # a record being written by another process, or not ours
                continue
        return records

    def library_log_path(self) -> Path:
        """OUT/logs/TIME-PID.log: what Ray, Serve and vLLM printed during one command (annotate/console.py)."""
        return self.root / "logs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"

    @property
    def gallery_dir(self) -> Path:
        """OUT/gallery: `annotate show`'s HTML pages, when no other folder is given."""
        return self.root / "gallery"

    @property
    def benchmarks_dir(self) -> Path:
        """OUT/benchmarks: the frozen evaluation split (`annotate eval --make-benchmark`, train/frozen.py),
        longgrit-N.json, region ids chosen by image; the trainer leaves its images out."""
        return self.root / "benchmarks"

    @property
    def near_duplicates_path(self) -> Path:
        """OUT/quality/near_duplicates.parquet: region_id -> near-duplicate cluster over the whole
        dataset, a run-level side file (stages/quality.py), so committed shard files never change."""
        return self.root / "quality" / "near_duplicates.parquet"

    def write_side_file(self, path: Path, table: pa.Table, **meta: Any) -> Path:
        """Write a run-level side file (a table keyed by region id) whole, then rename it into place;
        its metadata holds `meta` and the dataset files it covers with their checksums, so a reader
        can tell a side file older than the data. A crash leaves the previous one."""
        covers = {f.name: file_sha256(f) for f in self.dataset_files()}
        table = table.replace_schema_metadata({"longgrit": json.dumps({**meta, "files": covers})})
        with atomic_file(path) as fh:
            pq.write_table(table, fh)
        return path

    @property
    def region_text_scores_path(self) -> Path:
        """OUT/quality/region_text_scores.parquet: region_id -> a PixCLIP checkpoint's region-text score
        (`annotate score`, train/score.py), a side file like the near duplicates."""
        return self.root / "quality" / "region_text_scores.parquet"

    def region_text_scores(self) -> dict[str, float]:
        """region_id -> score from `annotate score`'s side file; empty without one."""
        if not self.region_text_scores_path.is_file():
            return {}
        table = pq.read_table(self.region_text_scores_path)
        return dict(zip(table.column("region_id").to_pylist(), table.column("score").to_pylist()))

    def near_duplicates(self) -> dict[str, tuple[str, int]]:
        """region_id -> (cluster_id, cluster_size) from the near-duplicate side file; empty without one."""
        if not self.near_duplicates_path.is_file():
            return {}
        table = pq.read_table(self.near_duplicates_path)
        return {rid: (cid, size) for rid, cid, size in zip(*(table.column(c).to_pylist()
                                                           for c in ("region_id", "cluster_id", "cluster_size")))}

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.jsonl"

    # --------------------------------------------------------------- manifest
    def manifest(self) -> list[dict[str, Any]]:
        if not self.manifest_path.exists():
            return []
        lines = []
        for line in self.manifest_path.read_text(errors="replace").splitlines():
            lines.extend(_manifest_entries(line))
        return lines

    def latest(self, output: str) -> dict[str, dict[str, Any]]:
        """shard -> its newest manifest line for `output`, whatever its config and state, in shard order."""
        latest = {entry["shard"]: entry for entry in self.manifest()
                  if entry.get("output") == output and isinstance(entry.get("shard"), str)}
        return {shard: latest[shard] for shard in sorted(latest)}

    def finished(self, output: str, fingerprint: str) -> dict[str, dict[str, Any]]:
        """shard -> manifest line, for outputs whose newest line is `finished` and still holds."""
        return self._in_state(output, fingerprint, FINISHED)

    def damaged(self, output: str, fingerprint: str) -> dict[str, dict[str, Any]]:
        """shard -> manifest line, for outputs whose newest line is `damaged` (read in part) and still holds."""
        return self._in_state(output, fingerprint, DAMAGED)

    def _in_state(self, output: str, fingerprint: str, state: str) -> dict[str, dict[str, Any]]:
        return {shard: entry for shard, entry in self.latest(output).items() if self.is_current(entry, fingerprint, state)}

    def is_current(self, entry: dict[str, Any] | None, fingerprint: str, *states: str) -> bool:
        """The line exists, is in one of `states` (lines without a state are finished) and `holds`."""
        return entry is not None and entry.get("state", FINISHED) in states and self.holds(entry, fingerprint)

    def holds(self, entry: dict[str, Any], fingerprint: str) -> bool:
        """The line's config is this run's and its file is on disk with the checksum the line recorded
        (a file replaced, damaged or truncated since is redone)."""
        if entry.get("config") != fingerprint:
            return False
        path = self.output_path(entry["output"], entry["shard"])
        if not path.is_file():
            return False
        return file_sha256(path) == entry.get("sha256")

    def record(self, entry: dict[str, Any]) -> None:
        """Append one manifest line and fsync it; called only after the output file is in place.

        `entry["state"]` is `finished` unless given (`damaged`)."""
        entry = {"state": FINISHED, **entry, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.manifest_path, "a+b") as f:
            torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END) or f.read(1)) != b"\n"
            # a line cut by a crash mid-write is ended first, so it can never swallow this one
            f.write((("\n" if torn else "") + json.dumps(entry, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    # ---------------------------------------------------------------- commits
    def writer(self, output: str, shard: str, expected_rows: int = 0) -> ShardWriter:
        """A writer for one shard output; nothing is visible until `commit_file` renames it into place."""
        return ShardWriter(self.output_path(output, shard), expected_rows)

    def commit_file(self, writer: ShardWriter, output: str, shard: str, fingerprint: str,
                    damage: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rename the shard's output into place; return its manifest line (for the manifest's one writer).

        `damage` ({damage, samples_read}) makes the line `damaged`: the output holds what was read."""
        stats = writer.commit()
        line = {"output": output, "shard": shard, "config": fingerprint, "sha256": stats.sha256, **stats.summary()}
        if damage:
            line.update(state=DAMAGED, **damage)
        return line

    def commit(self, writer: ShardWriter, output: str, shard: str, fingerprint: str,
               damage: dict[str, Any] | None = None, lineage: str | None = None) -> dict[str, Any]:
        """`commit_file`, then append its manifest line: for a process that is the manifest's writer.
        `lineage`: the digest of the lineage keys the output was made under (a whole-chain run's dataset),
        which the config fingerprint does not cover (model weights replaced under the same path)."""
        line = self.commit_file(writer, output, shard, fingerprint, damage)
        if lineage is not None:
            line["lineage"] = lineage
        self.record(line)
        return line

    def remove_stale_temporaries(self) -> int:
        """Half-written files of a run that died; they never count as output."""
        removed = 0
        for path in list(self.root.glob("data/.*.tmp*")) + list(self.root.glob("stages/*/.*.tmp*")):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def lock(self) -> "OutputLock":
        return OutputLock(self.root)


def _manifest_entries(line: str) -> list[dict[str, Any]]:
    """The manifest entries of one line: its object, or, when a crash cut a line and the next was appended
    to it (files written before torn lines were ended), the whole objects found after the cut."""
    try:
        entry = json.loads(line)
        return [entry] if isinstance(entry, dict) else []
    except ValueError:
        pass
    decoder, found, at = json.JSONDecoder(), [], line.find("{", 1)
    while at != -1:
        try:
            entry, end = decoder.raw_decode(line, at)
        except ValueError:
            at = line.find("{", at + 1)
            continue
        if isinstance(entry, dict) and "shard" in entry and "output" in entry:
            found.append(entry)
        at = line.find("{", end)
    return found


def input_stamp(path: Path) -> dict[str, Any] | None:
    """What a `prepare` line records of its input file (size, mtime), so a replaced input is redone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def input_changed(line: dict[str, Any] | None, path: Path) -> bool:
    """Whether the input file differs from the one the line was made from (lines without a stamp:
    unknown, taken as unchanged)."""
    recorded = (line or {}).get("input")
    return isinstance(recorded, dict) and input_stamp(path) != recorded


def damage_of(line: dict[str, Any]) -> dict[str, Any]:
    """{damage, samples_read} of a `damaged` manifest line (older lines lack `samples_read`: their images)."""
    return {"damage": line.get("damage", "damaged input"), "samples_read": line.get("samples_read", line.get("images", 0))}


class OutputLock:
    """One writer per output folder at a time (two drivers would race on the same shard files).

    An flock is released by the kernel when its holder dies, so a `kill -9` never leaves a stale lock.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RuntimeError(
                f"another `annotate` command is writing to {self.path.parent}; wait for it to finish "
                "or choose another --output"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)


# ------------------------------------------------------------------- reading
def count_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def read_columns(path: Path, columns: Sequence[str]) -> list[dict]:
    """The rows of one stored file with only `columns` (so no image bytes unless asked), as plain dicts:
    the way code outside the store reads a few fields of many regions. A name the schema does not have
    is refused here, not read as a missing column."""
    unknown = [c for c in columns if c not in stored_columns()]
    if unknown:
        raise KeyError(f"{unknown} are not columns of the stored schema ({', '.join(stored_columns())})")
    return pq.read_table(path, columns=list(columns)).to_pylist()


def read_region_lists(path: Path) -> list[list[dict]]:
    """Each stored image's regions (a list of dicts, [] for none), images left unread."""
    return [row["regions"] or [] for row in read_columns(path, ["regions"])]


def iter_region_fields(path: Path, fields: Sequence[str]) -> Iterator[dict]:
    """Each stored region of one file with only `fields`, one row group at a time: the nested columns
    alone are read (no images, no masks unless asked), so comparing a few fields of millions of regions
    stays cheap. A field the file predates (an older schema version) reads as None."""
    known = {info.alias or name for name, info in RegionRecord.model_fields.items()}
    unknown = [f for f in fields if f not in known]
    if unknown:
        raise KeyError(f"{unknown} are not region fields of the stored schema ({', '.join(sorted(known))})")
    parquet = pq.ParquetFile(path)
    # the nested column paths as the file spells them (regions.list.element.FIELD)
    prefixes = {parts[3]: ".".join(parts[:4]) for parts in (parquet.schema.column(i).path.split(".")
                                                           for i in range(len(parquet.schema)))
                if parts[0] == "regions" and len(parts) > 3}
    present = [prefixes[f] for f in dict.fromkeys(fields) if f in prefixes]
    absent = dict.fromkeys(f for f in fields if f not in prefixes)
    for group in range(parquet.num_row_groups):
        if not present:
            continue
        for regions in parquet.read_row_group(group, columns=present).column("regions").to_pylist():
            for region in regions or []:
                yield {**region, **absent}


def iter_stored_records(path: Path, batch_rows: int = 64) -> Iterator[ImageRecord]:
    """Stream a stored shard output; never holds more than `batch_rows` images in memory."""
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            yield row_to_image_record(row)
