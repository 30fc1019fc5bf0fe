"""The plan's arithmetic: tokens per region per stage, GPU time, busy and billed GPU-hours.

    seconds(region, stage) on one replica = prompt tokens / prefill tok/s
                                          + vision-encoder FLOPs / (prefill tok/s x 2 x LM params)
                                          + completion tokens / decode tok/s
    busy GPU-hours(stage)   = regions reaching it x seconds x GPUs per replica / 3600
    wall hours(deployment)  = busy GPU-hours of its stages / GPUs it holds (replicas x GPUs per replica)
    run wall hours          = the slowest deployment's (a streamed run ends when its slowest ends)
    billed GPU-hours        = GPUs held (the cluster, or the deployments' sum) x run wall hours

The vision term runs the ViT at the replica's prefill FLOP rate (same MFU). Prompt tokens: the
stage's text tokens (throughput file) + each prompt image's tokens from the model's processor code
(engines/image_tokens.py) averaged over the region shapes (plan/shapes.py); a part stage's images add
k focal crops (the `parts` stage's k, an upper bound). Throughput rows are
for `gpus` GPUs per replica and scale linearly with the GPUs a replica is given (the table's own
formulas: FLOPs and HBM bandwidth add up across a tensor-parallel group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from annotate.config import ModelConfig, PipelineConfig
from annotate.plan.shapes import FOCAL_CROP, FOCAL_CROP_SCALE, Shapes
from annotate.stages.chain import PART_IMAGE_STAGES, STAGE_ORDER, focal_crops_per_region

DEFAULT_THROUGHPUT = Path(__file__).resolve().parents[2] / "pipelines" / "throughput.yaml"


@dataclass
class StagePlan:
    stage: str
    model: str
    gpu: str
    gpus_per_replica: int
    replicas: int
    regions: float
    reach: float
    prompt_tokens: float
    completion_tokens: float
    image_tokens: float  # of prompt_tokens, from the processor (0 for a text stage)
    vit_tflops: float  # vision-encoder TFLOPs per region
    prefill_tok_s: float  # of one replica with gpus_per_replica GPUs
    decode_tok_s: float
    gpu_hours: float  # busy
    tokens_from: str
    predicted_prompt: float = 0.0  # what the processors and the table predict, beside a run's measure
    predicted_completion: float = 0.0
    budget: dict | None = None  # the load-time token budget of the measured run (worst-case prompt)


@dataclass
class Plan:
    regions: int
    gpu: str
    stages: list[StagePlan]
    shapes_from: str = ""
    cluster_gpus: int | None = None  # --gpus: the GPUs held, whatever the deployments use
    assumptions: list[str] = field(default_factory=list)

    @property
    def total_gpu_hours(self) -> float:
        """Busy GPU-hours: every replica's GPUs for the time it works."""
        return sum(s.gpu_hours for s in self.stages)

    def deployments(self) -> dict[str, tuple[int, int]]:
        """model -> (replicas, GPUs per replica)."""
        return {s.model: (s.replicas, s.gpus_per_replica) for s in self.stages}

    def busy_hours(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.stages:
            out[s.model] = out.get(s.model, 0.0) + s.gpu_hours
        return out

    def wall_hours(self) -> dict[str, float]:
        """Per deployment: its busy GPU-hours over all the GPUs it holds (its stages share them)."""
        deps = self.deployments()
        return {m: h / (deps[m][0] * deps[m][1]) for m, h in self.busy_hours().items()}

    @property
    def run_wall_hours(self) -> float:
        return max(self.wall_hours().values())

    @property
    def gpus_held(self) -> int:
        return self.cluster_gpus or sum(r * g for r, g in self.deployments().values())

    @property
    def billed_gpu_hours(self) -> float:
        return self.gpus_held * self.run_wall_hours

    def utilisation(self) -> dict[str, float]:
        """Each deployment's busy share of the run's wall time."""
        wall = self.run_wall_hours
        return {m: h / wall for m, h in self.wall_hours().items()}


def load_throughput(path: str | Path | None = None) -> dict[str, Any]:
    path = Path(path) if path else DEFAULT_THROUGHPUT
    table = yaml.safe_load(path.read_text()) or {}
    table.setdefault("_path", str(path))  # named in the printed assumptions
    for key in ("gpus", "models", "default_tokens", "default_reach", "default_shapes", "memory_rule"):
        if key not in table:
            raise ValueError(f"throughput file {path} lacks `{key}`")
    return table


def gpus_per_replica(model: ModelConfig) -> int:
    if model.resources.num_gpus:
        return max(1, round(model.resources.num_gpus))
    return max(1, model.vllm.tensor_parallel_size * model.vllm.pipeline_parallel_size)


def model_row(table: dict, key: str, model: ModelConfig) -> tuple[str, dict]:
    for name in (model.paper_model, key, model.path):
        if name and name in table["models"]:
            return name, table["models"][name]
    raise KeyError(f"model {key!r} ({model.paper_model or model.path}) is not in the throughput table; "
                   f"add a row for it (known: {', '.join(table['models'])})")


def image_processing(row: dict):
    """The row's image processor (engines/image_tokens.py), None for a text-only model."""
    spec = dict(row.get("image") or {})
    if not spec:
        return None
    from annotate.engines.image_tokens import processing_for

    return processing_for(spec.pop("processor"), **spec)


def stage_images(cfg: PipelineConfig, stage: str) -> tuple[str, ...]:
    """The images a stage sends per region at most: its prompt's, then one focal crop per part (k of them)."""
    from annotate.stages.base import PromptTemplate

    return PromptTemplate.load(cfg.stages[stage].prompt).images + (FOCAL_CROP,) * focal_crops_per_region(cfg, stage)


def stage_default(table: dict, key: str, stage: str):
    """The throughput file's `key` (default_tokens, default_reach) for `stage`, or an error naming what to add."""
    if stage not in table[key]:
        raise ValueError(f"the throughput file {table.get('_path', '')} has no {key}.{stage}; add one for this stage")
    return table[key][stage]


def capped(proc, cfg: PipelineConfig, stage: str):
    """The processor with the tile cap the stage sends its model (`PromptTemplate.tile_cap_for`: the
    prompt's `max_tiles`, for a model whose family tiles); a processor that does not tile, or a model
    sent no cap, is returned as it is."""
    import dataclasses

    from annotate.engines.conventions import conventions_of
    from annotate.stages.base import PromptTemplate

    stage_cfg = cfg.stages[stage]
    cap = PromptTemplate.load(stage_cfg.prompt).tile_cap_for(conventions_of(cfg.models[stage_cfg.model]))
    if cap is None or proc is None or not hasattr(proc, "max_tiles"):
        return proc
    return dataclasses.replace(proc, max_tiles=cap)


def predicted_tokens(cfg: PipelineConfig, stage: str, table: dict, shapes: Shapes) -> dict[str, float]:
    """Prompt (text + images), image and completion tokens, and ViT TFLOPs, per region of a stage."""
    model = cfg.models[cfg.stages[stage].model]
    _, row = model_row(table, cfg.stages[stage].model, model)
    d = stage_default(table, "default_tokens", stage)
    images = stage_images(cfg, stage)
    proc = capped(image_processing(row), cfg, stage) if images else None
    if images and proc is None:
        raise ValueError(f"stage {stage} shows images {images} but the throughput row of its model has no `image:`")
    image_tokens = vit = 0.0
    if proc is not None:
        image_tokens = shapes.mean(lambda s: sum(proc.tokens(*s.size_of(i)) for i in images))
        vit = shapes.mean(lambda s: sum(proc.vit_flops(*s.size_of(i)) for i in images)) / 1e12
    return {"prompt": float(d["text"]) + image_tokens, "image": image_tokens, "completion": float(d["completion"]),
            "vit_tflops": vit}


def region_seconds(pt: float, ct: float, vit_tflops: float, prefill: float, decode: float, lm_params_b: float) -> float:
    """One region's time on one replica (see the module docstring)."""
    return pt / prefill + vit_tflops * 1e12 / (prefill * 2 * lm_params_b * 1e9) + ct / decode


def make_plan(cfg: PipelineConfig, regions: int, gpu: str | None = None, throughput: dict | None = None,
              measured: dict | None = None, shapes: Shapes | None = None, cluster_gpus: int | None = None,
              layout: dict[str, tuple[int, int]] | None = None) -> Plan:
    """`layout`: model -> (replicas, GPUs per replica) instead of the pipeline file's (the balance)."""
    from annotate.plan.shapes import default_shapes

    table = throughput or load_throughput()
    gpu = gpu or next((m.resources.accelerator_type for m in cfg.models.values() if m.resources.accelerator_type), "H100")
    if gpu not in table["gpus"]:
        raise ValueError(f"unknown GPU type {gpu!r}; the throughput table knows {', '.join(table['gpus'])}")
    shapes = shapes or default_shapes(table["default_shapes"], cfg.data.crops)
    plan = Plan(regions=regions, gpu=gpu, stages=[], shapes_from=shapes.source, cluster_gpus=cluster_gpus)
    for stage in STAGE_ORDER:
        if stage not in cfg.stages:
            continue
        key = cfg.stages[stage].model
        model = cfg.models[key]
        row_name, row = model_row(table, key, model)
        if gpu not in row:
            raise ValueError(f"the throughput table has no {gpu} figures for {row_name}")
        replicas, gpr = (layout or {}).get(key, (model.resources.replicas, gpus_per_replica(model)))
        pred = predicted_tokens(cfg, stage, table, shapes)
        budget = (measured or {}).get("budgets", {}).get(stage)
        reach, pt, ct = float(stage_default(table, "default_reach", stage)), pred["prompt"], pred["completion"]
        src = "processor + table"
        if measured is not None:
            m = measured["stages"][stage]
            reach, pt, ct, src = m["reach"], m["prompt_tokens"], m["completion_tokens"], "run"
            if not m["regions"] and budget:  # no region reached it: the load-time worst case, an upper bound
                pt, src = float(budget["prompt_tokens"]), "run (prompt: load-time worst case)"
        scale = gpr / int(row["gpus"])
        prefill, decode = float(row[gpu]["prefill_tok_s"]) * scale, float(row[gpu]["decode_tok_s"]) * scale
        n = regions * reach
        seconds = n * region_seconds(pt, ct, pred["vit_tflops"], prefill, decode, float(row["params_b"]))
        plan.stages.append(StagePlan(stage, key, gpu, gpr, replicas, n, reach, pt, ct, pred["image"], pred["vit_tflops"],
                                     prefill, decode, seconds * gpr / 3600, src, pred["prompt"], pred["completion"],
                                     budget))
    plan.assumptions = assumptions(cfg, table, gpu, measured)
    return plan


def assumptions(cfg: PipelineConfig, table: dict, gpu: str, measured: dict | None) -> list[str]:
    g = table["gpus"][gpu]
    out = [
        f"throughput per replica: {table.get('_path', 'the given table')}; ESTIMATES derived "
        f"from {gpu} datasheet peaks ({g['peak_bf16_tflops']} TFLOPS bf16, {g['hbm_tb_s']} TB/s) with assumed MFU/MBU, "
        "not measured on this project; replace them with measured figures when you have them",
        "image tokens: each model's own processor code (vLLM 0.32's InternVL tiling; Griffon-G's 1022-px ViT-L/14 + "
        "conv_reduce = 1,369) over the region shapes; text tokens and completions: the throughput file's estimates",
        "vision encoders run at the replica's prefill FLOP rate: InternViT-6B over 1,025 tokens per tile, CLIP ViT-L/14 "
        "over 5,330 per image",
        "prefill and decode time are added (vLLM overlaps them) and prefix caching is ignored: the estimate errs high",
        "busy GPU-hours count each replica's GPUs while it works; billed GPU-hours count every GPU held for the whole "
        "run (streamed: until the slowest deployment finishes); model load and retries beyond a measured run's are "
        "not included",
    ]
    part_stages = [s for s in PART_IMAGE_STAGES if focal_crops_per_region(cfg, s)]
    if part_stages:
        out.append(f"{' and '.join(part_stages)}: the prompt's images plus k = {focal_crops_per_region(cfg, part_stages[0])} "
                   "focal crops per region (parts.params.k), an UPPER BOUND (a region may keep fewer parts); each "
                   f"focal crop {FOCAL_CROP_SCALE:g} of the object crop per side (plan/shapes.py, a guess: parts are "
                   "not known before the run)")
    for key in {cfg.stages[s].model for s in cfg.stages}:
        model = cfg.models[key]
        name, row = model_row(table, key, model)
        if row.get("engine") and row["engine"] != model.engine:
            out.append(f"WARNING: the throughput row of {name} assumes engine {row['engine']} (continuous batching); "
                       f"the pipeline file serves {key} with engine {model.engine}")
    if measured is not None:
        rr = measured["rejection_rate"]
        out.append(f"tokens per region and the fraction reaching each stage are measured from {measured['path']} "
                   f"({measured['regions']} regions; rejection rate {rr if rr is None else f'{rr:.1%}'}); retries included")
        used = {s: set(m["models"]) for s, m in measured["stages"].items()}
        configured = {s: {cfg.models[cfg.stages[s].model].paper_model or cfg.models[cfg.stages[s].model].path}
                      for s in cfg.stages}
        differs = [s for s in configured if used.get(s) and used[s] != configured[s]]
        if differs:
            out.append("WARNING: the run used other models than this pipeline file for "
                       + ", ".join(f"{s} ({', '.join(sorted(used[s]))})" for s in differs)
                       + ": their token counts (image tokens above all) and output lengths need not carry over")
    else:
        out.append("the fraction reaching each stage: the throughput file's defaults (rejection rate assumed 15%); "
                   "pass --from-run OUT to measure tokens and reach")
    return out
