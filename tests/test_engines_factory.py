"""Tiny models (recipe cache, determinism, CLI), `tiny:` resolution, build_engine, error mapping."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from annotate.config import ModelConfig
from annotate.engines.factory import build_engine
from annotate.engines.model_path import resolve_model_path


def test_tiny_paths_resolve_to_the_session_cache(tiny_model_paths):
    assert resolve_model_path("tiny:text") == str(tiny_model_paths["text"])
    assert resolve_model_path("tiny:vlm") == str(tiny_model_paths["vlm"])
    assert resolve_model_path("tiny:vlm/config.json") == str(tiny_model_paths["vlm"] / "config.json")
    assert resolve_model_path("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
    with pytest.raises(ValueError, match="tiny:text"):
        resolve_model_path("tiny:huge")


def test_tiny_models_are_small_and_complete(tiny_model_paths):
    from transformers import AutoConfig, AutoTokenizer

    from annotate.engines.griffon_processing import register_config

    register_config()  # gemma2_Griffon, as the vLLM plugin does (tiny:griffon_g)
    for kind, path in tiny_model_paths.items():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        assert size < 10_000_000, (kind, size)
        if kind == "sam":  # not a chat model: checked in tests/test_segment.py
            assert AutoConfig.from_pretrained(path).model_type == "sam"
            continue
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
        text_cfg = getattr(cfg, "text_config", None) or getattr(cfg, "llm_config", None) or cfg
        assert text_cfg.hidden_size // text_cfg.num_attention_heads == 64  # CPU attention needs >= 64
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        assert tok.chat_template
        sample = '{"consistent": true, "reason": "0 1 2"}'
        assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == sample
        if kind in ("text", "vlm", "r1_llama"):  # reasoning markers survive decoding
            sample = "<think>why</think>" + sample
            assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == sample
    vlm_tok = AutoTokenizer.from_pretrained(tiny_model_paths["vlm"])
    assert vlm_tok.convert_tokens_to_ids("<image>") == AutoConfig.from_pretrained(tiny_model_paths["vlm"]).image_token_index


def test_cached_build_is_skipped(tiny_model_paths, tmp_path):
    from annotate.models.registry import build_all

    for kind, path in tiny_model_paths.items():
        shutil.copytree(path, tmp_path / kind)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    from typer.testing import CliRunner

    from annotate.cli import app

    result = CliRunner().invoke(app, ["models", "make-tiny", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert all(kind in result.output for kind in tiny_model_paths)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert build_all(tmp_path) == {kind: tmp_path / kind for kind in tiny_model_paths}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "internvl2", "r1_llama"])
def test_tiny_build_is_deterministic(tiny_model_paths, tmp_path, kind):
    from annotate.models.registry import build_tiny

    built = build_tiny(kind, tmp_path / kind, force=True)

    def digest(path):
        return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(path.rglob("*")) if f.is_file() and "__pycache__" not in f.parts}

    assert digest(built) == digest(tiny_model_paths[kind])


def test_build_engine_openai_needs_no_server():
    engine = build_engine(ModelConfig(engine="openai", path="m"))
    assert type(engine).__name__ == "OpenAIEngine" and engine.model_id == "m"
    engine.close()


def test_engine_dead_is_raised():
    """vLLM's EngineDeadError becomes ours (the caller replaces the actor); other errors don't."""
    from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

    from annotate.engines.base import ChatRequest, EngineDeadError
    from annotate.engines.vllm_engine import VllmEngine, _engine_dead_types

    class DyingLLM:
        def chat(self, *args, **kwargs):
            raise VllmEngineDead()

    engine = VllmEngine.__new__(VllmEngine)  # error mapping only: no engine start
    engine.config = ModelConfig(engine="vllm", path="m")
    engine.model_id, engine.llm, engine._closed, engine._dead_types = "m", DyingLLM(), False, _engine_dead_types()
    engine._chunked_prefill, engine._token_ids = False, {}
    with pytest.raises(EngineDeadError):
        engine.chat([ChatRequest(messages=[{"role": "user", "content": "hi"}])])
    with pytest.raises(EngineDeadError):  # and it stays dead
        engine.chat([ChatRequest(messages=[{"role": "user", "content": "hi"}])])
