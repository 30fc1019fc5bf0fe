"""split_reasoning and the shared result rules (no model needed)."""

from __future__ import annotations

import pytest
from PIL import Image

from annotate.engines.messages import InvalidMessageError, to_hf_messages, to_openai_messages, to_vllm_messages
from annotate.engines.postprocess import finish
from annotate.engines.reasoning import split_reasoning


def test_split_full_block():
    assert split_reasoning("<think>look at it</think>\n\nA red car.") == ("look at it", "A red car.", None)


def test_split_closing_tag_only():
    # the opening tag was part of the prompt (chat template)
    assert split_reasoning("the car is red\n</think>\nA red car.") == ("the car is red", "A red car.", None)


def test_split_without_closing_tag_is_unfinished():
    # R1-distill templates open <think> in the prompt: an output that stops normally without ever
    # writing </think> is reasoning that did not finish, never an answer (it used to be stored).
    reasoning, answer, error = split_reasoning("  the car is red, so the caption is a red car. ")
    assert answer == "" and error and reasoning == "the car is red, so the caption is a red car."


def test_split_cut_inside_reasoning_is_an_error():
    reasoning, answer, error = split_reasoning("<think>the car is red and")
    assert answer == "" and error and reasoning == "the car is red and"


def test_split_empty_reasoning():
    assert split_reasoning("<think></think>ok") == ("", "ok", None)


@pytest.mark.parametrize("text", ["<think>a</think>", "a</think>   ", "a</think>b<think>c", "a</think>b</think>c"])
def test_split_answer_missing_or_holding_tags(text):
    reasoning, answer, error = split_reasoning(text)
    assert answer == "" and error


@pytest.mark.parametrize("finish_reason", ["stop", "length"])
@pytest.mark.parametrize("text", ["still thinking", "<think>still thinking", "<think>still thinking</think>"])
def test_finish_unfinished_reasoning_never_a_caption(text, finish_reason):
    r = finish("r", text, finish_reason, json_schema=None, reasoning_model=True, completion_tokens=9)
    assert r.error_kind == "unfinished_reasoning" and r.text == "" and r.reasoning == "still thinking"
    assert r.retryable and not r.ok


def test_finish_checks_a_server_side_reasoning_field():
    # a server's reasoning parser puts an unclosed block wholly into `reasoning`, leaving no content
    r = finish("r", "", "stop", json_schema=None, reasoning_model=True, reasoning="still thinking")
    assert r.error_kind == "unfinished_reasoning" and r.text == ""
    r = finish("r", "more </think> text", "stop", json_schema=None, reasoning_model=True, reasoning="x")
    assert r.error_kind == "unfinished_reasoning"
    r = finish("r", " A red car. ", "stop", json_schema=None, reasoning_model=True, reasoning="look")
    assert r.ok and r.text == "A red car." and r.reasoning == "look"


def test_finish_reasoning_then_json():
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = finish("r", '<think>hmm</think>{"ok": true}', "stop", json_schema=schema, reasoning_model=True)
    assert r.ok and r.parsed == {"ok": True} and r.reasoning == "hmm" and r.text == '{"ok": true}'


def test_finish_reasoning_ignored_for_plain_models():
    r = finish("r", "<think>x</think>y", "stop", json_schema=None, reasoning_model=False)
    assert r.ok and r.text == "<think>x</think>y" and r.reasoning is None


def test_finish_length_and_parse_errors():
    r = finish("r", "abc", "length", json_schema=None, reasoning_model=False, completion_tokens=3)
    assert r.error_kind == "length" and r.text == "abc"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert finish("r", "{not json", "stop", json_schema=schema, reasoning_model=False).error_kind == "parse"
    # valid JSON that breaks the schema is a parse error too
    assert finish("r", '{"ok": 3}', "stop", json_schema=schema, reasoning_model=False).error_kind == "parse"


def test_message_conversion():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "hi"}]}]
    v = to_vllm_messages(msgs)[0]["content"]
    assert v[0]["type"] == "image_pil" and v[0]["image_pil"].mode == "RGB" and v[1] == {"type": "text", "text": "hi"}
    o = to_openai_messages(msgs)[0]["content"]
    assert o[0]["type"] == "image_url" and o[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    h, images = to_hf_messages(msgs)
    assert h[0]["content"][0] == {"type": "image"} and len(images) == 1
    assert msgs[0]["content"][0]["image"] is img  # the caller's messages are not modified
    with pytest.raises(InvalidMessageError):
        to_vllm_messages([{"role": "user", "content": [{"type": "video", "video": None}]}])
