"""The object stage's prefill economy (issue 24 item 5): the square mask and the outlined crop as
views, the prompt's tile cap sent as the model's processor argument, and the planner counting what
each form of the object prompt sends. vLLM taking the cap is tested in test_engines_vllm.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annotate.config import CropConfig, ModelConfig, SamplingConfig, StageConfig, load_config
from annotate.data.crops import region_views
from annotate.data.masks import encode_rle
from annotate.data.records import ImageRecord, RegionRecord
from annotate.engines.base import ChatRequest
from annotate.engines.image_tokens import InternVLTiling
from annotate.plan.core import load_throughput, predicted_tokens
from annotate.plan.shapes import Shapes, region_shape
from annotate.stages.base import PromptTemplate, RegionContext
from annotate.stages.chain import build_stage

REPO = Path(__file__).resolve().parents[1]
LONGGRIT = REPO / "pipelines" / "longgrit.yaml"


def _views(w=300, h=200):
    image = Image.new("RGB", (w, h), (10, 200, 30))
    mask = np.zeros((h, w), bool)
    mask[50:150, 60:240] = True  # 180 x 100
    return region_views(image, mask, [60, 50, 180, 100], CropConfig(margin=0.1, mask_square_side=64)), mask


def test_the_square_mask_is_the_crops_mask_centred_on_black():
    v, _ = _views()
    square, crop_mask = v.crop_mask_square, np.asarray(v.crop_mask)
    assert square.mode == "L" and square.size == (64, 64)  # fitted in mask_square_side
    assert set(np.unique(np.asarray(square))) <= {0, 255}  # NEAREST: still binary
    long_side = max(crop_mask.shape)
    canvas = np.zeros((long_side, long_side), np.uint8)
    top, left = (long_side - crop_mask.shape[0]) // 2, (long_side - crop_mask.shape[1]) // 2
    canvas[top:top + crop_mask.shape[0], left:left + crop_mask.shape[1]] = crop_mask
    expected = np.asarray(Image.fromarray(canvas).resize((64, 64), Image.Resampling.NEAREST))
    assert (np.asarray(square) == expected).all()


def test_the_outline_is_drawn_on_the_masks_edge_only():
    v, _ = _views()
    crop, outlined = np.asarray(v.crop), np.asarray(v.crop_outlined)
    assert outlined.shape == crop.shape
    changed = (outlined != crop).any(axis=2)
    inside = np.asarray(v.crop_mask) > 0
    edge = inside & ~np.pad(inside, 1)[2:, 1:-1] | inside & ~np.pad(inside, 1)[:-2, 1:-1]  # top/bottom rows of the mask
    assert changed[edge].all() and (outlined[changed] == (255, 0, 0)).all()  # highlight_color
    core = np.zeros_like(inside)
    core[30:-30, 30:-30] = True
    assert not changed[core & inside].any()  # the object's pixels away from the edge are left alone


def _object_stage(prompt: str, family: str | None):
    model = ModelConfig(engine="vllm", path="x", family=family) if family else ModelConfig(engine="vllm", path="x")
    stage_cfg = StageConfig(model="m", prompt=str(REPO / "prompts" / prompt), sampling=SamplingConfig(max_tokens=8))
    return build_stage("object", stage_cfg, "x", model)


def _request(stage) -> ChatRequest:
    image = Image.new("RGB", (400, 300), (1, 2, 3))
    mask = np.zeros((300, 400), np.uint8)
    mask[100:200, 100:300] = 1
    region = RegionRecord(region_id="0:k:0", region_index=0, phrase="a mug", bbox=[100, 100, 200, 100],
                          mask=encode_rle(mask), mask_source="given")
    record = ImageRecord(image_key="k", shard="0", width=400, height=300, caption="c", regions=[region])
    return stage.build_request(RegionContext(record=record, region=region, image=image, crops=CropConfig()))


def test_the_tile_cap_is_sent_as_the_models_processor_argument():
    assert PromptTemplate.load(str(REPO / "prompts" / "object.yaml")).max_tiles == 6
    capped = _request(_object_stage("object.yaml", "internvl2_hermes2"))
    assert capped.mm_processor_kwargs == {"max_dynamic_patch": 6}
    images = [p["image"] for p in capped.messages[-1]["content"] if p["type"] == "image"]
    assert [im.size for im in images] == [(240, 120), (240, 240)]  # the crop, then the mask on its square
    assert _request(_object_stage("object.yaml", "griffon_gemma2")).mm_processor_kwargs is None  # does not tile
    assert _request(_object_stage("object.yaml", None)).mm_processor_kwargs is None  # no conventions: not sent
    assert _request(_object_stage("object-separate.yaml", "internvl2_hermes2")).mm_processor_kwargs is None


def test_every_image_prompt_caps_the_tiles():
    """InternVL2 tiles by aspect ratio, not size: an uncapped 4:3 image is 12 + 1 tiles (3,330 tokens)
    whatever its pixels. Every image prompt caps them (negatives_visual and context had no cap until
    BENCHMARKS 2's "Tile caps"), but object-separate.yaml, object-v1 kept as the measured baseline."""
    uncapped = [path.name for path in sorted((REPO / "prompts").glob("*.yaml"))
                if PromptTemplate.load(str(path)).images and PromptTemplate.load(str(path)).max_tiles is None]
    assert uncapped == ["object-separate.yaml"]


def test_the_serve_payload_and_the_openai_body_carry_it():
    from annotate.engines.openai_engine import OpenAIEngine
    from annotate.serving.client import completion_request

    request = ChatRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                          mm_processor_kwargs={"max_dynamic_patch": 6})
    assert completion_request("m", request)["mm_processor_kwargs"] == {"max_dynamic_patch": 6}
    engine = OpenAIEngine(ModelConfig(engine="openai", path="m", openai={"base_url": "http://127.0.0.1:9/v1"}))
    assert engine.request_body(request)["mm_processor_kwargs"] == {"max_dynamic_patch": 6}
    plain = ChatRequest(messages=request.messages)
    assert "mm_processor_kwargs" not in completion_request("m", plain)
    assert "mm_processor_kwargs" not in engine.request_body(plain)  # strict servers reject unknown fields


