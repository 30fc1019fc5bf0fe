"""Progress of a run: chain workers report each stage's counts to one small actor; the driver draws them.

Counts also go to Ray's metrics API (`ray.util.metrics`), so they appear on the Ray dashboard's
metrics page and in Prometheus under `ray_longgrit_*`.
"""

from __future__ import annotations

import re
import threading
import time

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from annotate.stages.batch import StageCounts
from annotate.stages.breaker import BreakerTripped, StageBreakers


@ray.remote(num_cpus=0)
class ProgressTracker:
    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self.started = time.time()

    def report(self, stage: str, counts: dict) -> None:
        agg = self.stages.setdefault(stage, {"regions": 0, "done": 0, "rejected": 0, "failed": 0, "tokens": 0,
                                             "model_calls": 0, "replayed": 0})
        agg["regions"] += counts["regions_in"]
        agg["model_calls"] += counts.get("model_calls", 0)
        agg["replayed"] += counts.get("replayed", 0)
        agg["done"] += counts["done"]
        agg["rejected"] += counts["rejected"]
        agg["failed"] += counts["failed"]
        agg["tokens"] += counts["prompt_tokens"] + counts["completion_tokens"]
        agg["timeouts"] = agg.get("timeouts", 0) + counts.get("timeouts", 0)
        by_kind = agg.setdefault("failures_by_kind", {})
        for kind, n in (counts.get("failures_by_kind") or {}).items():
            by_kind[kind] = by_kind.get(kind, 0) + n
        samples = agg.setdefault("error_samples", {})
        for kind, messages in (counts.get("error_samples") or {}).items():
            kept = samples.setdefault(kind, [])
            kept.extend(m for m in messages if len(kept) < 2 and m not in kept)
        for key in ANSWER_COUNTS:  # what the answer rules did (stages/answers.py), for the run record
            agg[key] = agg.get(key, 0) + counts.get(key, 0)

    def snapshot(self) -> dict:
        return {"elapsed": time.time() - self.started, "stages": self.stages}


# StageCounts fields about the answers read (stages/batch.py): kept per stage in the run record.
ANSWER_COUNTS = ("answers", "cleaned", "retried", "echo", "copied_example", "no_description", "contradictory_verdict")

_CALLS_LINE = re.compile(r"^(\w+): (\d+) model calls, (\d+) replayed from the result cache$", re.M)


def calls_line(stage: str, agg: dict) -> str:
    """One stage's model calls and replays, as the run prints them when it ends (`parse_calls` reads it)."""
    return f"{stage}: {int(agg.get('model_calls', 0))} model calls, {int(agg.get('replayed', 0))} replayed from the result cache"


def parse_calls(text: str) -> dict[str, tuple[int, int]]:
    """stage -> (model calls, replayed) from a run's console output (benchmarks, tests)."""
    return {m[1]: (int(m[2]), int(m[3])) for m in _CALLS_LINE.finditer(text)}


class StageMetrics:
    """Ray metrics for one stage of a chain worker; cheap to call per batch."""

    def __init__(self, stage: str):
        from ray.util import metrics

        self.tags = {"stage": stage}
        self.regions = metrics.Counter(
            "longgrit_regions", description="regions processed by a stage, by outcome", tag_keys=("stage", "outcome")
        )
        self.tokens = metrics.Counter("longgrit_tokens", description="prompt+completion tokens", tag_keys=("stage",))
        self.cached = metrics.Counter(
            "longgrit_cached_prompt_tokens", description="prompt tokens served from vLLM's prefix cache", tag_keys=("stage",)
        )
        self.calls = metrics.Counter(
            "longgrit_model_calls", description="requests by source: the model, or replayed from the result cache",
            tag_keys=("stage", "source"))
        self.latency = metrics.Histogram(
            "longgrit_request_latency_s",
            description="model request latency",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
            tag_keys=("stage",),
        )

    def record(self, counts: StageCounts) -> None:
        ok = counts.done - counts.rejected
        for outcome, value in (("ok", ok), ("rejected", counts.rejected), ("failed", counts.failed)):
            if value:
                self.regions.inc(value, tags={**self.tags, "outcome": outcome})
        for source, value in (("model", counts.model_calls), ("replayed", counts.replayed)):
            if value:
                self.calls.inc(value, tags={**self.tags, "source": source})
        if counts.prompt_tokens + counts.completion_tokens:
            self.tokens.inc(counts.prompt_tokens + counts.completion_tokens, tags=self.tags)
        if counts.cached_prompt_tokens:
            self.cached.inc(counts.cached_prompt_tokens, tags=self.tags)
        for latency in counts.latencies:
            self.latency.observe(latency, tags=self.tags)


