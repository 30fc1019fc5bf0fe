"""A breaker per stage: stop a run when nearly every recent region of a stage fails the same way.

A systematic defect (a wrong stop token, a template error, a box format the model misreads, a prompt
over budget, a hung replica) fails region after region with one error kind at full speed. `Breaker`
is fed every region outcome of one stage (ok, rejected, or failed with its kind) and trips when, over
the last `window` outcomes, once at least `min_count` are in, the failures of one kind reach
`threshold` of them. Scattered failures of mixed kinds never trip it.

Outcomes may arrive in counts (the driver sees what chain workers reported since its last look): a
chunk is taken as spread evenly over its outcomes, so a window shared by several chunks keeps their
proportions. Pure: no Ray, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from annotate.config import BreakerConfig

OK = "ok"  # an answered region (a rejection is an answer too)


@dataclass(frozen=True)
class Trip:
    """Why a stage's breaker tripped."""

    stage: str
    kind: str  # the error kind that filled the window
    failed: float  # outcomes of that kind in the window
    seen: float  # outcomes in the window
    samples: tuple[str, ...] = ()

    @property
    def share(self) -> float:
        return self.failed / self.seen if self.seen else 0.0


# What to check for each error kind (stages/batch.py and engines/base.py name them).
ADVICE: dict[str, str] = {
    "timeout": "a replica that hangs or is far slower than planned: the model's replica logs, GPU health "
               "(nvidia-smi), or a larger `deadline_s` for the stage",
    "length": "answers cut by max_tokens: the stage's `sampling.max_tokens`, and its stop tokens (a wrong stop "
              "token lets the model run on)",
    "parse": "answers that do not read: the stage's prompt and JSON schema, the model's stop tokens and chat "
             "template (`annotate doctor`)",
    "unfinished_reasoning": "a reasoning model that never closes its </think>: max_tokens, thinking_token_budget "
                            "and the model's reasoning_parser",
    "invalid_input": "requests the model refuses: the prompt's length against max_model_len, image count per "
                     "prompt (limit_mm_per_prompt), the chat template",
    "rejected": "the server refuses the requests: its logs and the model's engine arguments",
    "http": "the serving layer fails: the replica logs in the Ray dashboard (Serve tab)",
    "engine_dead": "replicas that keep dying: their logs (out of memory? CUDA errors?) and the model's resources",
    "internal": "an error inside the engine: the replica logs in the Ray dashboard (Serve tab)",
    "input": "requests that cannot be built: the prompt template and the image crops",
    "echo": "answers that repeat the prompt: the chat template and stop tokens, or a model too weak for the prompt",
    "copied_example": "answers that copy the prompt's example: the prompt, or a model too weak for it",
    "no_description": "empty answers: the stop tokens (a stop token the model emits at once) and min_tokens",
    "contradictory_verdict": "verdicts their reasons contradict: the prompt and the model's box format",
}


def advice(kind: str) -> str:
    return ADVICE.get(kind, "the stage's prompt, sampling and model settings (`annotate doctor`)")


class BreakerTripped(RuntimeError):
    """A stage failed systematically; the run stopped. The message says what to check."""

    def __init__(self, trip: Trip):
        self.trip = trip
        samples = "\n".join(f"  - {s}" for s in trip.samples[:2]) or "  (no sample kept)"
        super().__init__(
            f"stopped: stage {trip.stage!r} failed {trip.failed:.0f} of its last {trip.seen:.0f} regions "
            f"({trip.share:.0%}) with `{trip.kind}` errors, e.g.:\n{samples}\n"
            f"Check {advice(trip.kind)}.\n"
            "Shards already committed stay committed; shards in flight were not recorded as finished. After the "
            "fix, rerun the same command to resume (add --retry-failed to redo the failed regions of committed "
            "shards). `run.breaker` in the pipeline file sets when this trips (enabled: false turns it off).")


