"""Plain Serve deployments for the models Serve LLM does not hold: transformers chat models (`hf`
engine) and segment-anything. Each replica loads its model once; requests arrive one per region
(or image) and `serve.batch` groups the ones that arrive together into one forward pass, which is
what the engines are fast at. The engine call runs in a thread so the replica keeps accepting.

A replica that meets an unrecoverable device error (a CUDA error, out of memory: `hf_engine.is_device_error`)
marks itself unhealthy: `check_health` raises, so Serve replaces it, and it answers that request and
every later one with an `engine_dead` result naming `EngineDeadError`, which the client
(`client.ModelClient`) sends again as for a dead vLLM engine, without spending an attempt.
"""

from __future__ import annotations

import asyncio

from ray import serve

from annotate.config import ModelConfig, SegmentConfig
from annotate.engines.base import ChatRequest, ChatResult, EngineDeadError
from annotate.engines.postprocess import error_result


class ChatServer:
    """An `hf` engine behind Serve: `chat(request) -> ChatResult`; `count_tokens` and
    `token_id` answer the token-budget check at load time with the model's own tokenizer."""

    def __init__(self, model: ModelConfig):
        from annotate.engines.factory import build_engine

        self.engine = build_engine(model)
        self.broken: str | None = None  # why this replica can serve nothing more (a device error)
        self.chat_batch.set_max_batch_size(model.hf.batch_size)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def chat_batch(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return await self.answer(requests)

    async def answer(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """The engine's results, unless the device is gone: then every request gets `engine_dead`."""
        from annotate.engines.hf_engine import is_device_error

        if self.broken is None:
            try:
                results = await asyncio.to_thread(self.engine.chat, requests)
            except Exception as exc:  # noqa: BLE001 - an engine raises only when it cannot go on
                if not is_device_error(exc):
                    raise
                self._break(f"{type(exc).__name__}: {exc}")
            else:
                # An engine that swallowed a device error into a result: the replica is just as gone.
                fatal = next((r.error for r in results if not r.ok and r.error_kind != "invalid_input"
                              and is_device_error(r.error)), None)
                if fatal is None:
                    return results
                self._break(fatal)
        return [error_result(r.request_id, "engine_dead", f"EngineDeadError: replica unhealthy after a device "
                                                          f"error ({self.broken}); send again") for r in requests]

    def _break(self, why: str) -> None:
        import logging

        self.broken = why[:500]
        logging.getLogger(__name__).error("replica of %s: unrecoverable device error, marking it unhealthy so "
                                          "Serve replaces it: %s", self.engine.model_id, self.broken)

    async def chat(self, request: ChatRequest) -> ChatResult:
        return await self.chat_batch(request)

    async def count_tokens(self, payload: dict) -> dict:
        """{"count", "max_model_len"} for neutral `messages` (the load-time token-budget check), or {"error"}."""
        try:
            count = await asyncio.to_thread(self.engine.count_prompt_tokens, payload["messages"])
        except ValueError as exc:
            return {"error": {"code": 400, "type": "BadRequestError", "message": str(exc)}}
        return {"count": count, "max_model_len": self.engine.max_model_len}

    async def token_id(self, model: str, token: str) -> dict:
        """{"id"} of a stop token in the model's tokenizer, or {"error"}."""
        found = self.engine.token_id(token)
        if found is None:
            return {"error": {"code": 400, "type": "BadRequestError",
                              "message": f"stop token {token!r} is not a token of {model}'s tokenizer"}}
        return {"id": found}

    def check_health(self) -> None:
        if self.broken is not None:
            raise EngineDeadError(f"{self.engine.model_id}: unrecoverable device error: {self.broken}")
        if self.engine.model is None:
            raise EngineDeadError(f"{self.engine.model_id} is closed")


class SamServer:
    """The SAM model behind Serve, for the segment step and the `parts` stage:
    `segment(image, boxes, points=None) -> [(mask, score)]`."""

    def __init__(self, segment: SegmentConfig):
        from annotate.engines.sam_engine import SamEngine

        self.engine = SamEngine(segment.path, segment.device)
        self.broken: str | None = None

    async def segment(self, image, boxes_xyxy: list[list[float]], points=None):
        from annotate.engines.hf_engine import is_device_error

        if self.broken is not None:
            raise EngineDeadError(f"SAM replica unhealthy after a device error ({self.broken})")
        try:
            return await asyncio.to_thread(self.engine.segment, image, boxes_xyxy, points)
        except Exception as exc:
            if is_device_error(exc):  # Serve replaces the replica at its next health check
                self.broken = f"{type(exc).__name__}: {str(exc)[:400]}"
            raise

    def check_health(self) -> None:
        if self.broken is not None:
            raise EngineDeadError(f"SAM: unrecoverable device error: {self.broken}")
