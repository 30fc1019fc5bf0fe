"""Building an engine from its `ModelConfig`, and resolving `tiny:` model paths."""

from __future__ import annotations

from pathlib import Path

from annotate.config import ModelConfig
from annotate.engines.base import Engine

TINY_PREFIX = "tiny:"


def resolve_model_path(path: str) -> str:
    """``tiny:vlm`` / ``tiny:text`` -> the cached tiny model's directory (built on first use, under
    $LONGGRIT_CACHE_DIR, default ~/.cache/longgrit); a local path with ``~`` is expanded; anything
    else (a hub name, an absolute path) is returned as it is."""
    if path.startswith(TINY_PREFIX):
        from annotate.models.tiny import KINDS, tiny_path

        kind = path[len(TINY_PREFIX):]
        if kind not in KINDS:
            raise ValueError(f"unknown tiny model {path!r}; known: {', '.join(TINY_PREFIX + k for k in KINDS)}")
        return str(tiny_path(kind))  # type: ignore[arg-type]
    if path.startswith("~"):
        return str(Path(path).expanduser())
    return path


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