@pytest.mark.parametrize("bad", [0, -1, 2.5, "6", True])
def test_a_bad_tile_cap_is_refused_when_the_prompt_loads(tmp_path, bad):
    path = tmp_path / "p.yaml"
    path.write_text(f"version: v\nuser: hi\nimages: [crop]\nmax_tiles: {bad!r}\n".replace("'", ""))
    if isinstance(bad, str):
        path.write_text('version: v\nuser: hi\nimages: [crop]\nmax_tiles: "6"\n')
    with pytest.raises(ValueError, match="max_tiles"):
        PromptTemplate.load(str(path))


def test_the_planner_counts_each_form_as_the_processor_tiles_it():
    """A 4:3 crop of 480 x 360: object-v1 sends it and its mask at 4 x 3 + 1 tiles each; object-v2 the
    crop at 3 x 2 + 1 (cap 6) and the mask on a 448-px square, one tile; the outline the crop alone."""
    from bench.object_prefill import FORMS, with_object_prompt

    cfg, table = load_config(LONGGRIT), load_throughput()
    shapes = Shapes([region_shape(1000, 800, [100, 100, 400, 300], cfg.data.crops)], "one region")
    assert shapes.shapes[0].crop == (480, 360) and shapes.shapes[0].size_of("crop_mask_square") == (448, 448)
    full, six = InternVLTiling(), InternVLTiling(max_tiles=6)
    image = {prompt: predicted_tokens(with_object_prompt(cfg, prompt), "object", table, shapes)["image"]
             for prompt in FORMS.values()}
    assert image["object-separate.yaml"] == 2 * full.tokens(480, 360) == 2 * (13 * 256 + 2)
    assert image["object.yaml"] == six.tokens(480, 360) + six.tokens(448, 448) == (7 * 256 + 2) + (256 + 2)
    assert image["object-outline.yaml"] == six.tokens(480, 360)


def test_the_production_file_sends_the_v2_form():
    cfg = load_config(LONGGRIT)
    assert Path(cfg.stages["object"].prompt).name == "object.yaml"
    assert PromptTemplate.load(cfg.stages["object"].prompt).images == ("crop", "crop_mask_square")


def test_a_tiling_models_server_accepts_the_cap():
    """vLLM's server refuses per-request `mm_processor_kwargs` unless started with
    `trust_request_mm_kwargs` (seen: the paper run's load-time budget count failed on it). Serve LLM
    reads it from the engine arguments as one of vLLM's frontend arguments."""
    import dataclasses

    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    from annotate.serving.apps import engine_kwargs

    cfg = load_config(LONGGRIT)
    assert "trust_request_mm_kwargs" in {f.name for f in dataclasses.fields(FrontendArgs)}
    assert engine_kwargs(cfg.models["internvl2_76b"])["trust_request_mm_kwargs"] is True
    assert all("trust_request_mm_kwargs" not in engine_kwargs(cfg.models[m])
               for m in ("qwen2_72b", "griffon_g", "deepseek_r1_70b"))  # they take no per-request cap
