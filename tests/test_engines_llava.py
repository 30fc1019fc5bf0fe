"""LlavaEngine on the tiny Griffon-style model: a model of the LLaVA code base that transformers'
Auto classes and vLLM cannot load, driven through its own package as Griffon-G's scripts do."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from annotate.config import LlavaArgs, ModelConfig, SamplingConfig
from annotate.engines.base import ChatRequest

pytestmark = pytest.mark.slow


def griffon_config(**overrides) -> ModelConfig:
    args = dict(code_path="tiny:griffon/code", package="griffon",
                model_class="griffon.model:GriffonGemma2ForCausalLM", conversation="gemma_instruct", dtype="float32")
    args.update(overrides)
    return ModelConfig(engine="llava", path="tiny:griffon", llava=LlavaArgs(**args))


@pytest.fixture(scope="module")
def griffon():
    from annotate.engines.factory import build_engine

    engine = build_engine(griffon_config())
    yield engine
    engine.close()


def request(rid: str, images: int = 1, system: str | None = "You are an expert.", color=(200, 30, 30),
            **sampling) -> ChatRequest:
    img = Image.new("RGB", (300, 200), color)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [{"type": "image", "image": img}] * images + [{"type": "text", "text": "Where is it?"}]})
    return ChatRequest(messages=messages, sampling=SamplingConfig(**{"max_tokens": 16, "min_tokens": 4, **sampling}), request_id=rid)


def test_the_model_is_not_loadable_without_its_package():
    """Why the engine exists: transformers does not know the checkpoint's model_type on its own."""
    import subprocess

    from annotate.engines.model_path import resolve_model_path

    code = ("from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained({resolve_model_path('tiny:griffon')!r})")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "gemma2_Griffon" in run.stderr


def test_prompt_uses_the_packages_template_and_image_tokens(griffon):
    prompt, images = griffon.prompt(request("a", images=2).messages)
    assert prompt == ("<start_of_turn>user\n<image>\n<image>\nYou are an expert.\n\nWhere is it?<end_of_turn>\n"
                      "<start_of_turn>model\n")
    assert len(images) == 2
    ids = griffon.tokenizer_image_token(prompt, griffon.tokenizer, griffon.image_token_index)
    assert ids.count(-200) == 2 and ids[0] == griffon.tokenizer.bos_token_id
    patches = griffon.vision.num_patches
    assert griffon.count_prompt_tokens(request("a", images=2).messages) == len(ids) - 2 + 2 * patches
    assert type(griffon.model).__module__ == "griffon.model.griffon_gemma"
    assert sys.modules["griffon"].__file__.startswith(str(griffon.model_path))  # imported from code_path


def test_generates_from_images_and_text(griffon):
    results = griffon.chat([request("one"), request("two", images=2), request("none", images=0, system=None)])
    assert [r.request_id for r in results] == ["one", "two", "none"]
    for r, images in zip(results, (1, 2, 0)):
        assert r.ok or r.error_kind == "length", r.error
        assert r.text.strip() and r.completion_tokens >= 4
        assert r.prompt_tokens == griffon.count_prompt_tokens(request("x", images=images, system=None if images == 0 else
                                                                      "You are an expert.").messages)
    # the image's pixels change the answer: its features reach the language model
    a, b = griffon.chat([request("a", max_tokens=8, min_tokens=8), request("b", color=(10, 40, 220), max_tokens=8, min_tokens=8)])
    assert a.text != b.text


def test_bad_requests_fail_alone(griffon):
    two_users = ChatRequest(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], request_id="x")
    results = griffon.chat([two_users, request("ok"), request("stop", stop_token_ids=["no-such-token"])])
    assert results[0].error_kind == "invalid_input" and results[2].error_kind == "invalid_input"
    assert results[1].ok or results[1].error_kind == "length"


def test_unknown_conversation_template_is_a_clear_error():
    from annotate.engines.llava_engine import LlavaEngine

    with pytest.raises(ValueError, match="gemma_instruct"):
        LlavaEngine(griffon_config(conversation="vicuna_v1"))


def test_turns_end_with_end_of_turn_not_eos(griffon):
    """As Griffon-G's own inference: the replica ends its turns with <end_of_turn>, which its EOS is not,
    so only a stage that stops on it (the griffon_gemma2 family adds it) gets answers that end."""
    tokenizer = griffon.tokenizer
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert griffon.model.generation_config.eos_token_id in (tokenizer.eos_token_id, [tokenizer.eos_token_id])
    assert end not in [tokenizer.eos_token_id]
    colors = [(200, 30, 30), (10, 40, 220), (20, 200, 20), (250, 250, 0), (90, 90, 90), (0, 0, 0)]
    stopped = griffon.chat([request(f"s{i}", color=c, max_tokens=48, min_tokens=0, stop_token_ids=["<end_of_turn>"])
                            for i, c in enumerate(colors)])
    running = griffon.chat([request(f"n{i}", color=c, max_tokens=48, min_tokens=0) for i, c in enumerate(colors)])
    assert any(r.ok and r.completion_tokens < 48 for r in stopped)
    assert all(r.error_kind == "length" for r in running)