@dataclass
class Breaker:
    """One stage's breaker over a rolling window of region outcomes."""

    stage: str
    window: int = 200
    min_count: int = 50
    threshold: float = 0.8
    _chunks: deque = field(default_factory=deque)  # dict(outcome -> count), oldest first
    _samples: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, stage: str, config: BreakerConfig) -> "Breaker":
        return cls(stage, config.window, config.min_count, config.threshold)

    def add(self, outcome: str = OK, count: float = 1, sample: str | None = None) -> Trip | None:
        """One outcome (`ok`, `rejected`, or a failure's error kind), `count` times."""
        if sample:
            self._sample(outcome, sample)
        return self.add_counts({outcome: count})

    def add_counts(self, outcomes: Mapping[str, float], samples: Mapping[str, list[str]] | None = None) -> Trip | None:
        """Outcomes that happened together (e.g. {"ok": 30, "parse": 12}); returns the trip, if any."""
        for kind, texts in (samples or {}).items():
            for text in texts:
                self._sample(kind, text)
        chunk = {k: float(v) for k, v in outcomes.items() if v > 0}
        total = sum(chunk.values())
        if total <= 0:
            return self.check()
        if total > self.window:  # only the newest `window` outcomes of it stay, in its proportions
            chunk = {k: v * self.window / total for k, v in chunk.items()}
        self._chunks.append(chunk)
        self._trim()
        return self.check()

    def _sample(self, kind: str, text: str) -> None:
        kept = self._samples.setdefault(kind, [])
        if len(kept) < 2 and text not in kept:
            kept.append(text)

    def _trim(self) -> None:
        excess = self.seen - self.window
        while excess > 1e-9 and self._chunks:
            oldest = self._chunks[0]
            size = sum(oldest.values())
            if size <= excess + 1e-9:
                self._chunks.popleft()
                excess -= size
            else:
                keep = (size - excess) / size
                self._chunks[0] = {k: v * keep for k, v in oldest.items()}
                excess = 0

    @property
    def seen(self) -> float:
        return sum(sum(c.values()) for c in self._chunks)

    def counts(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for chunk in self._chunks:
            for k, v in chunk.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def check(self) -> Trip | None:
        seen = self.seen
        if seen + 1e-9 < self.min_count:
            return None
        failures = {k: v for k, v in self.counts().items() if k not in (OK, "rejected")}
        if not failures:
            return None
        kind, failed = max(failures.items(), key=lambda kv: kv[1])
        if failed / seen + 1e-9 < self.threshold:
            return None
        return Trip(self.stage, kind, failed, seen, tuple(self._samples.get(kind, ())[:2]))


class StageBreakers:
    """The driver's breakers, one per stage, fed from cumulative per-stage counts (the progress
    tracker's snapshot: done, rejected, failed, failures_by_kind, error_samples): each look adds what
    changed since the last one."""

    def __init__(self, config: BreakerConfig, stages: tuple[str, ...] | list[str]):
        self.config = config
        self.breakers = {s: Breaker.of(s, config) for s in stages}
        self._last: dict[str, dict[str, float]] = {}
        self.trip: Trip | None = None

    def observe(self, stages: Mapping[str, Mapping]) -> Trip | None:
        """Feed the newest cumulative counts per stage; returns (and keeps) the first trip."""
        if not self.config.enabled or self.trip is not None:
            return self.trip
        for stage, agg in stages.items():
            breaker = self.breakers.get(stage)
            if breaker is None:
                continue
            now = outcomes_of(agg)
            last = self._last.get(stage, {})
            # Counts only grow: an older snapshot seen late adds nothing and is not taken as the newest.
            delta = {k: max(0.0, v - last.get(k, 0.0)) for k, v in now.items()}
            self._last[stage] = {k: max(v, last.get(k, 0.0)) for k, v in {**last, **now}.items()}
            trip = breaker.add_counts(delta, agg.get("error_samples") or {})
            if trip is not None:
                self.trip = trip
                return trip
        return None


def outcomes_of(agg: Mapping) -> dict[str, float]:
    """Cumulative region outcomes of one stage's counts: ok, rejected, and failures by kind (failures
    with no kind recorded count as `internal`)."""
    by_kind = dict(agg.get("failures_by_kind") or {})
    unknown = agg.get("failed", 0) - sum(by_kind.values())
    if unknown > 0:
        by_kind["internal"] = by_kind.get("internal", 0) + unknown
    rejected = agg.get("rejected", 0)
    # `done` counts answered regions, rejections included; regions the stage had nothing to ask also count.
    return {OK: float(agg.get("done", 0) - rejected), "rejected": float(rejected),
            **{k: float(v) for k, v in by_kind.items()}}
