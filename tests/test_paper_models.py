"""The paper's four architectures as tiny replicas: pipelines/paper-tiny.yaml keeps to
pipelines/longgrit.yaml, the replicas have the production architectures and chat-template formats,
and `annotate run --config pipelines/paper-tiny.yaml` finishes on the sample shards with all four
replicas in vLLM behind Serve LLM (Griffon-G as the out-of-tree model of engines/griffon_vllm.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from annotate.config import load_config
from bench.harness import PAPER_TINY, REPO, SAMPLE_SHARDS, tiny_variant
from fixtures_pipeline import free_session_models
from bench.harness import input_region_ids, output_regions
from test_pipeline_run import STATUSES

LONGGRIT = REPO / "pipelines" / "longgrit.yaml"

# What may differ between the production file and its tiny replica: where things are, what a replica
# reserves, batch sizes, and the engine settings for parallelism, memory, dtype and eager mode.
MAY_DIFFER = {
    "": {"name", "run"},
    "model": {"path", "resources", "runtime_env"},  # runtime_env: the path of a prebuilt environment
    "model.vllm": {"tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "kv_cache_space_gib",
                   "max_num_seqs", "dtype", "enforce_eager", "in_process",
                   "enable_chunked_prefill"},  # scheduling/memory: CPU engines turn it off (config.py says why)
    "model.hf": {"device", "dtype", "batch_size"},
    "stage": {"batch_size"},
}
TINY_KIND = {"internvl2_76b": "internvl2", "qwen2_72b": "qwen2_instruct", "griffon_g": "griffon_g", "deepseek_r1_70b": "r1_llama"}


def _without(section: dict, keys: set[str]) -> dict:
    return {k: v for k, v in section.items() if k not in keys}


def comparable(path: Path) -> dict:
    dumped = load_config(path).model_dump(mode="json")
    out = _without(dumped, MAY_DIFFER[""])
    out["models"] = {}
    for name, model in dumped["models"].items():
        model = _without(model, MAY_DIFFER["model"])
        for engine in ("vllm", "hf"):
            if model.get(engine) is not None:
                model[engine] = _without(model[engine], MAY_DIFFER[f"model.{engine}"])
        out["models"][name] = model
    out["stages"] = {name: _without(stage, MAY_DIFFER["stage"]) for name, stage in dumped["stages"].items()}
    return out


def test_paper_tiny_keeps_to_the_production_file():
    production, tiny = comparable(LONGGRIT), comparable(PAPER_TINY)
    assert tiny == production  # engines, prompts, sampling, reasoning, image limits, trust_remote_code...
    tiny_cfg = load_config(PAPER_TINY)
    assert {name: m.path for name, m in tiny_cfg.models.items()} == {n: f"tiny:{k}" for n, k in TINY_KIND.items()}


def test_a_drift_is_caught(tmp_path):
    drifted = tiny_variant(tmp_path / "drifted.yaml", {"models": {"deepseek_r1_70b": {"reasoning": False}}}, base=PAPER_TINY)
    assert comparable(drifted) != comparable(LONGGRIT)


def test_tiny_replicas_have_the_production_architectures(tiny_model_paths):
    from transformers import AutoTokenizer
    from vllm.renderers.hf import _detect_content_format  # how vLLM classifies a chat template

    def config(kind):
        return json.loads((tiny_model_paths[kind] / "config.json").read_text())

    internvl = config("internvl2")
    assert internvl["model_type"] == "internvl_chat" and internvl["architectures"] == ["InternVLChatModel"]
    assert internvl["llm_config"]["architectures"] == ["LlamaForCausalLM"] and "auto_map" in internvl
    assert config("qwen2_instruct")["architectures"] == ["Qwen2ForCausalLM"]
    r1 = config("r1_llama")
    assert r1["architectures"] == ["LlamaForCausalLM"] and r1["max_position_embeddings"] >= 8192
    griffon = config("griffon_g")
    assert griffon["model_type"] == "gemma2_Griffon" and griffon["architectures"] == ["GriffonGemma2ForCausalLM"]
    assert griffon["mm_projector_type"] == "conv_reduce"
    for kind in ("internvl2", "qwen2_instruct", "r1_llama"):
        template = AutoTokenizer.from_pretrained(tiny_model_paths[kind], trust_remote_code=True).chat_template
        assert _detect_content_format(template, default="openai") == "string", kind  # as the real models'
    # the CPU pipeline's own VLM loops over content parts: vLLM's other code path
    assert _detect_content_format(AutoTokenizer.from_pretrained(tiny_model_paths["vlm"]).chat_template,
                                  default="string") == "openai"
    r1_tok = AutoTokenizer.from_pretrained(tiny_model_paths["r1_llama"])
    prompt = r1_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<think>\n")  # the template opens the reasoning block itself


DOCTOR_EXIT = "doctor exit code:"


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """`annotate run --config paper-tiny.yaml` in its own process and Ray cluster."""
    free_session_models()
    tmp = tmp_path_factory.mktemp("paper-run")
    # A random-weight validator's verdict is its weights' bias between `true` and `false`, nearly the
    # same for every prompt (seen: all 15 regions of a run rejected, so none reached the R1-style merge).
    # The variant's schema allows `true` alone, so regions go on to context and merge; the reason is
    # still generated, parsed and reviewed.
    validate = yaml.safe_load((REPO / "prompts" / "validate.yaml").read_text())
    validate["json_schema"]["properties"]["consistent"] = {"type": "boolean", "enum": [True]}
    (tmp / "validate-accepting.yaml").write_text(yaml.safe_dump(validate, sort_keys=False))
    config = tiny_variant(tmp / "paper-tiny.yaml", {
        "stages": {"validate": {"prompt": str(tmp / "validate-accepting.yaml")}}}, base=PAPER_TINY)
    out = tmp / "out"
    # `annotate doctor`, then `annotate run`, as a user runs them before a long run: one process, so the run
    # finds the models doctor deployed (a user's `--address` cluster keeps them the same way).
    doctor = ["doctor", "--config", str(config), "--input", str(SAMPLE_SHARDS), "--images", "2", "--regions", "2"]
    run = ["run", "--stage", "all", "--shards", "0-1", "--input", str(SAMPLE_SHARDS), "--output", str(out),
           "--config", str(config)]
    driver = tmp / "doctor_then_run.py"
    driver.write_text(
        "import sys\nfrom typer.main import get_command\nfrom annotate.cli import app\n"
        "cli = get_command(app)\n"
        f"code = cli.main(args={doctor!r}, prog_name='annotate', standalone_mode=False)\n"
        f"print('{DOCTOR_EXIT}', code or 0, flush=True)\n"
        f"sys.exit(cli.main(args={run!r}, prog_name='annotate', standalone_mode=False) or 0)\n")
    done = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=3300, cwd=tmp)
    return done, out


@pytest.mark.slow
@pytest.mark.own_cluster  # frees the session's deployments: run before the tests that share them (conftest.py)
@pytest.mark.timeout(3600)
def test_paper_tiny_runs_end_to_end(paper_run):
    run, out = paper_run
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    record = json.loads(max((out / "runs").glob("*.json")).read_text())
    assert record["models_deployed"] == []  # the run found every model doctor had deployed
    regions = output_regions(out)
    assert Counter(r["region_id"] for r in regions) == input_region_ids(SAMPLE_SHARDS, [0, 1])  # every region once
    cfg = load_config(PAPER_TINY)
    paper = {stage: cfg.models[cfg.stages[stage].model].paper_model for stage in cfg.stages}
    statuses = Counter()
    for region in regions:
        statuses[region["status"]] += 1
        assert region["status"] in STATUSES and (region["status"] == "ok" or region["error"]), region
        for field in ("object_caption", "context_caption", "fine_caption"):
            assert not re.search(r"</?think>", region[field] or ""), (field, region)
        if region["status"] == "ok":
            for stage in ("object", "validate", "context", "merge"):
                assert region["provenance"][stage]["model"] == paper[stage], (stage, region["provenance"])
    assert statuses["ok"] >= 1, statuses  # at least one region through the R1-style merge
    # Griffon-G ran in vLLM: Serve LLM's server class holds its replica, as the other three models'
    servers = {r["model"]: r["class"] for r in record["replicas"]}
    assert set(servers) == set(cfg.models), servers
    assert all(c.endswith(f":StageLLMServer:{m}") for m, c in servers.items()), servers
    # the load-time token budget of every stage, counted by its model's own deployment
    budgets = {b["stage"]: b for b in record["token_budgets"]}
    assert set(budgets) == {"object", "validate", "context", "merge"}
    for stage, budget in budgets.items():
        assert 0 < budget["prompt_tokens"] and budget["prompt_tokens"] + budget["max_tokens"] <= budget["max_model_len"]
    assert budgets["object"]["worst_image"] and budgets["merge"]["worst_image"] == ""
    # `annotate plan --from-run` shows the same counts
    from typer.testing import CliRunner

    from annotate.cli import app

    plan = CliRunner().invoke(app, ["plan", "--regions", "1000", "--config", str(LONGGRIT), "--from-run", str(out)])
    assert plan.exit_code == 0, plan.output
    flat = " ".join(plan.output.split())
    for stage, budget in budgets.items():
        assert f"{stage} {budget['prompt_tokens']:,} + {budget['max_tokens']:,} vs {budget['max_model_len']}" in flat


def test_the_vllm_alternative_for_the_context_stage_is_one_line():
    """Griffon-G's documented alternative: the context stage on InternVL2 (served by vLLM), changed in
    the stage's `model:` line alone; the Griffon deployment is then not started at all."""
    from annotate.serving.apps import needed_models

    for path in (LONGGRIT, PAPER_TINY):
        assert "model: internvl2_76b" in path.read_text().split("context:", 1)[1].split("merge:", 1)[0]
        cfg = load_config(path, {"stages": {"context": {"model": "internvl2_76b"}}})
        assert set(needed_models(cfg)) == {"internvl2_76b", "qwen2_72b", "deepseek_r1_70b"}


