"""Serve LLM's `LLMServer` with one more method for chain workers: `chat_payload(dict) -> dict`.

A chain worker that built vLLM's `ChatCompletionRequest` itself, or read its response objects,
would import vLLM (and torch with it): 20-30 CPU-seconds per chain worker process on a small machine,
paid again by every run, since Ray Data starts fresh chain workers (measured: 96 of 145 CPU-seconds
outside the engine in a 504-region run, BENCHMARKS.md 7c). The replica already has vLLM loaded, so
the request object is built here from a plain dict and the answer goes back as a plain dict.
People and other clients keep the OpenAI route and `chat` unchanged.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

# Serve LLM's callback base (no public import in Ray 2.60): its hooks run in the replica before the engine starts.
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.serve.llm.deployment import LLMServer


class LocalFolderCallback(CallbackBase):
    """Skips Serve LLM's node-initialisation task when the model is a local folder.

    Before its engine starts, a replica runs a "download" task on each node of its placement group. For a
    local folder (`resolve_model_path` always gives one: no hub access at run time) that task only imports
    torch in a fresh Ray worker and returns the path unchanged (Ray 2.60 `download_model_files`): about 24
    CPU-seconds per deployment on a small CPU node, measured, for nothing. A remote source keeps the task."""

    async def on_before_node_init(self) -> None:
        if os.path.isdir(self.llm_config.model_loading_config.model_source):
            self.ctx.run_init_node = False


@cache
def _engine_with_in_process_worker(base: type) -> type:
    """`base` (Serve LLM's VLLMEngine) with a one-worker CPU engine's worker inside vLLM's engine-core process.

    Serve LLM sets vLLM's executor to "mp" on CPU nodes (to "ray" on GPU nodes, left as is): for one worker
    that starts a third process which imports torch and vLLM again (about 25 CPU-seconds per deployment
    here, measured) to run what the engine core can run itself ("uni", as `vllm.LLM` does for one worker)."""

    class InProcessWorkerEngine(base):
        def _prepare_engine_config(self, callback_ctx):
            engine_args, frontend_args, vllm_config = super()._prepare_engine_config(callback_ctx)
            parallel = vllm_config.parallel_config
            if parallel.world_size == 1 and parallel.distributed_executor_backend == "mp":
                parallel.distributed_executor_backend = "uni"
            return engine_args, frontend_args, vllm_config

    return InProcessWorkerEngine


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
        # None: no reasoning parser ran (the raw text holds the tags); "" is a parser's empty block.
        "reasoning": getattr(choice.message, "reasoning", None),
        "finish_reason": choice.finish_reason,
        # vLLM's: the stop token id or stop string that ended the answer; None for EOS (or not said)
        "stop_reason": getattr(choice, "stop_reason", None),
        "prompt_tokens": usage.prompt_tokens if usage else 0,
        "completion_tokens": usage.completion_tokens if usage else 0,
        "cached_tokens": int(getattr(details, "cached_tokens", 0) or 0),
    }


def _error(code: int, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "type": "BadRequestError" if code < 500 else "InternalError", "message": message}}


async def _last(stream) -> Any:
    response = None
    async for item in await stream:
        response = item
    if isinstance(response, list):  # batched output: the last item is the full response
        response = response[-1]
    return response


class StageLLMServer(LLMServer):
    def _get_default_engine_class(self) -> type:
        return _engine_with_in_process_worker(super()._get_default_engine_class())

    async def _start_engine(self):
        await super()._start_engine()
        # Ray 2.60's engine looks vLLM's tokenization service up as `state.openai_serving_tokenization`;
        # vLLM 0.32 names it `state.serving_tokenization`, so Serve LLM's `tokenize` answers "not
        # supported". Hand the service over (count_tokens below needs it).
        engine = self.engine
        if getattr(engine, "_oai_serving_tokenization", False) is None:
            engine._oai_serving_tokenization = getattr(getattr(engine, "_app_state", None), "serving_tokenization", None)

    async def chat_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One non-streaming chat request given as `ChatCompletionRequest` fields. Stop tokens given as
        strings are looked up in this model's tokenizer first."""
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        from annotate.engines.vllm_engine import platform_seed

        # The deployment's own engine arguments (LLMServer keeps its LLMConfig as _llm_config); vLLM's
        # default for chunked prefill is on.
        chunked = self._llm_config.engine_kwargs.get("enable_chunked_prefill", True) is not False
        payload = {**payload, "seed": platform_seed(payload.get("seed"), payload.get("temperature", 1.0), chunked)}
        tokens = payload.get("stop_token_ids") or []
        if any(isinstance(t, str) for t in tokens):
            try:
                payload = {**payload, "stop_token_ids": [await self._token_id(payload["model"], t) for t in tokens]}
            except ValueError as exc:
                return _error(400, str(exc))
        response = await _last(self.chat(ChatCompletionRequest(**payload)))
        if response is None:
            return _error(500, "the engine returned nothing")
        return response_summary(response)

    async def token_id(self, model: str, token: str) -> dict[str, Any]:
        """{"id"} of a stop token in this model's tokenizer, or {"error"} (the load-time check asks)."""
        try:
            return {"id": await self._token_id(model, token)}
        except ValueError as exc:
            return _error(400, str(exc))

    async def _token_id(self, model: str, token: int | str) -> int:
        """A stop token as this model's id: a string must be exactly one token of its tokenizer."""
        if isinstance(token, int):
            return token
        cache = self.__dict__.setdefault("_token_ids", {})
        if token not in cache:
            count = await self.count_tokens({"model": model, "prompt": token})
            cache[token] = count.get("tokens", [])
        ids = cache[token]
        if len(ids) != 1:
            raise ValueError(f"stop token {token!r} is {len(ids)} tokens of {model}'s tokenizer, not one")
        return ids[0]

    async def count_tokens(self, payload: dict[str, Any]) -> dict[str, Any]:
        """vLLM's own tokenization of a chat (`messages`, images expanded by the model's processor, the
        chat template applied) or a plain `prompt`: {"count", "tokens", "max_model_len"} or {"error"}.
        The token-budget check at load time sends each stage's worst-case prompt here."""
        from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest, TokenizeCompletionRequest

        if "messages" in payload:
            request = TokenizeChatRequest(model=payload["model"], messages=payload["messages"], add_generation_prompt=True,
                                          mm_processor_kwargs=payload.get("mm_processor_kwargs"))
        else:
            request = TokenizeCompletionRequest(model=payload["model"], prompt=payload["prompt"], add_special_tokens=False)
        response = await _last(self.tokenize(request))
        error = getattr(response, "error", None)
        if response is None or (error is not None and not hasattr(response, "count")):
            return _error(int(getattr(error, "code", 500) or 500), str(getattr(error, "message", "tokenize failed")))
        return {"count": response.count, "tokens": list(response.tokens), "max_model_len": response.max_model_len}
