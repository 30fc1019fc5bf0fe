"""The pipeline files: validated by the config tree, production settings consistent, prompts sane."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from annotate.config import PipelineConfig, load_config
from annotate.data.records import Provenance, RegionRecord
from annotate.data.store import FINAL, PREPARE, config_fingerprint
from annotate.stages.base import PromptTemplate
from annotate.stages.chain import (CORE_STAGES, STAGE_CLASSES, STAGE_FIELDS, STAGE_ORDER, STORED_OUTPUTS, chain_of,
                                   check_stages, stage_io)

REPO = Path(__file__).resolve().parents[1]
# Pipeline definitions are the YAML files with stages (pipelines/ also holds the planner's throughput table).
PIPELINES = sorted(p for p in (REPO / "pipelines").glob("*.yaml") if "stages" in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_files_load_and_define_the_whole_chain(path):
    cfg = load_config(path)
    assert tuple(cfg.stages) == chain_of(cfg) and chain_of(cfg)[:4] == CORE_STAGES
    check_stages(cfg, chain_of(cfg))
    for name, stage in cfg.stages.items():
        template = PromptTemplate.load(stage.prompt)
        assert template.version.startswith(f"{name}-v")


def test_production_gpu_counts_match_parallelism():
    cfg = load_config(REPO / "pipelines" / "longgrit.yaml")
    for name, model in cfg.models.items():
        assert model.resources.num_gpus >= 1, name
        assert model.paper_model, f"{name}: say which model of the paper it stands for"
        if model.engine == "vllm":
            parallel = model.vllm.tensor_parallel_size * model.vllm.pipeline_parallel_size
            assert parallel == model.resources.num_gpus, f"{name}: tp*pp={parallel} but num_gpus={model.resources.num_gpus}"
    # The paper's model per stage.
    paper = {stage: cfg.models[s.model].paper_model for stage, s in cfg.stages.items()}
    assert "InternVL2" in paper["object"] and "Qwen2-72B" in paper["validate"]
    assert "Griffon" in paper["context"] and "DeepSeek-R1" in paper["merge"]
    assert cfg.models[cfg.stages["merge"].model].reasoning


def test_tiny_pipeline_runs_on_cpu_only():
    cfg = load_config(REPO / "pipelines" / "tiny.yaml")
    assert all(m.resources.num_gpus == 0 for m in cfg.models.values())
    assert all(m.path.startswith("tiny:") for m in cfg.models.values())
    assert cfg.run.dashboard_host == "127.0.0.1"


def test_unknown_keys_and_undeclared_models_are_errors(tmp_path):
    raw = yaml.safe_load((REPO / "pipelines" / "tiny.yaml").read_text())
    raw["stages"]["object"]["model"] = "nope"
    with pytest.raises(ValidationError, match="not declared"):
        PipelineConfig.model_validate(raw)
    raw = yaml.safe_load((REPO / "pipelines" / "tiny.yaml").read_text())
    raw["stages"]["object"]["sampling"]["max_tokenz"] = 3
    with pytest.raises(ValidationError, match="max_tokenz"):
        PipelineConfig.model_validate(raw)


def test_renamed_run_keys_say_their_new_names():
    """A file written before one chain worker ran every stage is refused with the key to write instead."""
    for old, new in (("stage_worker_cpus", "chain_worker_cpus"), ("stage_workers_per_replica", "chain_workers_per_replica")):
        raw = yaml.safe_load((REPO / "pipelines" / "tiny.yaml").read_text())
        raw["run"][old] = raw["run"].pop(new)
        with pytest.raises(ValidationError, match=f"run.{old} is now run.{new}"):
            PipelineConfig.model_validate(raw)


def test_fingerprint_follows_prompt_text_not_location(tmp_path):
    cfg = load_config(REPO / "pipelines" / "tiny.yaml")
    moved = tmp_path / "prompts"
    moved.mkdir()
    for stage in cfg.stages.values():
        (moved / Path(stage.prompt).name).write_text(Path(stage.prompt).read_text())
    copy = cfg.model_copy(deep=True)
    for stage in copy.stages.values():
        stage.prompt = str(moved / Path(stage.prompt).name)
    assert config_fingerprint(copy) == config_fingerprint(cfg)
    merge = (moved / "merge.yaml").read_text()
    (moved / "merge.yaml").write_text(merge.replace("\nversion: ", "\nversion: edited-"))
    assert (moved / "merge.yaml").read_text() != merge
    assert config_fingerprint(copy) != config_fingerprint(cfg)


@pytest.mark.parametrize("chain", [CORE_STAGES, STAGE_ORDER], ids=["core", "with-optional"])
def test_every_stage_mode_reads_the_previous_output(chain):
    all_stages = stage_io("all", chain)
    assert all_stages.reads == PREPARE and all_stages.writes == FINAL and all_stages.stages == chain
    previous = PREPARE
    for name in chain:  # one stage at a time walks the same chain, ending in the dataset
        io = stage_io(name, chain)
        assert io.reads == previous and io.stages == (name,) and previous in STORED_OUTPUTS
        previous = io.writes
    assert previous == FINAL
    with pytest.raises(ValueError, match="unknown stage 'caption'"):
        stage_io("caption", chain)
    if chain == CORE_STAGES:  # an optional stage the pipeline file does not define
        with pytest.raises(ValueError, match="define it in the pipeline file"):
            stage_io("summarize", chain)


def test_a_pipeline_file_can_extend_another(tmp_path):
    cfg = load_config(REPO / "pipelines" / "tiny-fields.yaml")
    base = load_config(REPO / "pipelines" / "tiny.yaml")
    assert cfg.models == base.models and cfg.stages["object"] == base.stages["object"]
    assert cfg.stages["negatives"].params == {"k": 2} and cfg.quality is not None
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match="in a loop"):
        load_config(tmp_path / "a.yaml")


def test_the_chain_is_derived_from_the_stage_classes():
    """Each stage declares the region field it writes and keeps a provenance entry; the record schema
    has both, so a new stage class cannot leave the schema, the retry reset or the planner behind."""
    assert STAGE_ORDER == ("object", "validate", "context", "merge",
                           "summarize", "ground", "negatives", "negatives_text", "negatives_visual",
                           "parts", "part_describe", "part_verify")
    assert STAGE_FIELDS == tuple((name, cls.writes) for name, cls in STAGE_CLASSES.items())
    for name, field in STAGE_FIELDS:
        assert field in RegionRecord.model_fields, name
        assert Provenance().of(name) is not None
    assert set(Provenance.stage_names()) == set(STAGE_ORDER)


def test_a_pipeline_file_naming_an_unknown_stage_is_refused():
    cfg = load_config(REPO / "pipelines" / "tiny.yaml")
    check_stages(cfg)
    cfg.stages["objct"] = cfg.stages["object"]
    with pytest.raises(ValueError, match="unknown stage objct"):
        check_stages(cfg)
    del cfg.stages["objct"], cfg.stages["merge"]
    with pytest.raises(ValueError, match="defines no stage merge"):
        check_stages(cfg)
    check_stages(cfg, stage_io("object").stages)  # enough for `--stage object`


def test_stage_class_override_must_be_a_stage_of_that_name():
    from annotate.stages.chain import stage_class
    from annotate.stages.merge import MergeStage

    assert stage_class("merge") is MergeStage
    assert stage_class("merge", "annotate.stages.merge:MergeStage") is MergeStage
    with pytest.raises(ValueError, match="named 'object'"):
        stage_class("object", "annotate.stages.merge:MergeStage")


def test_serving_settings_do_not_change_the_records_fingerprint():
    cfg = load_config(REPO / "pipelines" / "tiny.yaml")
    other = cfg.model_copy(deep=True)
    other.models["llm"].serving.max_in_flight = 3
    other.models["llm"].serving.autoscaling = {"min_replicas": 1, "max_replicas": 4}
    assert config_fingerprint(other) == config_fingerprint(cfg)
    other.models["llm"].vllm.max_model_len = 1024
    assert config_fingerprint(other) != config_fingerprint(cfg)


def test_a_thinking_budget_needs_a_reasoning_parser():
    """vLLM refuses every request with a thinking budget on an engine without a reasoning parser: the
    pipeline file is refused at load, before any GPU is reserved."""
    cfg = load_config(REPO / "pipelines" / "paper-tiny.yaml")
    assert cfg.stages["merge"].sampling.thinking_token_budget < cfg.stages["merge"].sampling.max_tokens
    with pytest.raises(ValueError, match="reasoning_parser"):
        load_config(REPO / "pipelines" / "paper-tiny.yaml", {"models": {"deepseek_r1_70b": {"reasoning_parser": None}}})
