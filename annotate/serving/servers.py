"""Plain Serve deployments for the models Serve LLM does not hold: transformers chat models (`hf`
engine), models of the LLaVA code base (`llava` engine, e.g. Griffon-G) and segment-anything. Each replica loads its model once; requests arrive one per region
(or image) and `serve.batch` groups the ones that arrive together into one forward pass, which is
what the engines are fast at. The engine call runs in a thread so the replica keeps accepting.
"""

from __future__ import annotations

import asyncio

from ray import serve

from annotate.config import ModelConfig, SegmentConfig
from annotate.engines.base import ChatRequest, ChatResult, EngineDeadError


class ChatServer:
    """An `hf` or `llava` engine behind Serve: `chat(request) -> ChatResult`; `count_tokens` and
    `token_id` answer the token-budget check at load time with the model's own tokenizer."""

    def __init__(self, model: ModelConfig):
        from annotate.engines.factory import build_engine

        self.engine = build_engine(model)
        self.chat_batch.set_max_batch_size(model.hf.batch_size if model.engine == "hf" else 1)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def chat_batch(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return await asyncio.to_thread(self.engine.chat, requests)

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
        if self.engine.model is None:
            raise EngineDeadError(f"{self.engine.model_id} is closed")


class SamServer:
    """The segment stage's SAM model behind Serve: `segment(image, boxes) -> [(mask, score)]`."""

    def __init__(self, segment: SegmentConfig):
        from annotate.engines.sam_engine import SamEngine

        self.engine = SamEngine(segment.path, segment.device)

    async def segment(self, image, boxes_xyxy: list[list[float]]):
        return await asyncio.to_thread(self.engine.segment, image, boxes_xyxy)
