"""The engine interface: a batch of chat requests in, a batch of results out.

Engines know nothing of prompts, stages or records. A request is OpenAI-style `messages` whose
content parts are `{"type": "text", "text": ...}` or `{"type": "image", "image": PIL.Image}`; each
engine converts the image part to what its backend wants (vLLM: a PIL part, HTTP: a data URL,
transformers: processor images). An engine never raises for one bad request: the failure comes back
as a `ChatResult` with `error` set, and the caller (a stage) decides what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

from annotate.config import SamplingConfig

ErrorKind = Literal[
    "timeout",  # no answer in time (retryable)
    "http",  # transport or server error (retryable when the status says so)
    "length",  # cut by max_tokens (finish_reason == "length")
    "parse",  # structured output did not parse against its schema
    "unfinished_reasoning",  # a reasoning model's output without a finished </think> block and answer
    "invalid_input",  # the model's processor rejected the input (not retryable)
    "rejected",  # the server refused the request: HTTP 4xx other than 400/408/413/422/429 (not retryable)
    "engine_dead",  # the engine itself is gone: the actor must be replaced
    "internal",  # anything else
]

RETRYABLE_ERRORS: frozenset[str] = frozenset({"timeout", "http", "length", "parse", "unfinished_reasoning"})


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    json_schema: dict[str, Any] | None = None
    request_id: str = ""
    # The image processor's arguments for this request alone (vLLM's `mm_processor_kwargs`), e.g.
    # InternVL's `max_dynamic_patch`: a stage sets them from its model's conventions. The hf engine
    # (tiny models that do not tile) ignores them.
    mm_processor_kwargs: dict[str, Any] | None = None


@dataclass
class ChatResult:
    request_id: str
    text: str = ""
    reasoning: str | None = None
    finish_reason: str | None = None
    # Why a `stop` finish stopped, as vLLM reports it: the stop token's id (int) or the stop string
    # (str); None for the model's EOS, or when the backend does not say (hf, some servers).
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from the engine's prefix cache (vLLM)
    latency_s: float = 0.0
    error: str | None = None
    error_kind: ErrorKind | None = None
    parsed: Any = None  # the JSON value when a schema was given and the text parsed

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def retryable(self) -> bool:
        return self.error_kind in RETRYABLE_ERRORS


def stop_token_ids(tokens: list[int | str], token_id: Callable[[str], int | None]) -> list[int]:
    """Stop tokens as ids: ids stay, token strings are looked up in the model's own tokenizer (so one
    pipeline file serves a checkpoint and its tiny replica, whose ids differ)."""
    ids = []
    for token in tokens:
        found = token if isinstance(token, int) else token_id(token)
        if found is None:
            raise ValueError(f"stop token {token!r} is not a token of this model's tokenizer")
        ids.append(int(found))
    return ids


class EngineDeadError(RuntimeError):
    """The engine can serve nothing more; the caller should replace it (e.g. restart the actor)."""


class Engine(Protocol):
    model_id: str

    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """Results in the order of `requests`, one each; never raises for a single bad request."""
        ...

    def close(self) -> None: ...
