"""Finished model results kept on disk, so that a run which dies does not pay for them twice.

At production shard sizes the model calls of the shards in flight are hours of four large models;
without this, a crash (driver, node, OOM) loses all of them, because a shard's output is written
only once every image has gone through the whole chain. Here each successful result is stored the
moment it arrives, under a key made of everything that determines it (`request_key`), and a rerun
takes it from the store instead of asking the model again (`ResultCache.wrap`).

Layout: `ROOT/<shard>/<prefix>-<host>-<pid>-<random>.sqlite`, one SQLite file per writer (a stage
worker) and shard. One writer per file because the files lie on storage shared by many nodes, where
SQLite's locking cannot be trusted between hosts: nobody ever writes into another process's file.
A writer commits each result on its own (WAL, `synchronous=NORMAL`: a SIGKILL or OOM kill keeps
everything committed before it; a power cut may lose the last few, never corrupt the file). Readers
open the other writers' files read-only. Rows are never updated, and each carries a digest of its
value that is checked on read, so a reader that sees another host's file late sees a miss, never a
wrong answer. A shard's folder is removed once the shard's output is committed (`remove_shard`);
that can happen under a writer's feet, so every storage error is logged and costs a miss or an
unstored result, never a region.

Engines know nothing of prompts or stages: this module only hashes requests and stores results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from PIL import Image

from annotate.engines.base import ChatRequest, ChatResult

log = logging.getLogger(__name__)

# Bumped when the key or the stored form changes: older files then simply miss.
CACHE_VERSION = 1
SUFFIX = ".sqlite"
# Settings that change how many copies of a model run or where, never what it answers.
_SCALE_ONLY = {"serving": None, "resources": ("replicas", "num_cpus", "custom")}

AsyncChat = Callable[[ChatRequest], Awaitable[ChatResult]]


# --------------------------------------------------------------------------------------- keys
def model_fingerprint(model_id: str, settings: dict[str, Any] | None = None) -> str:
    """What identifies a model's answers: its id plus the settings that change outputs (a model
    config's `model_dump(mode="json")`, through `answer_settings`)."""
    return _digest({"model": model_id, "settings": answer_settings(settings or {})})


def answer_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A model config's `model_dump(mode="json")` without its scale-only settings, so that a rerun on
    more replicas still finds the results of the run that died."""
    settings = json.loads(json.dumps(settings))  # a deep copy we may prune
    for section, keys in _SCALE_ONLY.items():
        if keys is None:
            settings.pop(section, None)
        elif isinstance(settings.get(section), dict):
            for key in keys:
                settings[section].pop(key, None)
    return settings


def image_digest(image: Image.Image) -> str:
    """The pixels (with mode and size) as a hash: the key holds no image bytes."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, Image.Image):
        return {"__image_sha256__": image_digest(value)}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot key a request holding {type(value).__name__}")


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def request_key(model: str, request: ChatRequest) -> str | None:
    """The key of a request's result: model fingerprint, rendered messages (images as pixel hashes),
    sampling (seed and temperature included) and JSON schema. Not the request id: two regions that
    send the same request get the same answer. None when the request holds something we cannot hash
    (it is then never cached)."""
    try:
        return _digest({"v": CACHE_VERSION, "model": model, "messages": _canonical(request.messages),
                        "sampling": request.sampling.model_dump(mode="json"),
                        "schema": _canonical(request.json_schema)})
    except (TypeError, ValueError) as exc:
        log.warning("result cache: request %s not cached: %s", request.request_id, exc)
        return None


def _dump_result(result: ChatResult) -> str:
    stored = dataclasses.asdict(result)
    del stored["request_id"]
    return json.dumps(stored, sort_keys=True)


def _load_result(value: str, request_id: str, latency_s: float) -> ChatResult:
    """The stored result as the live call gave it, under this request's id; its latency is the
    lookup's (metrics then show what the replay cost, not what the first call did)."""
    return ChatResult(**{**json.loads(value), "request_id": request_id, "latency_s": latency_s})


# -------------------------------------------------------------------------------------- storage
_SCHEMA = "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT NOT NULL, digest TEXT NOT NULL)"


