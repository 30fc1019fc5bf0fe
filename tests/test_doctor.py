"""`annotate doctor` (issue 22), its checking part: the chain's stages in order over a few records,
through the stages' own code, with scripted chat functions standing in for the models (no Ray, no
Serve): a healthy model passes; answers cut by max_tokens, answers stopped on a token the stage does not
name, and prompts far above the planner's assumption fail it, naming the stage and what to change. And
the run's load-time checkpoint check, which doctor runs first: a pipeline file with a wrong stop token is
refused before anything is deployed, naming the token. The deploying part (`run_doctor` through Serve)
is tests/test_doctor_serve.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from annotate.config import load_config
from annotate.doctor import check_stages, describe, run_doctor, token_assumptions
from annotate.engines.checkpoint_check import Checkpoint, TurnEnd
from annotate.engines.postprocess import finish
from annotate.stages.budget import StageBudget
from annotate.stages.chain import chain_of

from bench.harness import REPO, SAMPLE_SHARDS, TINY
from test_breaker import _records

PAPER_TINY = REPO / "pipelines" / "paper-tiny.yaml"
GOOD = "A red ceramic mug with a chipped handle stands on a wooden table beside a laptop."
VOCAB = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|eot_id|>": 3}


class Tokenizer:  # what the check reads of a tokenizer: its vocabulary
    def get_vocab(self):
        return VOCAB

    def convert_ids_to_tokens(self, i):
        return {v: k for k, v in VOCAB.items()}[i]


def checkpoint(end: str = "<|im_end|>", eos: tuple[int, ...] = (0,)) -> Checkpoint:
    return Checkpoint(Path("/nowhere"), Tokenizer(), TurnEnd(end + "\n", end, VOCAB[end], "the chat template"),
                      list(eos))


def answering(finish_reason="stop", stop_reason=None, prompt_tokens=120, text=GOOD):
    async def chat(request):
        answer = (json.dumps({"reason": "The crop shows a red ceramic mug.", "consistent": True})
                  if request.json_schema is not None else text)
        result = finish(request.request_id, answer, finish_reason, json_schema=request.json_schema,
                        reasoning_model=False, prompt_tokens=prompt_tokens, completion_tokens=20, latency_s=0.01)
        result.stop_reason = stop_reason
        return result
    return chat


healthy = answering()


async def cut(request):
    return finish(request.request_id, "A red ceramic mug with a", "length", json_schema=request.json_schema,
                  reasoning_model=False, prompt_tokens=120, completion_tokens=24, latency_s=0.01)


def check(chat, cfg=None, **kwargs):
    cfg = cfg or load_config(TINY)
    return asyncio.run(check_stages(cfg, _records(2), {name: chat for name in cfg.models}, {}, **kwargs))


def test_a_healthy_model_passes_every_stage():
    report = check(healthy)
    assert [s.stage for s in report.stages] == ["object", "validate", "context", "merge"]
    assert report.ok, describe(report)
    text = describe(report)
    assert "finish stop, last token EOS, tokens 120 prompt + 20 completion" in text and "all stages answered" in text
    assert "object_caption = " in text
    assert "tokens per request: prompt 120 (max 120) / completion 20 (no planner assumption" in text


def test_answers_cut_by_max_tokens_fail_it_with_what_to_change():
    report = check(cut)
    assert not report.ok
    object_check = report.stages[0]
    assert len(object_check.exchanges) == 4  # the stage's retries, as a run makes them: each answer shown
    assert any("4 of 4 answers cut by max_tokens" in p and "stages.object.sampling.max_tokens" in p
               for p in object_check.problems)
    assert any("2 of 2 regions failed" in p and "`length`" in p for p in object_check.problems)
    text = describe(report)
    assert "PROBLEM" in text and "last token max_tokens (finish length)" in text
    assert any("validate: not checked: no region reached it" in p for p in report.problems)


def test_a_cut_answer_names_the_end_of_turn_the_stage_does_not_stop_on():
    """The model folder read (as the checkpoint check reads it): its turns end with <|im_end|>, which
    the tiny chain's stages (no family, no stop tokens) do not stop on, and which is not EOS."""
    report = check(cut, checkpoints={"vlm": checkpoint(), "llm": checkpoint()})
    assert any('add "<|im_end|>" to stages.object.sampling.stop_token_ids' in p for p in report.stages[0].problems)
    covered = check(cut, checkpoints={"vlm": checkpoint(eos=(0, 2)), "llm": checkpoint(eos=(0, 2))})
    assert any("which the stage stops on: the answers are longer than max_tokens" in p
               for p in covered.stages[0].problems)


