"""Which weights answer: a model's identity for lineage keys and the result cache (stages/lineage.py).

A path says where a model is, not what it is: a folder replaced under the same path (a new checkpoint,
a fine-tune) answers differently. So a local folder is identified by a digest of its files' contents,
and a model that is not a local folder (a name an OpenAI-compatible server or the hub resolves) by its
path and declared `revision`. A declared revision always wins: it is the only way to tell apart weights
that the file digest cache cannot (see `weights_digest`).

Which files count: every file of the folder, in subfolders too, except hidden ones (`.git`, the hub's
`.cache`, `.gitattributes`) and documentation (`IGNORED_PATTERNS`). Weights (`*.safetensors`, `*.bin`,
`*.pt`, `*.pth`, `*.gguf`), `config.json`, `generation_config.json`, tokenizer and processor files,
chat templates and `*.py` remote code all count, and so does any file a loader reads that we did not
foresee: a file left out wrongly would replay another model's answers, one counted needlessly only
costs a recompute when it changes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from annotate.config import ModelConfig, SegmentConfig
from annotate.engines.model_path import resolve_model_path

log = logging.getLogger(__name__)

# Files that never change what a model answers (matched against the file name, case-insensitive).
IGNORED_PATTERNS = ("*.md", "license*", "notice*", "use_policy*", "*.png", "*.jpg", "*.jpeg", "*.gif", "*.svg")
CHUNK_BYTES = 8 << 20
DIGEST_CACHE_VERSION = 1


def default_cache_path() -> Path:
    """`$XDG_CACHE_HOME/longgrit/file-digests.json`, else under `~/.cache`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "longgrit" / "file-digests.json"


def model_files(folder: str | Path) -> list[Path]:
    """The files that define the model in `folder`, sorted by their path inside it."""
    root = Path(folder)
    files = []
    for path in root.rglob("*"):
        inside = path.relative_to(root)
        if any(part.startswith(".") for part in inside.parts) or not path.is_file():
            continue
        if any(fnmatch.fnmatch(path.name.lower(), pattern) for pattern in IGNORED_PATTERNS):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def file_sha256(path: Path, advance=None) -> str:
    """The file's contents as a hash, read in chunks (a weight shard is several GB); `advance(n)` is
    called with each chunk's size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            if advance is not None:
                advance(len(chunk))
    return h.hexdigest()


# Hashing more than this shows a progress bar: a 76B checkpoint's first digest reads ~150 GB (minutes).
PROGRESS_BYTES = 1 << 30


@contextmanager
def hashing_progress(name: str, total: int, console=None):
    """`advance(n)` for a transient bar of `total` bytes when `total` is worth one, else None. `console`:
    the rich Console the run shows its bars on (the terminal, not the library log); default stderr."""
    if total < PROGRESS_BYTES:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"identifying {name} (its files' digests, once)", total=total)
        yield lambda n: progress.advance(task, n)


def weights_digest(folder: str | Path, cache_path: str | Path | None = None, console=None) -> str:
    """A sha256 over the names (relative to `folder`) and contents of the model's files (`model_files`).

    Each file's digest is kept in a JSON file (`cache_path`, default `default_cache_path()`) under its
    real path, size and mtime, so a second call on an unchanged 140 GB folder reads no weights. The
    limit of that: a file replaced by one of the same size AND the same mtime (a copy with preserved
    times, `touch -r`) keeps its old digest. Declare a `revision` for such weights (`model_identity`)."""
    root = Path(folder)
    cache_file = Path(cache_path) if cache_path is not None else default_cache_path()
    cache = _load_cache(cache_file)
    h, updated = hashlib.sha256(), False
    files = [(path, os.path.realpath(path), path.stat()) for path in model_files(root)]
    stale = [stat.st_size for _, real, stat in files if not _cached(cache.get(real), stat)]
    with hashing_progress(root.name, sum(stale), console) as advance:
        for path, real, stat in files:
            entry = cache.get(real)
            if not _cached(entry, stat):
                entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path, advance)}
                cache[real], updated = entry, True
            h.update(json.dumps([path.relative_to(root).as_posix(), entry["sha256"]]).encode() + b"\n")
    if updated:
        _save_cache(cache_file, cache)
    return h.hexdigest()


def model_identity(model: ModelConfig | SegmentConfig, cache_path: str | Path | None = None,
                   console=None) -> dict[str, Any]:
    """What answers for `model`: its configured path, and its declared `revision` (a SAM model has none),
    or else (a local folder) the digest of its files. Compute it once per deployment: the first call reads
    every weight (a progress bar on `console` when that is worth one)."""
    revision = getattr(model, "revision", None)
    identity: dict[str, Any] = {"path": model.path, "revision": revision}
    if revision is None:
        local = Path(resolve_model_path(model.path))
        if local.is_dir():  # else a served name or a hub id: nothing here to read
            identity["weights"] = weights_digest(local, cache_path, console)
    return identity


def _cached(entry: dict | None, stat: os.stat_result) -> bool:
    """Whether a cache entry still describes the file (same size and mtime)."""
    return entry is not None and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns


def _load_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The cached digests by real path; an unreadable or foreign file is an empty cache (it is rebuilt)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("file digest cache %s unreadable, rebuilding it: %s", path, exc)
        return {}
    if not isinstance(raw, dict) or raw.get("version") != DIGEST_CACHE_VERSION or not isinstance(raw.get("files"), dict):
        return {}
    return {k: v for k, v in raw["files"].items() if isinstance(v, dict)}


def _save_cache(path: Path, files: dict[str, dict[str, Any]]) -> None:
    """Whole or not at all (a temporary file renamed over it); merged with what another process wrote
    meanwhile. A cache that cannot be written costs a re-read next time, never the digest."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_load_cache(path), **files}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": DIGEST_CACHE_VERSION, "files": merged}, f, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        log.warning("file digest cache %s not written: %s", path, exc)
