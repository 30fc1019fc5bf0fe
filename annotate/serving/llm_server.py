"""Serve LLM's `LLMServer` with one more method for stage workers: `chat_payload(dict) -> dict`.

A stage worker that built vLLM's `ChatCompletionRequest` itself, or read its response objects,
would import vLLM (and torch with it): 20-30 CPU-seconds per stage worker process on a small machine,
paid again by every run, since Ray Data starts fresh stage workers (measured: 96 of 145 CPU-seconds
outside the engine in a 504-region run, BENCHMARKS.md 7c). The replica already has vLLM loaded, so
the request object is built here from a plain dict and the answer goes back as a plain dict.
People and other clients keep the OpenAI route and `chat` unchanged.
"""

from __future__ import annotations

from typing import Any

from ray.serve.llm.deployment import LLMServer


def response_summary(response: Any) -> dict[str, Any]:
    """A `ChatCompletionResponse` or `ErrorResponse` as the plain dict `client.result_from_summary` reads."""
    error = getattr(response, "error", None)
    if error is not None and not hasattr(response, "choices"):
        return {"error": {"code": int(getattr(error, "code", 500) or 500), "type": str(getattr(error, "type", "error")),
                          "message": str(getattr(error, "message", ""))}}
    choice = response.choices[0]
    usage = response.usage
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return {
        "text": choice.message.content or "",
        "reasoning": getattr(choice.message, "reasoning", None) or None,
        "finish_reason": choice.finish_reason,
        "prompt_tokens": usage.prompt_tokens if usage else 0,
        "completion_tokens": usage.completion_tokens if usage else 0,
        "cached_tokens": int(getattr(details, "cached_tokens", 0) or 0),
    }


class StageLLMServer(LLMServer):
    async def chat_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One non-streaming chat request given as `ChatCompletionRequest` fields."""
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        response = None
        async for item in await self.chat(ChatCompletionRequest(**payload)):
            response = item
        if isinstance(response, list):  # batched output: the last item is the full response
            response = response[-1]
        if response is None:
            return {"error": {"code": 500, "type": "InternalError", "message": "the engine returned nothing"}}
        return response_summary(response)
