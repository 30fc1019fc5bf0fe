"""Run one stage over a batch of image records: build requests, call the model, read the answers.

Independent of Ray: `run_stage` takes any callable that maps a list of requests to results in order
(an engine's `chat`); `run_stage_async` takes a coroutine function for one request (the executor's
client of a Serve deployment). Retryable failures (cut
output, unparsable JSON, timeouts) are asked again up to `max_attempts`; after that, and for
non-retryable errors, the region is `failed` with the reason. An answer that the answer rules
(stages/answers.py, through `Stage.review`) say is not an answer (an echo of the prompt, its example
copied, no description, a verdict its reason contradicts) is asked again once, then fails the region
with the rule's reason. A problem with one region never stops the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields, replace

from PIL import Image

from annotate.config import CropConfig
from annotate.data.records import ImageRecord
from annotate.engines.base import ChatRequest, ChatResult
from annotate.stages.answers import NotAnAnswer, counter_of
from annotate.stages.base import RegionContext, Stage

ChatFn = Callable[[list[ChatRequest]], list[ChatResult]]
AsyncChatFn = Callable[[ChatRequest], Awaitable[ChatResult]]


@dataclass
class StageCounts:
    """What one call of `run_stage` did; summed into progress and metrics by the executor."""

    regions_in: int = 0  # regions this stage took
    done: int = 0  # answered and applied (including rejections)
    rejected: int = 0
    failed: int = 0
    retried: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prefix-cache hits (bench/prefix_cache.py)
    model_calls: int = 0  # requests sent to the model (set by the executor's chain worker)
    replayed: int = 0  # requests answered from the result cache instead (engines/result_cache.py)
    # What the answer rules (stages/answers.py) did, per answer read (a retried region counts each time):
    answers: int = 0  # successful results read
    cleaned: int = 0  # stored after the stripper changed it (labels, markdown, preambles, restated inputs)
    echo: int = 0  # rejected: repeats the prompt's instruction
    copied_example: int = 0  # rejected: repeats the prompt's worked example
    no_description: int = 0  # rejected: nothing left once stripped
    contradictory_verdict: int = 0  # rejected (or marked unverified): a verdict its reason contradicts
    timeouts: int = 0  # responses that missed the stage's deadline (each one once; the region may be retried)
    # Failed regions by error kind (the `kind` of `Stage.fail`: timeout, length, parse, echo, input...), and
    # up to SAMPLES_PER_KIND of their messages: what the driver's breaker (stages/breaker.py) reads.
    failures_by_kind: dict[str, int] = field(default_factory=dict)
    error_samples: dict[str, list[str]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def add(self, other: "StageCounts") -> None:
        for f in fields(self):  # every counter, so a new one cannot be left out of the sum
            if f.name not in _NOT_SUMMED:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        for kind, n in other.failures_by_kind.items():
            self.failures_by_kind[kind] = self.failures_by_kind.get(kind, 0) + n
        for kind, messages in other.error_samples.items():
            for message in messages:
                self._sample(kind, message)
        self.latencies.extend(other.latencies)

    def fail(self, kind: str, message: str) -> None:
        """Count one failed region, by its error kind, keeping the first messages of each kind."""
        self.failed += 1
        self.failures_by_kind[kind] = self.failures_by_kind.get(kind, 0) + 1
        self._sample(kind, message)

    def _sample(self, kind: str, message: str) -> None:
        kept = self.error_samples.setdefault(kind, [])
        if len(kept) < SAMPLES_PER_KIND and message[:300] not in kept:
            kept.append(message[:300])


SAMPLES_PER_KIND = 2
_NOT_SUMMED = ("latencies", "failures_by_kind", "error_samples")


def _requests(stage: Stage, items, crops: CropConfig, counts: StageCounts) -> list[tuple[RegionContext, ChatRequest]]:
    """One request per region the stage wants; a region whose request cannot be built fails alone."""
    pending: list[tuple[RegionContext, ChatRequest]] = []
    for record, image in items:
        fitted: dict = {}  # the whole image fitted once for all its regions (RegionContext.fitted)
        for region in record.regions:
            if not stage.wants(region):
                continue
            counts.regions_in += 1
            if stage.lineage is not None:  # what this field is made from, whatever the outcome
                region.provenance.of(stage.name).lineage = stage.lineage
            if stage.without_model(region):
                counts.done += 1
                continue
            ctx = RegionContext(record=record, region=region, image=image, crops=crops, fitted=fitted)
            try:
                pending.append((ctx, stage.build_request(ctx)))
            except Exception as exc:  # a bad crop or a template error fails this region, not the batch
                stage.fail(region, "input", f"{type(exc).__name__}: {exc}")
                counts.fail("input", f"{region.region_id}: {region.error}")
    return pending


def _take(stage: Stage, ctx: RegionContext, request: ChatRequest, result: ChatResult, attempt: int,
          max_attempts: int, retry_temperature: float, counts: StageCounts,
          ruled: set[str]) -> ChatRequest | None:
    """Apply one answer to its region; return the request to send again, or None when the region is
    settled. `ruled` holds the regions already asked again once because of an answer rule."""
    region = ctx.region
    counts.prompt_tokens += result.prompt_tokens
    counts.completion_tokens += result.completion_tokens
    counts.cached_prompt_tokens += result.cached_prompt_tokens
    counts.latencies.append(result.latency_s)
    counts.timeouts += result.error_kind == "timeout"
    stage.record_provenance(region, result)
    if result.ok:
        counts.answers += 1
        reviewed = stage.review(ctx, result)
        if isinstance(reviewed, NotAnAnswer):
            counter = counter_of(reviewed.reason)
            setattr(counts, counter, getattr(counts, counter) + 1)
            if region.region_id not in ruled and attempt < max_attempts:  # once per region
                ruled.add(region.region_id)
                counts.retried += 1
                return _resampled(request, attempt, retry_temperature)
            if reviewed.fallback is None:
                suffix = f" (after {attempt} attempts)" if attempt > 1 else ""
                stage.fail(region, reviewed.reason, reviewed.message + suffix)
                counts.fail(counter_of(reviewed.reason), f"{region.region_id}: {region.error}")
                return None
            reviewed = reviewed.fallback
        problem = stage.apply(region, reviewed)
        if problem is None:
            counts.done += 1
            counts.rejected += region.status == "rejected"
            counts.cleaned += reviewed.text not in (result.text, " ".join(result.text.split()))
            return None
        kind, message, retryable = "parse", problem, True
    else:
        kind, message, retryable = result.error_kind or "internal", result.error or "", result.retryable
    if retryable and attempt < max_attempts:
        counts.retried += 1
        return _resampled(request, attempt, retry_temperature)
    suffix = f" (after {attempt} attempts)" if attempt > 1 else ""
    stage.fail(region, kind, message + suffix)
    counts.fail(kind, f"{region.region_id}: {region.error}")
    return None


def run_stage(
    stage: Stage,
    items: list[tuple[ImageRecord, Image.Image | None]],
    chat: ChatFn,
    crops: CropConfig,
    max_attempts: int,
    retry_temperature: float = 0.7,
) -> StageCounts:
    """Apply `stage` in place to every region of `items` that it wants, calling a batch engine
    (`chat(requests) -> results`) once per round of attempts (the direct, in-process path).

    A retry at temperature 0 would repeat the same answer, so retries sample at
    `retry_temperature` (at least) with a seed that depends on the attempt: still reproducible.
    """
    counts, ruled = StageCounts(), set()
    pending = _requests(stage, items, crops, counts)
    for attempt in range(1, max_attempts + 1):
        if not pending:
            break
        results = chat([request for _, request in pending])
        retry = []
        for (ctx, request), result in zip(pending, results, strict=True):
            again = _take(stage, ctx, request, result, attempt, max_attempts, retry_temperature, counts, ruled)
            if again is not None:
                retry.append((ctx, again))
        pending = retry
    return counts


async def run_stage_async(
    stage: Stage,
    items: list[tuple[ImageRecord, Image.Image | None]],
    chat_one: AsyncChatFn,
    crops: CropConfig,
    max_attempts: int,
    retry_temperature: float = 0.7,
) -> StageCounts:
    """The same as `run_stage`, one request per region in flight at once (`await chat_one(request)`):
    each region goes on to its next attempt as soon as its own answer is back, never waiting for the
    slowest region of the batch. Used by the executor against a served model."""
    counts, ruled = StageCounts(), set()

    async def settle(ctx: RegionContext, request: ChatRequest) -> None:
        for attempt in range(1, max_attempts + 1):
            result = await chat_one(request)
            request = _take(stage, ctx, request, result, attempt, max_attempts, retry_temperature, counts, ruled)
            if request is None:
                return

    await asyncio.gather(*(settle(ctx, request) for ctx, request in _requests(stage, items, crops, counts)))
    await stage.complete(items)  # per-image work over the batch's answers (the parts stage's SAM masks)
    return counts


def _resampled(request: ChatRequest, attempt: int, retry_temperature: float) -> ChatRequest:
    """The request of the next attempt: hotter, and seeded (by the attempt) so that a retry is
    reproducible. First attempts carry no seed unless the stage sets one (config.SamplingConfig.seed)."""
    base_seed = request.sampling.seed or 0
    sampling = request.sampling.model_copy(
        update={
            "temperature": max(request.sampling.temperature, retry_temperature),
            "seed": base_seed + attempt,
        }
    )
    return replace(request, sampling=sampling)