def test_answers_stopped_on_a_token_the_stage_does_not_name_fail_it_naming_the_token():
    cps = {"vlm": checkpoint(), "llm": checkpoint()}
    report = check(answering(stop_reason=VOCAB["<|eot_id|>"]), checkpoints=cps)
    assert not report.ok
    problems = report.stages[0].problems
    assert any("2 of 2 answers stopped on <|eot_id|>" in p and
               'add "<|eot_id|>" to stages.object.sampling.stop_token_ids' in p for p in problems), problems
    assert "last token <|eot_id|> (id 3)" in describe(report)
    # a stop token the stage names, or an EOS id, or a stop string it names: no problem
    assert check(answering(stop_reason=VOCAB["<|endoftext|>"]), checkpoints=cps).ok
    named = load_config(TINY, {"stages": {s: {"sampling": {"stop_token_ids": ["<|eot_id|>"], "stop": ["###"]}}
                                          for s in ("object", "validate", "context", "merge")}})
    assert check(answering(stop_reason=VOCAB["<|eot_id|>"]), named, checkpoints=cps).ok
    assert check(answering(stop_reason="###"), named, checkpoints=cps).ok
    strayed = check(answering(stop_reason="END"), named, checkpoints=cps)
    assert any("stopped on END" in p for p in strayed.stages[0].problems)
    # without the model folder an id cannot be named or checked: said, not failed
    unread = check(answering(stop_reason=VOCAB["<|eot_id|>"]))
    assert unread.ok and "token id 3 (not named: the model folder is not on this machine)" in describe(unread)


def test_prompts_far_above_the_planners_bound_fail_it():
    """The tiny models are not in the throughput table: the assumption is the load-time worst case."""
    cfg = load_config(TINY)
    budgets = {s: StageBudget(s, cfg.stages[s].model, 100, cfg.stages[s].sampling.max_tokens, 2048, "")
               for s in chain_of(cfg)}
    assert check(healthy, cfg, budgets=budgets).ok  # 120 <= 1.5 x 100
    report = check(healthy, cfg, budgets=budgets, prompt_factor=1.1)
    assert len(report.problems) == 4
    assert all("measured prompt 120 tokens per request, above 1.1 x the assumed 100 (load-time worst-case prompt"
               in p and "budget_caption_words" in p for p in report.problems), report.problems
    assert "vs assumed 100 (load-time worst-case prompt (stages/budget.py), a bound" in describe(report)


def test_prompts_far_above_the_plan_fail_it_naming_the_plan():
    """paper-tiny names the paper's models: `annotate plan`'s prediction per region is the assumption (the
    object prompt, object-v2: the crop at 6 tiles or fewer and the mask as one tile through InternVL2's
    tiling, about 1,300 tokens, plus the text)."""
    cfg = load_config(PAPER_TINY)
    assumed = token_assumptions(cfg, chain_of(cfg))
    plan_prompt = assumed["object"].prompt
    assert 1300 < plan_prompt < 1600 and assumed["object"].source.startswith("annotate plan")
    report = check(answering(prompt_tokens=6000), cfg)
    by_stage = {s.stage: s.problems for s in report.stages}
    assert any(f"object: measured prompt 6,000 tokens per request, above 1.5 x the assumed {plan_prompt:,.0f}" in p
               and "default_tokens.object.text" in p for p in by_stage["object"]), by_stage
    assert all(any("measured prompt 6,000" in p for p in by_stage[s]) for s in by_stage), by_stage
    assert check(answering(prompt_tokens=500), cfg).stages[0].problems == []  # below object's plan


def test_a_wrong_stop_token_is_refused_before_anything_is_deployed(tiny_model_paths, monkeypatch):
    """Griffon-G's family taken away: the context stage does not stop on <end_of_turn>. Doctor runs the
    run's own checkpoint check first and shows its refusal; no shard is read (there is none), no Ray
    cluster joined, nothing deployed."""
    import annotate.cluster

    monkeypatch.setattr(annotate.cluster, "ensure_ray", lambda *a, **k: pytest.fail("Ray joined"))
    cfg = load_config(PAPER_TINY, {"models": {"griffon_g": {"family": None}}})
    report = run_doctor(cfg, "/nonexistent", on_event=pytest.fail)
    assert not report.ok and not report.stages
    (problem,) = report.problems
    assert "checkpoint check failed at load time" in problem and "stage context: model griffon_g" in problem
    assert 'Add "<end_of_turn>" to stages.context.sampling.stop_token_ids' in problem
    assert 'PROBLEM checkpoint check failed at load time' in describe(report)


