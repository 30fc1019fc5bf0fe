"""HfEngine (transformers generation) on both tiny models."""

from __future__ import annotations

import pytest

from annotate.config import HfArgs, ModelConfig, SamplingConfig
from annotate.engines.base import ChatRequest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_engines(tiny_model_paths):
    from annotate.engines.hf_engine import HfEngine

    engines = {
        kind: HfEngine(ModelConfig(engine="hf", path=str(path), hf=HfArgs(dtype="float32", device="cpu", batch_size=4)))
        for kind, path in tiny_model_paths.items()
        if kind in ("text", "vlm")  # the chat models; `sam` is a mask model with no tokenizer
    }
    yield engines
    for engine in engines.values():
        engine.close()


def text(rid, content, **sampling):
    sampling = {"max_tokens": 12, "min_tokens": 3, **sampling}
    return ChatRequest(messages=[{"role": "user", "content": content}], sampling=SamplingConfig(**sampling), request_id=rid)


def _generated(r):
    assert r.ok or r.error_kind == "length", r.error
    assert r.text and r.completion_tokens >= 3 and r.prompt_tokens > 0 and r.latency_s > 0


def test_text_model_batched(hf_engines):
    # different prompt lengths in one batch: left padding must not change a row's output
    requests = [text("a", "A red car."), text("b", "A long description of a small dog on the grass by a lake."),
                text("c", "Hi", max_tokens=5, ignore_eos=True)]
    results = hf_engines["text"].chat(requests)
    assert [r.request_id for r in results] == ["a", "b", "c"]
    _generated(results[0])
    _generated(results[1])
    assert results[2].error_kind == "length" and results[2].completion_tokens == 5
    alone = hf_engines["text"].chat([requests[1]])[0]
    assert alone.text == results[1].text


def test_vlm_with_image(hf_engines):
    import skimage.data
    from PIL import Image

    img = Image.fromarray(skimage.data.astronaut())
    with_image = ChatRequest(
        messages=[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe."}]}],
        sampling=SamplingConfig(max_tokens=12, min_tokens=3), request_id="img")
    results = hf_engines["vlm"].chat([with_image, text("txt", "No image (plain string content).")])
    for r in results:
        _generated(r)
    assert results[0].prompt_tokens > results[1].prompt_tokens  # the image's tokens


def test_images_to_text_model_fail_alone(hf_engines):
    from PIL import Image

    img_req = ChatRequest(messages=[{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (8, 8))}]}],
                          request_id="img")
    results = hf_engines["text"].chat([img_req, text("ok", "Hello")])
    assert results[0].error_kind == "invalid_input"
    _generated(results[1])


def test_json_schema_parse_only(hf_engines):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    req = ChatRequest(messages=[{"role": "user", "content": "JSON"}], sampling=SamplingConfig(max_tokens=6, min_tokens=6),
                      json_schema=schema, request_id="j")
    (r,) = hf_engines["text"].chat([req])
    # no constrained decoding in transformers: a random model's text is not JSON
    assert r.error_kind in ("parse", "length")


def test_stop_token_ids(hf_engines):
    """A stop token (id or token string of the model's tokenizer) ends the output like EOS."""
    engine = hf_engines["text"]
    free = engine.chat([text("a", "Describe a red car.", max_tokens=10, min_tokens=10, ignore_eos=True)])[0]
    ids = engine.tokenizer(free.text, add_special_tokens=False)["input_ids"]
    token = engine.tokenizer.convert_ids_to_tokens(ids[3])
    stopped = engine.chat([text("b", "Describe a red car.", max_tokens=10, min_tokens=0, stop_token_ids=[token])])[0]
    assert stopped.ok and stopped.completion_tokens <= ids.index(ids[3]) + 1 < 10, (free, stopped)
    bad = engine.chat([text("c", "x", stop_token_ids=["no-such-token"])])[0]
    assert bad.error_kind == "invalid_input"
