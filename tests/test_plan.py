"""`annotate plan`: busy and billed GPU-hours per stage from tokens per region and the throughput
table (fast, no Ray, no engine; vLLM's InternVL processor code is called, not an engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from annotate.config import load_config
from annotate.data.records import ImageRecord, Provenance, RegionRecord, StageProvenance
from annotate.data.writer import write_parquet_atomic
from annotate.plan import gpus_per_replica, load_throughput, make_plan, measure_run
from annotate.plan.core import model_row, region_seconds

REPO = Path(__file__).resolve().parents[1]
LONGGRIT = REPO / "pipelines" / "longgrit.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(LONGGRIT)


@pytest.fixture(scope="module")
def plan(cfg):
    return make_plan(cfg, 1_000_000)


def test_throughput_table_covers_the_production_models(cfg):
    table = load_throughput()
    for key, model in cfg.models.items():
        _, row = model_row(table, key, model)
        assert row["gpus"] >= 1 and row["params_b"] > 0, key
        for gpu in table["gpus"]:
            assert row[gpu]["prefill_tok_s"] > 0 and row[gpu]["decode_tok_s"] > 0
    assert table["models"]["Griffon-G-26B"]["gpus"] == 1  # vLLM, one 80 GB GPU (27B in bf16)


def test_default_plan_arithmetic(cfg, plan):
    assert plan.gpu == "H100"  # the pipeline's accelerator_type
    assert [s.stage for s in plan.stages] == ["object", "validate", "context", "merge"]
    assert [s.gpus_per_replica for s in plan.stages] == [gpus_per_replica(cfg.models[s.model]) for s in plan.stages]
    obj = plan.stages[0]
    lm_seconds = obj.prompt_tokens / obj.prefill_tok_s + obj.completion_tokens / obj.decode_tok_s
    vit_seconds = obj.vit_tflops * 1e12 / (obj.prefill_tok_s * 2 * 70e9)  # at the replica's prefill FLOP rate
    assert obj.gpu_hours == pytest.approx(1_000_000 * (lm_seconds + vit_seconds) * 4 / 3600)
    assert 0.25 < vit_seconds / (obj.image_tokens / obj.prefill_tok_s) < 0.4  # ViT: about +1/3 per image token
    assert region_seconds(1000, 0, 0, 1000, 1, 70) == 1.0
    assert plan.total_gpu_hours == pytest.approx(sum(s.gpu_hours for s in plan.stages))
    assert plan.stages[2].regions < plan.stages[0].regions  # rejected regions go no further
    assert make_plan(cfg, 2_000_000).total_gpu_hours == pytest.approx(2 * plan.total_gpu_hours)
    assert make_plan(cfg, 1_000_000, gpu="A100").total_gpu_hours > plan.total_gpu_hours
    assert any("ESTIMATES" in a for a in plan.assumptions)


def test_image_tokens_per_stage(plan):
    by = {s.stage: s for s in plan.stages}
    assert by["context"].image_tokens == 1369 and by["context"].prompt_tokens == 150 + 1369  # Griffon-G: any size
    assert by["validate"].image_tokens == 0 and by["merge"].vit_tflops == 0
    # object: crop + mask, each >= 1 tile and <= 13 tiles (+ <img></img>)
    assert 2 * 258 <= by["object"].image_tokens <= 2 * (13 * 256 + 2)


def test_busy_billed_and_wall(cfg, plan):
    """Billed = GPUs held x the slowest deployment's wall time, at least the busy GPU-hours."""
    walls = plan.wall_hours()
    held = sum(m.resources.replicas * gpus_per_replica(m) for k, m in cfg.models.items() if k in walls)
    assert plan.gpus_held == held
    assert plan.run_wall_hours == max(walls.values())
    assert plan.billed_gpu_hours == pytest.approx(held * plan.run_wall_hours)
    assert plan.billed_gpu_hours > plan.total_gpu_hours
    util = plan.utilisation()
    assert max(util.values()) == pytest.approx(1.0) and min(util.values()) < 1
    on_cluster = make_plan(cfg, 1_000_000, cluster_gpus=32)
    assert on_cluster.billed_gpu_hours == pytest.approx(32 * plan.run_wall_hours)


