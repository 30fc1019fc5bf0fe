"""Turning a backend's raw answer into a `ChatResult`: the same rules for every engine."""

from __future__ import annotations

import json
from typing import Any

from annotate.engines.base import ChatResult
from annotate.engines.reasoning import check_answer, split_reasoning


def finish(
    request_id: str,
    text: str,
    finish_reason: str | None,
    *,
    json_schema: dict[str, Any] | None,
    reasoning_model: bool,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    latency_s: float = 0.0,
    reasoning: str | None = None,
) -> ChatResult:
    """Apply, in order: reasoning split (when `reasoning_model`), length cut, JSON parse.

    `reasoning` is a reasoning text the backend already separated (e.g. a vLLM server's reasoning
    parser); then `text` is taken as the answer as it is. `text` in the result is the answer (or the
    raw, cut output on a length error, to help debugging).
    """
    result = ChatResult(
        request_id=request_id,
        text=text,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_s=latency_s,
        reasoning=reasoning,
    )
    if reasoning_model:
        # The backend's own split (a server-side reasoning parser) is checked by the same rule.
        thought, answer, error = split_reasoning(text) if reasoning is None else check_answer(reasoning, text.strip())
        if error is not None:
            cut = " (cut by max_tokens)" if finish_reason == "length" else ""
            result.reasoning, result.text = thought, ""
            result.error, result.error_kind = f"unfinished reasoning: {error}{cut}", "unfinished_reasoning"
            return result
        result.reasoning, result.text = thought, answer
    if finish_reason == "length":
        result.error = f"output cut by max_tokens after {completion_tokens} tokens (finish_reason=length)"
        result.error_kind = "length"
        return result
    if finish_reason not in (None, "stop", "eos", "stop_sequence", "end_turn"):
        result.error = f"generation ended with finish_reason={finish_reason!r}"
        result.error_kind = "internal"
        return result
    if json_schema is not None:
        try:
            parsed = json.loads(result.text)
        except (ValueError, TypeError) as exc:
            result.error = f"output is not valid JSON: {exc}"
            result.error_kind = "parse"
            return result
        problem = _schema_problem(parsed, json_schema)
        if problem is not None:
            result.error = f"output does not match the JSON schema: {problem}"
            result.error_kind = "parse"
            return result
        result.parsed = parsed
    return result


def _schema_problem(value: Any, schema: dict[str, Any]) -> str | None:
    """The first schema violation, or None. Skipped (None) when `jsonschema` is not installed."""
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - it comes with vLLM and Ray
        return None
    try:
        error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(value))
    except jsonschema.exceptions.SchemaError as exc:
        return f"invalid schema: {exc.message}"
    return None if error is None else error.message[:300]


def error_result(request_id: str, kind: str, message: str, latency_s: float = 0.0) -> ChatResult:
    return ChatResult(request_id=request_id, error=message, error_kind=kind, latency_s=latency_s)  # type: ignore[arg-type]
