"""Calling a model deployment from a chain worker: one async request per region.

`ModelClient.chat(request)` sends one `ChatRequest` to the model's Serve deployment and returns its
`ChatResult`, never raising for one bad request. Many calls run at once (the chain worker gathers a
batch's regions, and works on several batches), bounded by the model's `serving.max_in_flight`
share, so the engine's scheduler always has requests queued and a long answer holds back nothing.

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
        self._unavailable = _unavailable_errors()
        self.resent = 0  # requests sent again after their replica died
        self.timeouts = 0  # sends that passed their deadline (cancelled)
        self.timeouts_in_a_row = 0  # since the last answer

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
        payload = completion_request(self.app.model_name, request)
        summary = await within_deadline(self.handle.chat_payload.remote(payload), self.deadline_s)
        return result_from_summary(request, summary, self.reasoning, time.perf_counter() - started)
