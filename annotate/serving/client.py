"""Calling a model deployment from a chain worker: one async request per region.

`ModelClient.chat(request)` sends one `ChatRequest` to the model's Serve deployment and returns its
`ChatResult`, never raising for one bad request. Many calls run at once (the chain worker gathers a
batch's regions, and works on several batches), bounded by the model's `serving.max_in_flight`
share, so the engine's scheduler always has requests queued and a long answer holds back nothing.

The requests of one image that are ready in the same event-loop turn travel to the replica in one
Serve call (`ImageBatcher`), and the replica streams each answer back as it ends: each region is still
its own request to the engine, with its own answer, retries and deadline, but the Serve route and the
Ray actor call are paid per image rather than per region.

A replica that dies takes its requests with it: Serve replaces the replica and the client sends the
lost requests again, waiting up to `serving.unavailable_timeout_s`, without spending one of the
stage's attempts (the request was never answered). Nothing is lost or counted twice: the result of
a request is taken from exactly one response.

A replica can also hang (a stuck all-reduce, a `generate` that never returns) while Serve's health
check still passes. Every send therefore has the stage's deadline (`StageConfig.request_deadline_s`):
past it the Serve request is cancelled and the request's result is a retryable `timeout` (the stage
may ask again, at the cost of an attempt); a late answer is never read. A model whose requests keep
timing out is reported in the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from annotate.engines.base import ChatRequest, ChatResult
from annotate.engines.messages import InvalidMessageError, to_vllm_messages
from annotate.engines.postprocess import error_result, finish
from annotate.serving.apps import CHAT_SERVER_KINDS, ModelApp

log = logging.getLogger(__name__)

# vLLM's OpenAI layer reports a dead engine as a 5xx whose message names it; Serve then replaces the replica.
_ENGINE_GONE = ("EngineDeadError", "EngineCore", "engine is dead", "Engine loop", "died")


class ReplicaUnavailable(Exception):
    """The replica holding a request went away; the request may be sent again."""


class DeadlinePassed(Exception):
    """A request got no answer within its deadline; its Serve request was cancelled."""


class ReplicaError(Exception):
    """The replica raised on one request of a batch (`llm_server.StageLLMServer.chat_payloads`): the
    message is the replica's "ExceptionType: message", read as a raised exception would be."""


# The most requests one Serve call carries (an image with more regions is sent in several calls).
MAX_REQUESTS_PER_CALL = 32