class ProgressDisplay:
    """Rich bars per stage (done/total regions, regions/s, rejected, failed), refreshed from the tracker.
    With `breakers`, every look at the tracker also feeds each stage's breaker (stages/breaker.py); the
    driver's loop calls `raise_if_tripped` to stop the run."""

    def __init__(self, tracker, stages: tuple[str, ...], shards_total: int, console: Console | None = None,
                 breakers: StageBreakers | None = None):
        self.tracker = tracker
        self.breakers = breakers
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.shard_task = self.progress.add_task("shards", total=shards_total, detail="")
        self.stage_tasks = {s: self.progress.add_task(s, total=None, detail="") for s in stages}
        self.model_calls: dict[str, dict[str, int]] = {}  # stage -> model calls and replays, once the run ends
        self.answers: dict[str, dict[str, int]] = {}  # stage -> what the answer rules did, once the run ends
        self.failures: dict[str, dict[str, int]] = {}  # stage -> failed regions by error kind, once the run ends
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "ProgressDisplay":
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        snap = self.refresh()
        self.progress.stop()
        self.model_calls = {stage: {"model_calls": int(agg.get("model_calls", 0)), "replayed": int(agg.get("replayed", 0))}
                            for stage, agg in (snap or {}).get("stages", {}).items()}
        self.answers = {stage: {key: int(agg.get(key, 0)) for key in ANSWER_COUNTS}
                        for stage, agg in (snap or {}).get("stages", {}).items()}
        self.failures = {stage: dict(agg.get("failures_by_kind") or {})
                         for stage, agg in (snap or {}).get("stages", {}).items()}
        for stage in self.stage_tasks:  # what the run asked its models, and what it replayed instead
            if snap and stage in snap["stages"]:
                self.console.print(calls_line(stage, snap["stages"][stage]), markup=False, highlight=False,
                                   crop=False, soft_wrap=True)

    def shard_done(self) -> None:
        self.progress.advance(self.shard_task)

    def refresh(self) -> dict | None:
        try:
            snap = ray.get(self.tracker.snapshot.remote(), timeout=5)
        except Exception:
            return None
        elapsed = max(snap["elapsed"], 1e-6)
        if self.breakers is not None:
            with self._lock:  # the poll thread and the final look: each change fed once
                self.breakers.observe(snap["stages"])
        for stage, task in self.stage_tasks.items():
            agg = snap["stages"].get(stage)
            if not agg:
                continue
            finished = agg["done"] + agg["failed"]
            self.progress.update(
                task,
                completed=finished,
                total=max(agg["regions"], finished),
                detail=f"{finished / elapsed:5.1f} reg/s  rejected {int(agg['rejected'])}  failed {int(agg['failed'])}"
                       + (f"  replayed {int(agg['replayed'])}" if agg.get("replayed") else "")
                       + (f"  timeouts {int(agg['timeouts'])}" if agg.get("timeouts") else ""),
            )
        return snap

    def raise_if_tripped(self, look: bool = False) -> None:
        """Raise `BreakerTripped` when a stage's breaker has tripped: at the poll thread's last look, or
        with `look` at a fresh one (the driver, before it records a shard as finished)."""
        if self.breakers is None:
            return
        if look and self.breakers.trip is None:
            self.refresh()
        if self.breakers.trip is not None:
            raise BreakerTripped(self.breakers.trip)

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            self.refresh()
