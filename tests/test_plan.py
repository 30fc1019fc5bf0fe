"""`annotate plan`: GPU-hours per stage from tokens per region and the throughput table (fast, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from annotate.config import load_config
from annotate.data.records import ImageRecord, Provenance, RegionRecord, StageProvenance
from annotate.data.writer import write_parquet_atomic
from annotate.plan import gpus_per_replica, load_throughput, make_plan, measure_run

REPO = Path(__file__).resolve().parents[1]
LONGGRIT = REPO / "pipelines" / "longgrit.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(LONGGRIT)


def test_throughput_table_covers_the_production_models(cfg):
    table = load_throughput()
    for key, model in cfg.models.items():
        row = table["models"][model.paper_model]
        assert row["gpus"] == gpus_per_replica(model), key
        for gpu in table["gpus"]:
            assert row[gpu]["prefill_tok_s"] > 0 and row[gpu]["decode_tok_s"] > 0


def test_default_plan_arithmetic(cfg):
    plan = make_plan(cfg, 1_000_000)
    assert plan.gpu == "H100"  # the pipeline's accelerator_type
    assert [s.stage for s in plan.stages] == ["object", "validate", "context", "merge"]
    assert [s.gpus_per_replica for s in plan.stages] == [4, 4, 2, 4]
    obj = plan.stages[0]
    expected = 1_000_000 * (obj.prompt_tokens / obj.prefill_tok_s + obj.completion_tokens / obj.decode_tok_s) * 4 / 3600
    assert obj.gpu_hours == pytest.approx(expected)
    assert plan.total_gpu_hours == pytest.approx(sum(s.gpu_hours for s in plan.stages))
    assert plan.stages[2].regions < plan.stages[0].regions  # rejected regions go no further
    double = make_plan(cfg, 2_000_000)
    assert double.total_gpu_hours == pytest.approx(2 * plan.total_gpu_hours)
    assert make_plan(cfg, 1_000_000, gpu="A100").total_gpu_hours > plan.total_gpu_hours
    assert any("ESTIMATES" in a for a in plan.assumptions)


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


def test_cli_prints_table_and_assumptions():
    from typer.testing import CliRunner

    from annotate.cli import app

    result = CliRunner().invoke(app, ["plan", "--regions", "1000", "--config", str(LONGGRIT), "--gpu", "H200"])
    assert result.exit_code == 0, result.output
    assert "GPU-hours" in result.output and "Assumptions" in result.output and "merge" in result.output


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