@pytest.mark.slow
@pytest.mark.own_cluster
def test_doctor_finds_no_convention_defect_in_the_paper_replicas(paper_run):
    """`annotate doctor` on paper-tiny, through Serve, with the four paper architectures: the checkpoint check
    of each model's conventions, every stage's token budget counted by its deployment, every stage reached,
    and every answer stopped on its model's own end of turn (or EOS). Random weights do answer badly: what
    doctor may report is answers cut by max_tokens with the stop token right (it says so) and failed
    regions; never a stop-token mismatch, a budget or checkpoint refusal, or a prompt above the plan."""
    run, _ = paper_run
    report, _, _ = run.stdout.partition(DOCTOR_EXIT)
    assert DOCTOR_EXIT in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    cfg = load_config(PAPER_TINY)
    for name, model in cfg.models.items():
        assert f"checkpoint: model {name}: " in report and "ends an assistant turn with" in report, report
    assert sorted(re.findall(r"^token budget: (\w+) ", report, re.M)) == sorted(cfg.stages), report
    sections = dict(re.findall(r"^== (\w+) \(model \w+, max_tokens \d+\): (\d+) regions", report, re.M))
    assert list(sections) == list(cfg.stages) and all(int(n) > 0 for n in sections.values()), report  # all reached
    problems = re.findall(r"^\s*PROBLEM (.*)$", report, re.M)
    for problem in problems:
        cut = "answers cut by max_tokens" in problem and "which the stage stops on" in problem
        failed = re.match(r"\w+: \d+ of \d+ regions failed", problem)
        assert cut or failed, problem  # random weights' answers, not a convention or a budget
    ends = {"object": "<|im_end|>", "validate": "<|im_end|>", "merge": "<｜end▁of▁sentence｜>"}
    for stage, token in ends.items():
        section = report.split(f"== {stage} ", 1)[1].split("\n== ", 1)[0]
        stops = re.findall(r"finish stop, last token ([^,]+),", section)
        assert stops and all(token in s or "endoftext" in s for s in stops), (stage, stops)
