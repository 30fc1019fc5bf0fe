"""Building an engine from its `ModelConfig` (the one module that imports every engine)."""

from __future__ import annotations

from annotate.config import ModelConfig
from annotate.engines.base import Engine


def build_engine(model: ModelConfig) -> Engine:
    """The engine `model.engine` names, loaded and ready (vLLM and transformers load weights here)."""
    if model.engine == "vllm":
        from annotate.engines.vllm_engine import VllmEngine

        return VllmEngine(model)
    if model.engine == "openai":
        from annotate.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(model)
    if model.engine == "hf":
        from annotate.engines.hf_engine import HfEngine

        return HfEngine(model)
    raise ValueError(f"unknown engine {model.engine!r}")
