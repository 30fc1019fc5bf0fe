"""The engine kinds (config.ENGINE_KINDS) are the one place a kind's facts are written: every kind has a
class in the factory, `engine:` accepts exactly these, and serving, the checks and the planner read
the table."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from annotate.config import ENGINE_KINDS, ModelConfig, PipelineConfig, SamplingConfig, SegmentConfig, StageConfig
from annotate.engines.factory import ENGINE_CLASSES, build_engine
from annotate.serving.apps import CHAT_SERVER_KINDS, in_flight_cap, model_app

DEPLOYED = [name for name, kind in ENGINE_KINDS.items() if kind.served_by is not None]


def test_every_kind_has_a_class_and_every_class_a_kind():
    assert set(ENGINE_CLASSES) == set(ENGINE_KINDS) == {"vllm", "openai", "hf"}
    classes = {name: load() for name, load in ENGINE_CLASSES.items()}
    assert {name: cls.__name__ for name, cls in classes.items()} == {
        "vllm": "VllmEngine", "openai": "OpenAIEngine", "hf": "HfEngine"}
    assert all(callable(getattr(cls, "chat", None)) and callable(getattr(cls, "close", None))
               for cls in classes.values())


def test_every_kind_has_its_settings_section_and_a_deployed_one_its_batch():
    for name, kind in ENGINE_KINDS.items():
        assert kind.name == name
        assert name in ModelConfig.model_fields, f"ModelConfig has no `{name}:` section for its engine's arguments"
        assert (kind.per_replica is not None) == (kind.served_by is not None), name


def test_an_unknown_engine_is_refused_naming_the_known_ones():
    with pytest.raises(ValidationError) as err:
        ModelConfig(engine="sglang", path="m")
    message = str(err.value)
    assert "engine" in message and "sglang" in message
    assert all(repr(name) in message for name in ENGINE_KINDS), message
    assert ModelConfig.model_json_schema()["properties"]["engine"]["enum"] == list(ENGINE_KINDS)
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):  # past validation, the factory still says so
        build_engine(ModelConfig.model_construct(engine="sglang", path="m"))


def test_pipeline_files_keep_loading(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"models": {name: {"engine": name, "path": "m"} for name in ENGINE_KINDS}}))
    from annotate.config import load_config

    cfg = load_config(path)
    assert {name: m.engine for name, m in cfg.models.items()} == {name: name for name in ENGINE_KINDS}
    assert json.loads(cfg.models["vllm"].model_dump_json())["engine"] == "vllm"


@pytest.mark.parametrize("engine", DEPLOYED)
def test_serving_kind_and_deployment_follow_the_table(engine):
    kind = ENGINE_KINDS[engine]
    app = model_app("m", ModelConfig(engine=engine, path="m"))
    if kind.served_by == "llm":
        assert app.kind == "llm" and app.deployment_name == "StageLLMServer:m"
        assert engine not in CHAT_SERVER_KINDS
    else:
        assert kind.served_by == "chat"
        assert app.kind == engine and app.kind in CHAT_SERVER_KINDS and app.deployment_name == f"m-{engine}"
    assert model_app("segment", SegmentConfig(path="tiny:sam")).kind == "sam"
    assert set(CHAT_SERVER_KINDS) == {n for n, k in ENGINE_KINDS.items() if k.served_by == "chat"} == {"hf"}


def test_a_server_outside_the_cluster_is_not_a_deployment():
    outside = [name for name, kind in ENGINE_KINDS.items() if kind.served_by is None]
    assert outside == ["openai"]
    with pytest.raises(ValueError, match="model 'gpt' uses the openai engine: it is a server outside the cluster, "
                                         "not a deployment"):
        model_app("gpt", ModelConfig(engine="openai", path="m"))


def test_in_flight_cap_per_engine():
    vllm = ModelConfig(engine="vllm", path="m")
    assert in_flight_cap(vllm) == 2 * 256
    assert in_flight_cap(vllm.model_copy(update={"vllm": vllm.vllm.model_copy(update={"max_num_seqs": 8})})) == 16
    hf = ModelConfig(engine="hf", path="m", hf={"batch_size": 3}, resources={"replicas": 2})
    assert in_flight_cap(hf) == 2 * 3 * 2
    assert in_flight_cap(ModelConfig(engine="hf", path="m", serving={"max_in_flight": 5})) == 5


@pytest.mark.parametrize("engine", list(ENGINE_KINDS))
def test_a_thinking_budget_needs_an_engine_that_takes_a_reasoning_parser(engine):
    def pipeline():
        return PipelineConfig(
            models={"r": ModelConfig(engine=engine, path="m", reasoning=True, reasoning_parser="deepseek_r1")},
            stages={"merge": StageConfig(model="r", prompt="merge.yaml",
                                         sampling=SamplingConfig(max_tokens=64, thinking_token_budget=8))})

    if ENGINE_KINDS[engine].reasoning_parser:
        assert pipeline().models["r"].engine == engine
    else:
        with pytest.raises(ValueError, match="needs a vLLM model with a `reasoning_parser`"):
            pipeline()


class _Tokenizer:
    eos_token_id = 2


@pytest.mark.parametrize("engine", DEPLOYED)
def test_eos_ids_and_their_report_follow_the_table(engine, tmp_path):
    from annotate.doctor import last_token
    from annotate.engines.base import ChatResult
    from annotate.engines.checkpoint_check import eos_ids

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    model = ModelConfig(engine=engine, path="m")
    said, odd = last_token(ChatResult("r", finish_reason="stop", stop_reason=None), SamplingConfig(), model, None)
    if ENGINE_KINDS[engine].vllm_stops:  # the tokenizer's EOS, then the generation config's
        assert eos_ids(model, tmp_path, _Tokenizer()) == [2, 7]
        assert (said, odd) == ("EOS", None)
    else:  # transformers' generate: the generation config's
        assert eos_ids(model, tmp_path, _Tokenizer()) == [7, 2]
        assert (said, odd) == (f"not reported by the {engine} engine", None)


def test_the_planner_sets_tensor_parallelism_only_where_the_engine_takes_it(tmp_path):
    from annotate.plan.balance import snippet

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"models": {name: {"engine": name, "path": "m"} for name in DEPLOYED}}))
    layout = {name: (1, 2) for name in DEPLOYED}
    text = snippet(str(path), layout, "H100", {name: 0.5 for name in DEPLOYED}, {})
    models = yaml.safe_load(text)["models"]
    for name in DEPLOYED:
        assert models[name]["resources"]["num_gpus"] == 2
        parallel = (models[name].get("vllm") or {}).get("tensor_parallel_size")
        assert parallel == (2 if ENGINE_KINDS[name].tensor_parallel else None), name
