"""The object stage's prefill economy (BENCHMARKS.md section 2): image tokens, vision-encoder FLOPs and
GPU-hours per region for each form of the object prompt, counted by InternVL2's own processor (vLLM
0.32's tiling, engines/image_tokens.py) over the region shapes of the sample shards and of the
throughput file's default distribution.

    .venv/bin/python -m bench.object_prefill [--input DIR --shards N] [--regions 1500000]

The forms (prompts/):
  object-separate.yaml  object-v1: crop + mask, each tiled by its aspect ratio (up to 12 + 1 tiles)
  object.yaml           object-v2: crop at 6 tiles or fewer + the mask centred on a square (one tile)
  object-outline.yaml   one image: the crop at 6 tiles or fewer with the mask's outline drawn on it
Counts only: what each form does to the captions needs the real InternVL2-76B (`annotate doctor`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from annotate.config import PipelineConfig, load_config
from annotate.plan.core import load_throughput, make_plan, predicted_tokens
from annotate.plan.shapes import Shapes, default_shapes, shapes_from_shards

REPO = Path(__file__).resolve().parents[1]
FORMS = {"separate (object-v1)": "object-separate.yaml", "square mask, crop <= 6 tiles (object-v2)": "object.yaml",
         "outline on the crop, <= 6 tiles": "object-outline.yaml"}


def with_object_prompt(cfg: PipelineConfig, prompt: str) -> PipelineConfig:
    stages = dict(cfg.stages)
    stages["object"] = stages["object"].model_copy(update={"prompt": str(REPO / "prompts" / prompt)})
    return cfg.model_copy(update={"stages": stages})


def measure(cfg: PipelineConfig, shapes: Shapes, regions: int) -> list[dict]:
    table = load_throughput()
    rows = []
    for form, prompt in FORMS.items():
        variant = with_object_prompt(cfg, prompt)
        tokens = predicted_tokens(variant, "object", table, shapes)
        plan = make_plan(variant, regions, throughput=table, shapes=shapes)
        obj = next(s for s in plan.stages if s.stage == "object")
        rows.append({"form": form, "image_tokens": tokens["image"], "prompt_tokens": tokens["prompt"],
                     "vit_tflops": tokens["vit_tflops"], "object_gpu_hours": obj.gpu_hours,
                     "busy_gpu_hours": plan.total_gpu_hours, "billed_gpu_hours": plan.billed_gpu_hours,
                     "wall_hours": plan.run_wall_hours})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "pipelines" / "longgrit.yaml"))
    parser.add_argument("--input", default=str(REPO / "sample_data" / "grit"))
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--regions", type=int, default=1_500_000)
    args = parser.parse_args()
    cfg = load_config(args.config)
    for shapes in (shapes_from_shards(args.input, args.shards, cfg.data),
                   default_shapes(load_throughput()["default_shapes"], cfg.data.crops)):
        print(f"\n{shapes.source}; {args.regions:,} regions, {args.config}'s layout")
        print("| form | image tok | prompt tok | ViT TFLOP | object busy GPU-h | busy GPU-h | billed GPU-h | wall h |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in measure(cfg, shapes, args.regions):
            print(f"| {r['form']} | {r['image_tokens']:,.0f} | {r['prompt_tokens']:,.0f} | {r['vit_tflops']:.1f} | "
                  f"{r['object_gpu_hours']:,.1f} | {r['busy_gpu_hours']:,.0f} | {r['billed_gpu_hours']:,.0f} | "
                  f"{r['wall_hours']:.1f} |")


if __name__ == "__main__":
    main()
