"""Building an engine from its `ModelConfig`, and resolving `tiny:` model paths."""

from __future__ import annotations

from pathlib import Path

from annotate.config import ModelConfig
from annotate.engines.base import Engine

TINY_PREFIX = "tiny:"


def resolve_model_path(path: str) -> str:
    """``tiny:KIND`` -> the cached tiny model's directory (built on first use, under
    $LONGGRIT_CACHE_DIR, default ~/.cache/longgrit), ``tiny:KIND/sub`` -> a folder inside it (e.g. the
    Griffon-style model's ``code``); a local path with ``~`` is expanded; anything else (a hub name,
    an absolute path) is returned as it is."""
    if path.startswith(TINY_PREFIX):
        from annotate.models.registry import KINDS, tiny_path

        kind, _, inside = path[len(TINY_PREFIX):].partition("/")
        if kind not in KINDS:
            raise ValueError(f"unknown tiny model {path!r}; known: {', '.join(TINY_PREFIX + k for k in KINDS)}")
        base = tiny_path(kind)
        return str(base / inside) if inside else str(base)
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
    if model.engine == "llava":
        from annotate.engines.llava_engine import LlavaEngine

        return LlavaEngine(model)
    raise ValueError(f"unknown engine {model.engine!r}")