class ImageBatcher:
    """Sends the payloads queued in one event-loop turn for one image as one Serve call, and hands each
    request its answer the moment the replica has it.

    A stage starts all the regions of its batch at once (`stages.batch.run_stage_async`), and an image's
    regions go to one replica anyway (`routing.py`), so one Serve call per region paid a Serve route, a
    Ray actor call and a response per region: about half of a chain worker's CPU in a py-spy profile
    (BENCHMARKS.md 3). The replica streams (index, answer) pairs back as its requests end
    (`llm_server.StageLLMServer.chat_payloads`), so a short answer frees its place in the model's
    in-flight share at once instead of waiting for the image's longest one (which would leave the
    engine short of queued requests on long-tailed answers, BENCHMARKS.md 7a).

    `open(payloads)` starts the call and gives an async iterator of (index, answer) with `cancel()` (a
    Serve `DeploymentResponseGenerator`). Past `deadline_s` the call is cancelled and its unanswered
    requests get DeadlinePassed; an exception the stream raises (a replica gone) is each unanswered
    request's. The queue holds no event loop: a client may be used from several `asyncio.run`s."""

    def __init__(self, open: Callable[[list[dict[str, Any]]], Any], deadline_s: float | None = None,
                 max_per_call: int = MAX_REQUESTS_PER_CALL):
        self._open = open
        self.deadline_s = deadline_s
        self.max_per_call = max(1, max_per_call)
        self._queued: dict[str | None, list[tuple[dict[str, Any], asyncio.Future]]] = {}
        self.calls = 0  # Serve calls made (for tests and benchmarks)

    async def submit(self, payload: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if not self._queued:
            loop.call_soon(self._flush)
        future = loop.create_future()
        self._queued.setdefault(image_key(payload), []).append((payload, future))
        return await future

    def _flush(self) -> None:
        queued, self._queued = self._queued, {}
        for group in queued.values():
            group = [(payload, future) for payload, future in group if not future.done()]  # a caller gave up
            for start in range(0, len(group), self.max_per_call):
                self._start(group[start:start + self.max_per_call])

    def _start(self, group: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        if not group:
            return
        self.calls += 1
        task = asyncio.ensure_future(self._call(group))
        futures = [future for _, future in group]

        def on_done(_: asyncio.Future) -> None:  # every caller gone: so is the call (and its Serve request)
            if all(future.cancelled() for future in futures) and not task.done():
                task.cancel()
        for future in futures:
            future.add_done_callback(on_done)

    async def _call(self, group: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        futures = [future for _, future in group]
        stream = self._open([payload for payload, _ in group])
        try:
            async with asyncio.timeout(self.deadline_s):
                async for index, answer in stream:
                    if not futures[index].done():
                        futures[index].set_result(answer)
            error: Exception = ReplicaError("InternalError: the replica's answers ended before every request had one")
        except TimeoutError:
            _cancel_stream(stream)
            error = DeadlinePassed(f"no answer within {self.deadline_s:g} s")
        except asyncio.CancelledError:
            _cancel_stream(stream)
            for future in futures:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the call's failure is each unanswered request's
            error = exc
        for future in futures:
            if not future.done():
                future.set_exception(error)


def _cancel_stream(stream) -> None:
    try:
        stream.cancel()
    except Exception as exc:  # noqa: BLE001 - cancelling is best effort; the answers are dropped anyway
        log.debug("cancelling a Serve call: %s", exc)


# A model's requests timing out this many times in a row (no answer in between) is reported, and again
# every REPORT_TIMEOUTS_EVERY after that.
REPORT_TIMEOUTS_AFTER = 3
REPORT_TIMEOUTS_EVERY = 10


async def _answer_of(response):
    return await response


async def within_deadline(response, deadline_s: float | None):
    """The answer of a Serve `DeploymentResponse` (or any awaitable with `cancel()`), or DeadlinePassed
    after `deadline_s`, with the request cancelled so that the replica stops working on it."""
    if deadline_s is None:
        return await response
    task = asyncio.ensure_future(_answer_of(response))
    try:
        done, _ = await asyncio.wait({task}, timeout=deadline_s)
    except asyncio.CancelledError:  # the caller gave up: so does the replica
        _cancel(task, response)
        raise
    if task in done:
        return task.result()
    _cancel(task, response)
    raise DeadlinePassed(f"no answer within {deadline_s:g} s")


def _cancel(task: asyncio.Future, response) -> None:
    task.cancel()
    # Serve may end the task with its own RequestCancelledError: taken here, never logged as unretrieved.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    cancel = getattr(response, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception as exc:  # noqa: BLE001 - cancelling is best effort; the answer is dropped anyway
            log.debug("cancelling a request past its deadline: %s", exc)


def image_key(request: Any) -> str | None:
    """The image part of a request id (`completion_request`), or None (then any replica will do); the
    batcher groups by it and the router (`routing.py`) places by it. A list of requests (one Serve
    call of `ImageBatcher`, whose requests share one image) is keyed by its first."""
    if isinstance(request, list):
        return image_key(request[0]) if request else None
    request_id = (request.get("request_id") if isinstance(request, dict) else getattr(request, "request_id", None)) or ""
    region = request_id.split("|", 1)[0]
    return region.rsplit(":", 1)[0] if ":" in region else None


def completion_request(model_name: str, request: ChatRequest) -> dict[str, Any]:
    """Our neutral request -> the fields of Serve LLM's `ChatCompletionRequest`, as a plain dict (the
    replica builds the object: see `llm_server.py`). Images stay PIL: no JPEG round trip."""
    s = request.sampling
    payload: dict[str, Any] = dict(
        model=model_name,
        messages=to_vllm_messages(request.messages),
        max_completion_tokens=s.max_tokens,
        min_tokens=min(s.min_tokens, s.max_tokens),
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        repetition_penalty=s.repetition_penalty,
        ignore_eos=s.ignore_eos,
        seed=s.seed,
        thinking_token_budget=s.thinking_token_budget,
        stop=list(s.stop) or None,
        stop_token_ids=list(s.stop_token_ids) or None,
        # Unique per send (a resend must not collide with a request vLLM still holds); the part before
        # the last ':' is the image, which the image-affinity router reads.
        request_id=f"{request.request_id or 'req'}|{uuid.uuid4().hex[:8]}",
    )
    if request.mm_processor_kwargs:
        payload["mm_processor_kwargs"] = dict(request.mm_processor_kwargs)
    if request.json_schema is not None:
        payload["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "answer", "schema": request.json_schema}}
    return payload


def result_from_summary(request: ChatRequest, summary: dict[str, Any], reasoning_model: bool, latency: float) -> ChatResult:
    """The replica's answer (`llm_server.response_summary`) -> `ChatResult`."""
    error = summary.get("error")
    if error is not None:
        code = int(error.get("code") or 500)
        message = f"{error.get('type', 'error')}: {error.get('message', '')}"[:500]
        if code >= 500 and any(s in message for s in _ENGINE_GONE):
            raise ReplicaUnavailable(message)
        kind = "invalid_input" if code in (400, 413, 422) else ("http" if code >= 500 or code in (408, 429) else "rejected")
        return error_result(request.request_id, kind, f"HTTP {code}: {message}", latency)
    result = finish(request.request_id, summary["text"], summary["finish_reason"],
                    json_schema=request.json_schema, reasoning_model=reasoning_model,
                    prompt_tokens=summary["prompt_tokens"], completion_tokens=summary["completion_tokens"],
                    latency_s=latency, reasoning=summary.get("reasoning"))
    result.cached_prompt_tokens = summary.get("cached_tokens", 0)
    result.stop_reason = summary.get("stop_reason")
    return result


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return (ActorDiedError, ActorUnavailableError, RayActorError, BackPressureError, DeploymentUnavailableError,
            ReplicaUnavailable)


class ModelClient:
    """A stage's handle on one model deployment, inside a chain worker."""

    def __init__(self, app: ModelApp, reasoning: bool, max_in_flight: int, deadline_s: float | None = None,
                 handle=None, limit: asyncio.Semaphore | None = None):
        """`deadline_s`: the most one send may take (the stage's; None: no deadline). `handle`: the
        deployment handle (default: Serve's, by the app's names; tests pass a stand-in). `limit`: a
        semaphore shared with the other stages' clients of the same model in one chain worker (the
        model's in-flight share); None: `max_in_flight` for this client alone."""
        if handle is None:
            from ray import serve

            handle = serve.get_deployment_handle(app.deployment_name, app.app_name)
        self.app = app
        self.reasoning = reasoning
        self.max_in_flight = max(1, max_in_flight)
        self.deadline_s = deadline_s
        self.handle = handle
        self._semaphore: asyncio.Semaphore | None = limit
        self._streaming = None  # the handle with stream=True, made on first use
        self.batcher = ImageBatcher(self._stream_chat_payloads, deadline_s)
        self._unavailable = _unavailable_errors()
        self.resent = 0  # requests sent again after their replica died
        self.timeouts = 0  # sends that passed their deadline (cancelled)
        self.timeouts_in_a_row = 0  # since the last answer

    def _stream_chat_payloads(self, payloads: list[dict[str, Any]]):
        if self._streaming is None:
            self._streaming = self.handle.options(stream=True)
        return self._streaming.chat_payloads.remote(payloads)

    @property
    def semaphore(self) -> asyncio.Semaphore:
        if self._semaphore is None:  # bound to the event loop of the first call
            self._semaphore = asyncio.Semaphore(self.max_in_flight)
        return self._semaphore

    async def chat(self, request: ChatRequest) -> ChatResult:
        deadline = time.monotonic() + self.app.unavailable_timeout_s
        delay = 1.0
        async with self.semaphore:
            while True:
                started = time.perf_counter()
                try:
                    result = await self._send(request, started)
                    self.timeouts_in_a_row = 0
                    return result
                except InvalidMessageError as exc:
                    return error_result(request.request_id, "invalid_input", f"invalid messages: {exc}")
                except DeadlinePassed as exc:
                    self._timed_out(request)
                    return error_result(request.request_id, "timeout",
                                        f"model {self.app.model_name}: {exc} (the stage's deadline_s); request cancelled",
                                        time.perf_counter() - started)
                except Exception as exc:  # noqa: BLE001 - one request's failure is its own result
                    if not self._replica_gone(exc):
                        return error_result(request.request_id, "internal", f"{type(exc).__name__}: {str(exc)[:500]}",
                                            time.perf_counter() - started)
                    if time.monotonic() + delay > deadline:
                        return error_result(request.request_id, "engine_dead",
                                            f"model {self.app.model_name} unavailable for "
                                            f"{self.app.unavailable_timeout_s:.0f} s: {type(exc).__name__}: {exc}"[:500])
                    self.resent += 1
                    log.warning("model %s: replica unavailable (%s); sending %s again in %.0f s",
                                self.app.model_name, type(exc).__name__, request.request_id, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)

    def _timed_out(self, request: ChatRequest) -> None:
        self.timeouts += 1
        self.timeouts_in_a_row += 1
        n = self.timeouts_in_a_row
        if n == REPORT_TIMEOUTS_AFTER or (n > REPORT_TIMEOUTS_AFTER and (n - REPORT_TIMEOUTS_AFTER) % REPORT_TIMEOUTS_EVERY == 0):
            log.warning("model %s (app %s): %d requests in a row got no answer within %g s (%d in all, last %s): "
                        "a replica may be hung; check its logs and `serve status`, or raise the stage's deadline_s",
                        self.app.model_name, self.app.app_name, n, self.deadline_s or 0, self.timeouts,
                        request.request_id)

    def _replica_gone(self, exc: BaseException) -> bool:
        """The replica (or its engine) died under the request: Serve replaces it, so send it again.
        An engine that dies mid-request surfaces as vLLM's EngineDeadError wrapped in a task error."""
        return isinstance(exc, self._unavailable) or any(s in f"{type(exc).__name__}: {exc}" for s in _ENGINE_GONE)

    async def count_tokens(self, request: ChatRequest) -> dict[str, Any]:
        """The deployment's own count of a request's prompt: {"count", "max_model_len"} or {"error"}."""
        if self.app.kind in CHAT_SERVER_KINDS:
            return await self.handle.count_tokens.remote({"messages": request.messages})
        return await self.handle.count_tokens.remote({"model": self.app.model_name,
                                                      "messages": to_vllm_messages(request.messages),
                                                      "mm_processor_kwargs": request.mm_processor_kwargs})

    async def token_id(self, token: str) -> int:
        """A stop token's id in the model's tokenizer; ValueError when it is not one of its tokens."""
        answer = await self.handle.token_id.remote(self.app.model_name, token)
        if "error" in answer:
            raise ValueError(answer["error"]["message"])
        return answer["id"]

    async def _send(self, request: ChatRequest, started: float) -> ChatResult:
        """One send, within the deadline (DeadlinePassed past it)."""
        if self.app.kind in CHAT_SERVER_KINDS:
            result = await within_deadline(self.handle.chat.remote(request), self.deadline_s)
            if not result.ok and result.error_kind == "engine_dead":  # servers.ChatServer: a replica that is gone
                raise ReplicaUnavailable(result.error)
            return result
        summary = await self.batcher.submit(completion_request(self.app.model_name, request))
        if "exception" in summary:
            raise ReplicaError(summary["exception"])
        return result_from_summary(request, summary, self.reasoning, time.perf_counter() - started)