def test_engine_the_table_assumes_is_checked(cfg, plan):
    """The table's Griffon-G row assumes vLLM's continuous batching: a file serving it otherwise is warned of."""
    assert cfg.models["griffon_g"].engine == "vllm"
    assert not any("assumes engine" in a for a in plan.assumptions)
    on_hf = load_config(LONGGRIT, {"models": {"griffon_g": {"engine": "hf"}}})
    warned = [a for a in make_plan(on_hf, 1_000).assumptions if "assumes engine" in a]
    assert len(warned) == 1 and "Griffon-G-26B assumes engine vllm" in warned[0] and "engine hf" in warned[0]


def test_unknown_gpu_is_refused(cfg):
    with pytest.raises(ValueError, match="unknown GPU type"):
        make_plan(cfg, 10, gpu="TPU")


def _region(i: int, status: str, stages: dict[str, tuple[int, int]]) -> RegionRecord:
    prov = Provenance(**{("validate_" if s == "validate" else s): StageProvenance(model=f"m-{s}", prompt_tokens=p,
                                                                                 completion_tokens=c)
                         for s, (p, c) in stages.items()})
    return RegionRecord(region_id=f"00000:k:{i}", region_index=i, phrase="a dog", bbox=[0, 0, 4, 4], status=status,
                        provenance=prov)


def test_measured_tokens_and_reach(cfg, tmp_path):
    full = {"object": (100, 10), "validate": (50, 5), "context": (80, 8), "merge": (40, 20)}
    regions = [
        _region(0, "ok", full),
        _region(1, "ok", {k: (2 * p, 2 * c) for k, (p, c) in full.items()}),
        _region(2, "rejected", {"object": (100, 10), "validate": (50, 5)}),
        _region(3, "failed", {"object": (100, 10)}),
    ]
    record = ImageRecord(image_key="k", shard="00000", width=4, height=4, caption="a dog", regions=regions)
    write_parquet_atomic([record], tmp_path / "data" / "00000.parquet")
    m = measure_run(tmp_path)
    assert m["stages"]["object"]["reach"] == 1.0
    assert m["stages"]["validate"]["reach"] == 0.75
    assert m["stages"]["context"]["reach"] == 0.5
    assert m["stages"]["context"]["prompt_tokens"] == 120  # mean of 80 and 160
    assert m["rejection_rate"] == pytest.approx(1 / 3)
    plan = make_plan(cfg, 1000, measured=m)
    assert plan.stages[3].regions == 500 and plan.stages[3].completion_tokens == 30
    assert all(s.tokens_from == "run" for s in plan.stages)
    assert any("other models" in a for a in plan.assumptions)  # m-object is not InternVL2


def test_measure_run_needs_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError):
        measure_run(tmp_path)


