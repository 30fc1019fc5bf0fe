"""Plain Serve deployments for the models Serve LLM does not hold: transformers chat models (`hf`
engine) and segment-anything. Each replica loads its model once; requests arrive one per region
(or image) and `serve.batch` groups the ones that arrive together into one forward pass, which is
what the engines are fast at. The engine call runs in a thread so the replica keeps accepting.
"""

from __future__ import annotations

import asyncio

from ray import serve

from annotate.config import ModelConfig, SegmentConfig
from annotate.engines.base import ChatRequest, ChatResult, EngineDeadError


class HfChatServer:
    """An `hf` engine behind Serve: `chat(request) -> ChatResult`."""

    def __init__(self, model: ModelConfig):
        from annotate.engines.hf_engine import HfEngine

        self.engine = HfEngine(model)
        self.chat_batch.set_max_batch_size(model.hf.batch_size)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def chat_batch(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return await asyncio.to_thread(self.engine.chat, requests)

    async def chat(self, request: ChatRequest) -> ChatResult:
        return await self.chat_batch(request)

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