def test_the_command_exits_non_zero_naming_the_token(tmp_path, tiny_model_paths):
    from typer.testing import CliRunner

    from annotate.cli import app

    wrong = tmp_path / "wrong-stop.yaml"
    wrong.write_text(f"extends: {PAPER_TINY}\nmodels:\n  griffon_g:\n    family: null\n")
    log = tmp_path / "doctor.log"
    result = CliRunner().invoke(app, ["doctor", "--config", str(wrong), "--input", str(SAMPLE_SHARDS),
                                      "--log-file", str(log)])
    assert result.exit_code == 1, result.output
    assert 'Add "<end_of_turn>" to stages.context.sampling.stop_token_ids' in result.output
    assert "problem(s); fix them before a long run" in result.output
    assert log.exists()  # fd 2 pointed there for the command's duration


def test_doctor_is_quiet_and_says_where_the_logs_went(tmp_path, tiny_model_paths):
    """Run as a user runs it (its own process, so fd 2 is a real stream): the terminal gets the log
    file's name and the report; what the command's libraries write to stderr meanwhile goes to the file."""
    import subprocess
    import sys

    wrong = tmp_path / "wrong-stop.yaml"
    wrong.write_text(f"extends: {PAPER_TINY}\nmodels:\n  griffon_g:\n    family: null\n")
    log = tmp_path / "logs" / "doctor.log"
    script = ("import logging, sys; import annotate.doctor as d; real = d.run_doctor\n"
              "def noisy(*a, **k):\n"
              "    logging.getLogger('ray.serve').warning('LIBRARY LINE'); return real(*a, **k)\n"
              "d.run_doctor = noisy\n"
              "from annotate.cli import app; app()\n")
    done = subprocess.run([sys.executable, "-c", script, "doctor", "--config", str(wrong), "--input", str(SAMPLE_SHARDS),
                           "--log-file", str(log)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1, done.stderr
    terminal = done.stdout + done.stderr
    assert f"Ray, Serve and vLLM log to {log}" in " ".join(terminal.split())
    assert "problem(s); fix them before a long run" in done.stdout
    assert "LIBRARY LINE" in log.read_text() and "LIBRARY LINE" not in terminal


def test_the_stop_reason_is_carried_from_serve_and_from_the_in_process_engine():
    """vLLM's `stop_reason` (the stop token id or string; None for EOS) reaches the `ChatResult`: from a
    Serve LLM chat response through `response_summary` / `result_from_summary`, and from a
    `CompletionOutput` through the in-process engine's `_result`."""
    from types import SimpleNamespace

    from ray.serve.llm.openai_api_models import ChatCompletionResponse

    from annotate.engines.base import ChatRequest
    from annotate.engines.vllm_engine import VllmEngine
    from annotate.serving.client import result_from_summary
    from annotate.serving.llm_server import response_summary

    request = ChatRequest(messages=[{"role": "user", "content": "x"}], request_id="s:k:0")
    for stop_reason in (2, "###", None):
        response = ChatCompletionResponse.model_validate({
            "id": "c", "model": "llm", "created": 0, "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop", "stop_reason": stop_reason,
                         "message": {"role": "assistant", "content": "a red cup"}}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39}})
        summary = response_summary(response)
        assert summary["stop_reason"] == stop_reason
        assert result_from_summary(request, summary, False, 0.1).stop_reason == stop_reason
    assert result_from_summary(request, {k: v for k, v in summary.items() if k != "stop_reason"}, False,
                               0.1).stop_reason is None  # a replica of before

    engine = SimpleNamespace(config=SimpleNamespace(reasoning=False))
    completion = SimpleNamespace(text="a red cup", finish_reason="stop", stop_reason=7, token_ids=[5, 6, 7])
    output = SimpleNamespace(outputs=[completion], prompt_token_ids=[1, 2], num_cached_tokens=0)
    result = VllmEngine._result(engine, request, output, 0.1)
    assert result.ok and result.stop_reason == 7 and result.completion_tokens == 3