class ShardStore:
    """One shard's folder: this process's own file (made on the first result) and the others, read-only."""

    def __init__(self, folder: Path, prefix: str):
        self.folder = folder
        self.prefix = prefix
        self.own_name = f"{prefix}-{_safe(socket.gethostname())}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        self.writer: sqlite3.Connection | None = None
        self.write_failed = False
        self.readers: dict[str, sqlite3.Connection] = {}

    def refresh(self) -> None:
        """Open the files other writers left since the last look (a worker that died a moment ago
        in this run, or the whole previous run)."""
        try:
            names = sorted(p.name for p in self.folder.glob(f"{self.prefix}-*{SUFFIX}"))
        except OSError as exc:
            log.warning("result cache: cannot list %s: %s", self.folder, exc)
            return
        for name in names:
            if name == self.own_name or name in self.readers:
                continue
            try:
                # A second's wait at most: a lookup holds up the worker's event loop.
                conn = sqlite3.connect(f"{(self.folder / name).as_uri()}?mode=ro", uri=True, timeout=1.0)
                conn.execute("SELECT 1 FROM results LIMIT 1")
            except sqlite3.Error as exc:  # a file its writer had only just created, or a damaged one
                log.warning("result cache: cannot read %s yet: %s", self.folder / name, exc)
                continue
            self.readers[name] = conn

    def get(self, key: str) -> str | None:
        for conn in ([self.writer] if self.writer else []) + list(self.readers.values()):
            try:
                row = conn.execute("SELECT value, digest FROM results WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error as exc:
                log.warning("result cache: lookup in %s failed: %s", self.folder, exc)
                continue
            if row is not None and hashlib.sha256(row[0].encode()).hexdigest() == row[1]:
                return row[0]
        return None

    def put(self, key: str, value: str) -> None:
        if self.write_failed:
            return
        try:
            if self.writer is None:
                self.writer = self._open_writer()
            with self.writer:  # one transaction, committed at once: durable before the next result
                self.writer.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?)",
                                    (key, value, hashlib.sha256(value.encode()).hexdigest()))
        except (sqlite3.Error, OSError) as exc:
            # The folder may have been removed because the shard is committed: nothing left to keep.
            log.warning("result cache: cannot store into %s (results of this shard are no longer kept "
                        "by this worker): %s", self.folder, exc)
            self.write_failed = True

    def _open_writer(self) -> sqlite3.Connection:
        self.folder.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.folder / self.own_name, timeout=1.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")  # appends, no rollback journal per commit
        conn.execute("PRAGMA synchronous=NORMAL")  # survives a killed process; no fsync per result
        conn.execute(_SCHEMA)
        conn.isolation_level = ""  # `with conn:` then opens and commits one transaction per result
        return conn

    def close(self) -> None:
        for conn in ([self.writer] if self.writer else []) + list(self.readers.values()):
            try:
                conn.close()  # the writer's close checkpoints its WAL into the file
            except sqlite3.Error:
                pass
        self.writer, self.readers = None, {}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name)[:64] or "host"


@dataclasses.dataclass
class CallTally:
    """What the wrapped chat did: requests sent to the model, and requests answered from the store."""

    model_calls: int = 0
    replayed: int = 0


class ResultCache:
    """A chain worker stage's view of the store: one `ShardStore` per shard it works on, the most recent
    `open_shards` kept open (a long run moves through many shards; each open file costs descriptors).

    `fingerprint` is what every key holds besides the request itself: what answers it. A
    `model_fingerprint` names the model by its path and settings only; the stage's lineage
    (stages/lineage.py `LineageKey.answer_digest`) adds the digest of its weights, the prompt's version
    and the sampling, so that replaced weights or another prompt never replay an old answer."""

    def __init__(self, root: str | Path, prefix: str, fingerprint: str, open_shards: int = 8):
        self.root = Path(root)
        self.prefix = _safe(prefix)
        self.fingerprint = fingerprint
        self.open_shards = open_shards
        self.stores: OrderedDict[str, ShardStore] = OrderedDict()

    def store(self, shard: str) -> ShardStore:
        store = self.stores.pop(shard, None) or ShardStore(self.root / shard, self.prefix)
        self.stores[shard] = store
        while len(self.stores) > self.open_shards:
            self.stores.popitem(last=False)[1].close()
        return store

    def wrap(self, shard: str, chat: AsyncChat, tally: CallTally) -> AsyncChat:
        """`chat` with the store of `shard` in front of it: a stored result is replayed, a new
        successful one is stored before it is returned. Errors are never stored (a rerun asks again)."""
        store = self.store(shard)
        store.refresh()

        async def cached_chat(request: ChatRequest) -> ChatResult:
            started = time.perf_counter()
            key = request_key(self.fingerprint, request)
            value = store.get(key) if key is not None else None
            if value is not None:
                try:
                    result = _load_result(value, request.request_id, time.perf_counter() - started)
                    tally.replayed += 1
                    return result
                except (TypeError, ValueError) as exc:  # written by another version of ChatResult
                    log.warning("result cache: stored result unusable, asking the model: %s", exc)
            tally.model_calls += 1
            result = await chat(request)
            if key is not None and result.ok:
                try:
                    value = _dump_result(result)
                except (TypeError, ValueError) as exc:  # a parsed value JSON cannot hold: not kept
                    log.warning("result cache: result of %s not kept: %s", request.request_id, exc)
                else:
                    store.put(key, value)
            return result

        return cached_chat

    def close(self) -> None:
        while self.stores:
            self.stores.popitem()[1].close()


def counting(chat: AsyncChat, tally: CallTally) -> AsyncChat:
    """`chat` counted, for a worker without a store (the cache turned off)."""

    async def counted_chat(request: ChatRequest) -> ChatResult:
        tally.model_calls += 1
        return await chat(request)

    return counted_chat


def remove_shard(root: str | Path, shard: str) -> None:
    """Forget a shard's results: call once its output is committed (the results are then in the
    Parquet file). Workers still holding a file of it lose nothing they need and fail nothing."""
    shutil.rmtree(Path(root) / shard, ignore_errors=True)


def count_stored(folder: str | Path, prefix: str = "") -> int:
    """Results stored in one shard's folder by all writers together, or by those of one `prefix`
    (a stage's: "object-"); for benchmarks and tests."""
    total = 0
    for path in sorted(Path(folder).glob(f"{prefix}*{SUFFIX}")):
        try:
            conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=1.0)
            try:
                total += conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            finally:
                conn.close()
        except sqlite3.Error:
            continue  # a file whose writer is still creating it
    return total
