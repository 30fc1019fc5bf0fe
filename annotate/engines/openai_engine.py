"""An OpenAI-compatible `/v1/chat/completions` server over HTTP (a vLLM server, or a hosted API).

`chat()` is synchronous: it runs an asyncio loop that sends the batch with at most `max_in_flight`
requests open at once, retrying (jittered exponential backoff) on 429, 5xx, 408, timeouts and
connection errors, never on other 4xx. The API key comes from the environment variable the config
names; it is sent as a bearer token and kept out of errors, logs and reprs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from annotate.config import ModelConfig
from annotate.engines.base import ChatRequest, ChatResult
from annotate.engines.messages import InvalidMessageError, to_openai_messages
from annotate.engines.postprocess import error_result, finish

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))
_INVALID_INPUT_STATUS = frozenset({400, 413, 422})


class _RetryableStatus(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (_RetryableStatus, httpx.TimeoutException, httpx.TransportError))


class _Secret:
    """Holds a credential; its repr and str never show it (logs, tracebacks, vars(), pickles' reprs)."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


def schema_name(schema: dict[str, Any]) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(schema.get("title") or "response"))[:64]
    return name or "response"


class OpenAIEngine:
    def __init__(self, model: ModelConfig):
        self.config = model
        self.args = model.openai
        self.model_id = self.args.served_model_name or model.path
        self.base_url = self.args.base_url.rstrip("/")
        self._api_key: _Secret | None = None
        if self.args.api_key_env:
            key = os.environ.get(self.args.api_key_env)
            if not key:
                raise ValueError(f"environment variable {self.args.api_key_env} (the API key) is not set")
            self._api_key = _Secret(key)
        self.attempts = 0  # HTTP attempts made (for logs and tests)

    def __repr__(self) -> str:
        key = f"${self.args.api_key_env}" if self.args.api_key_env else None
        return f"OpenAIEngine(model_id={self.model_id!r}, base_url={self.base_url!r}, api_key={key})"

    # ------------------------------------------------------------------------------ request body
    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": to_openai_messages(request.messages),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        }
        if s.seed is not None:
            body["seed"] = s.seed
        # vLLM extensions, sent whenever they differ from neutral; a vLLM server given neutral values
        # still uses them over the checkpoint's generation_config only when started with
        # --generation-config vllm (the project's Serve deployments are).
        if s.top_k not in (0, -1):
            body["top_k"] = s.top_k
        if s.repetition_penalty != 1.0:
            body["repetition_penalty"] = s.repetition_penalty
        if s.thinking_token_budget is not None:
            body["thinking_token_budget"] = s.thinking_token_budget
        if s.stop:
            body["stop"] = list(s.stop)
        # vLLM extensions: sent only when set, since strict servers reject unknown fields.
        if s.min_tokens:
            body["min_tokens"] = min(s.min_tokens, s.max_tokens)
        if s.ignore_eos:
            body["ignore_eos"] = True
        if s.stop_token_ids:
            if any(isinstance(t, str) for t in s.stop_token_ids):
                raise InvalidMessageError("the openai engine has no tokenizer to look stop tokens up: give ids")
            body["stop_token_ids"] = list(s.stop_token_ids)
        if request.mm_processor_kwargs:
            body["mm_processor_kwargs"] = dict(request.mm_processor_kwargs)
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": schema_name(request.json_schema),
                    "schema": request.json_schema,
                    "strict": True,
                },
            }
        return body

    # ----------------------------------------------------------------------------------- serving
    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.achat(requests))
        # Called from inside a running loop (e.g. an async actor): run ours in a thread.
        box: list[Any] = []
        thread = threading.Thread(target=lambda: box.append(asyncio.run(self.achat(requests))))
        thread.start()
        thread.join()
        return box[0]

    async def achat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        headers = {"Content-Type": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.reveal()}"
        limits = httpx.Limits(max_connections=self.args.max_in_flight, max_keepalive_connections=self.args.max_in_flight)
        semaphore = asyncio.Semaphore(self.args.max_in_flight)
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(self.args.timeout_s), limits=limits
        ) as client:
            return list(await asyncio.gather(*(self._one(client, semaphore, r) for r in requests)))

    async def _one(self, client: httpx.AsyncClient, semaphore: asyncio.Semaphore, request: ChatRequest) -> ChatResult:
        started = time.perf_counter()
        try:
            body = self.request_body(request)
        except InvalidMessageError as exc:
            return error_result(request.request_id, "invalid_input", f"invalid messages: {exc}")
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.args.max_retries + 1),
            wait=wait_random_exponential(multiplier=self.args.backoff_initial_s, max=self.args.backoff_max_s),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    async with semaphore:  # held for one attempt, not across backoff sleeps
                        self.attempts += 1
                        response = await client.post("/chat/completions", json=body)
                    if response.status_code in _RETRY_STATUS:
                        raise _RetryableStatus(response.status_code, response.text[:300])
        except _RetryableStatus as exc:
            return error_result(
                request.request_id, "http", f"HTTP {exc.status} after {self.args.max_retries + 1} attempts: {exc.body}",
                time.perf_counter() - started,
            )
        except httpx.TimeoutException as exc:
            return error_result(
                request.request_id, "timeout",
                f"no answer within {self.args.timeout_s} s ({type(exc).__name__}), {self.args.max_retries + 1} attempts",
                time.perf_counter() - started,
            )
        except httpx.TransportError as exc:
            return error_result(
                request.request_id, "http", f"transport error after {self.args.max_retries + 1} attempts: "
                f"{type(exc).__name__}: {str(exc)[:200]}", time.perf_counter() - started,
            )
        except RetryError as exc:  # pragma: no cover - reraise=True makes this unusual
            return error_result(request.request_id, "http", f"gave up: {exc}", time.perf_counter() - started)
        latency = time.perf_counter() - started
        return self._parse(request, response, latency)

    def _parse(self, request: ChatRequest, response: httpx.Response, latency: float) -> ChatResult:
        status = response.status_code
        if status >= 400:
            kind = "invalid_input" if status in _INVALID_INPUT_STATUS else "rejected"
            return error_result(request.request_id, kind, f"HTTP {status}: {_error_message(response)}", latency)
        try:
            data = response.json()
            choice = data["choices"][0]
            message = choice["message"]
            text = message.get("content") or ""
            finish_reason = choice.get("finish_reason")
            usage = data.get("usage") or {}
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if not isinstance(text, str) or (reasoning is not None and not isinstance(reasoning, str)):
                raise TypeError("message content is not a string")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            return error_result(
                request.request_id, "http", f"malformed response body ({type(exc).__name__}): {response.text[:200]!r}",
                latency,
            )
        return finish(
            request.request_id,
            text,
            finish_reason,
            json_schema=request.json_schema,
            reasoning_model=self.config.reasoning,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_s=latency,
            reasoning=reasoning if self.config.reasoning else None,
        )

    def close(self) -> None:
        """Nothing to release: each `chat()` opens and closes its own connection pool."""


def _error_message(response: httpx.Response) -> str:
    try:
        err = response.json().get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        if err:
            return str(err)[:300]
    except (ValueError, AttributeError):
        pass
    return response.text[:300]