def test_cli_prints_busy_billed_and_the_balanced_snippet():
    from typer.testing import CliRunner

    from annotate.cli import app

    result = CliRunner().invoke(app, ["plan", "--regions", "1000", "--config", str(LONGGRIT), "--gpu-type", "H100",
                                      "--gpus", "24", "--sample-shards", "1", "--input", str(REPO / "sample_data" / "grit")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "busy GPU-hours" in out and "billed GPU-hours" in out and "run wall time" in out and "Assumptions" in out
    assert "shard(s) of" in out  # shapes from the sampled shard, not the default distribution
    block = out[out.index("models:"):out.index("Assumptions")]
    models = yaml.safe_load(block)["models"]
    assert sum(m["resources"]["num_gpus"] * m["resources"]["replicas"] for m in models.values()) <= 24
    assert models["griffon_g"]["resources"]["num_gpus"] == 1
    bad = CliRunner().invoke(app, ["plan", "--regions", "10", "--config", str(LONGGRIT), "--sample-shards", "1"])
    assert bad.exit_code != 0 and "--input" in bad.output


def test_load_time_budgets_from_the_run_record(cfg, tmp_path):
    """`--from-run` shows the token budgets the run's models counted at load time (stages/budget.py),
    and takes the worst-case prompt for a stage that no region of the run reached."""
    import json

    regions = [_region(0, "rejected", {"object": (100, 10), "validate": (50, 5)})]
    record = ImageRecord(image_key="k", shard="00000", width=4, height=4, caption="a dog", regions=regions)
    write_parquet_atomic([record], tmp_path / "data" / "00000.parquet")
    budgets = [{"stage": s, "model": "m", "prompt_tokens": p, "max_tokens": 64, "max_model_len": 4096, "worst_image": ""}
               for s, p in (("object", 900), ("validate", 300), ("context", 700), ("merge", 500))]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "20260101T000000-1.json").write_text(json.dumps({"token_budgets": []}))
    (tmp_path / "runs" / "20260102T000000-1.json").write_text(json.dumps({"token_budgets": budgets}))
    plan = make_plan(cfg, 1000, measured=measure_run(tmp_path))
    by_stage = {s.stage: s for s in plan.stages}
    assert by_stage["object"].prompt_tokens == 100 and by_stage["object"].tokens_from == "run"  # measured mean
    assert by_stage["merge"].prompt_tokens == 500 and "worst case" in by_stage["merge"].tokens_from
    assert by_stage["context"].budget["max_model_len"] == 4096


def _with_part_stages(k: int):
    """longgrit.yaml with the part stages on InternVL2 (a model the throughput table knows), k parts per region."""
    stage = {"model": "internvl2_76b", "sampling": {"max_tokens": 512}}
    return load_config(LONGGRIT, {
        "models": {"internvl2_76b": {"vllm": {"limit_mm_per_prompt": {"image": 1 + k}}}},
        "stages": {name: {**stage, "prompt": str(REPO / "prompts" / f"{name}.yaml")}
                   | ({"params": {"k": k}} if name == "parts" else {})
                   for name in ("parts", "part_describe", "part_verify")}})


def test_part_stages_count_k_focal_crops():
    """part_describe and part_verify send their prompt's images plus one focal crop per part: the plan counts
    k of them (parts.params.k, an upper bound, said in the assumptions); the parts stage sends none."""
    from annotate.plan.core import capped, image_processing
    from annotate.plan.shapes import FOCAL_CROP, default_shapes
    from annotate.stages.base import PromptTemplate

    k = 3
    cfg = _with_part_stages(k)
    table = load_throughput()
    plan = make_plan(cfg, 1000)
    by = {s.stage: s for s in plan.stages}
    assert [s.stage for s in plan.stages][-3:] == ["parts", "part_describe", "part_verify"]
    shapes = default_shapes(table["default_shapes"], cfg.data.crops)
    proc = capped(image_processing(model_row(table, "internvl2_76b", cfg.models["internvl2_76b"])[1]), cfg,
                  "part_describe")
    prompt_images = PromptTemplate.load(cfg.stages["part_describe"].prompt).images
    fixed = shapes.mean(lambda s: sum(proc.tokens(*s.size_of(i)) for i in prompt_images))
    focal = shapes.mean(lambda s: proc.tokens(*s.size_of(FOCAL_CROP)))
    assert focal >= 258  # at least one 448-px tile + <img></img>
    assert by["part_describe"].image_tokens == pytest.approx(fixed + k * focal)
    assert by["part_verify"].image_tokens == pytest.approx(fixed + k * focal)
    parts_proc = capped(image_processing(model_row(table, "internvl2_76b", cfg.models["internvl2_76b"])[1]), cfg, "parts")
    object_crop = shapes.mean(lambda s: sum(parts_proc.tokens(*s.size_of(i)) for i in prompt_images))
    assert by["parts"].image_tokens == pytest.approx(object_crop)  # the object crop alone (its own tile cap)
    assert by["part_describe"].vit_tflops > by["parts"].vit_tflops
    more = {s.stage: s for s in make_plan(_with_part_stages(k + 1), 1000).stages}
    assert more["part_describe"].image_tokens == pytest.approx(fixed + (k + 1) * focal)
    assert any("UPPER BOUND" in a and f"k = {k}" in a for a in plan.assumptions)


def test_the_part_stages_fit_the_production_vlms_context_at_the_default_k():
    """The part prompts cap tiles (max_tiles): at the model's default 12 tiles, 1 + k images came to about
    8,500 prompt tokens at k = 4, over InternVL2-76B's max_model_len in longgrit.yaml."""
    cfg = _with_part_stages(4)
    limit = cfg.models["internvl2_76b"].vllm.max_model_len
    for stage in make_plan(cfg, 1000).stages:
        if stage.stage in ("parts", "part_describe", "part_verify"):
            assert stage.prompt_tokens + cfg.stages[stage.stage].sampling.max_tokens < limit, stage


def test_focal_crop_size_follows_the_object_crop():
    from annotate.plan.shapes import FOCAL_CROP, RegionShape

    assert RegionShape((1024, 768), (600, 300)).size_of(FOCAL_CROP) == (300, 150)  # half the crop per side
    assert RegionShape((1024, 768), (40, 20), min_side=16).size_of(FOCAL_CROP) == (20, 16)  # grown to min_side
    assert RegionShape((1024, 768), (10, 10), min_side=16).size_of(FOCAL_CROP) == (10, 10)  # never past the crop


def test_every_stage_of_the_chain_can_be_planned_on_the_production_models():
    """The throughput file has token and reach defaults for every stage a pipeline file may name (the optional
    ones after merge included), so a plan of the whole chain runs instead of asking for a row."""
    from annotate.stages.chain import STAGE_ORDER

    text_stage = {"model": "qwen2_72b", "sampling": {"max_tokens": 512}}
    vlm_stage = {"model": "internvl2_76b", "sampling": {"max_tokens": 512}}
    optional = [name for name in STAGE_ORDER if name not in load_config(LONGGRIT).stages]
    cfg = load_config(LONGGRIT, {
        "models": {"internvl2_76b": {"vllm": {"limit_mm_per_prompt": {"image": 5}}}},
        "stages": {name: {**(vlm_stage if name.startswith(("negatives_visual", "part")) else text_stage),
                          "prompt": str(REPO / "prompts" / f"{name}.yaml")} for name in optional}})
    plan = make_plan(cfg, 1000)
    by = {s.stage: s for s in plan.stages}
    assert set(by) == set(STAGE_ORDER)
    table = load_throughput()
    for name in optional:
        assert by[name].prompt_tokens >= table["default_tokens"][name]["text"] > 0, name
        assert by[name].completion_tokens == table["default_tokens"][name]["completion"] > 0, name
        assert 0 < by[name].regions <= by["merge"].regions, name  # none reaches a stage after merge more often
    assert by["negatives_visual"].image_tokens > 0 and by["summarize"].image_tokens == 0


def test_the_tile_cap_counts_only_where_the_stage_sends_it():
    """The plan caps tiles as the stage does (`PromptTemplate.tile_cap_for`): InternVL2 with its family is
    sent object.yaml's max_tiles; the same model without a family is sent none, and tiles up to its 12."""
    with_family = {s.stage: s for s in make_plan(load_config(LONGGRIT), 1000).stages}
    without = {s.stage: s for s in make_plan(load_config(LONGGRIT, {"models": {"internvl2_76b": {"family": None}}}),
                                             1000).stages}
    assert without["object"].image_tokens > with_family["object"].image_tokens
    assert without["context"].image_tokens == with_family["context"].image_tokens  # Griffon-G: no tiles either way
