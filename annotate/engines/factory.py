"""Building an engine from its `ModelConfig` (the one module that imports every engine)."""

from __future__ import annotations

from typing import Callable

from annotate.config import ModelConfig
from annotate.engines.base import Engine


# Each class is imported only when its kind is built: vLLM and transformers are slow to import, vLLM is optional.
def _vllm() -> type[Engine]:
    from annotate.engines.vllm_engine import VllmEngine

    return VllmEngine


def _openai() -> type[Engine]:
    from annotate.engines.openai_engine import OpenAIEngine

    return OpenAIEngine


def _hf() -> type[Engine]:
    from annotate.engines.hf_engine import HfEngine

    return HfEngine


# The class of each kind of config.ENGINE_KINDS (the facts about a kind are there).
ENGINE_CLASSES: dict[str, Callable[[], type[Engine]]] = {"vllm": _vllm, "openai": _openai, "hf": _hf}


def build_engine(model: ModelConfig) -> Engine:
    """The engine `model.engine` names, loaded and ready (vLLM and transformers load weights here)."""
    engine_class = ENGINE_CLASSES.get(model.engine)
    if engine_class is None:
        raise ValueError(f"unknown engine {model.engine!r}")
    return engine_class()(model)
