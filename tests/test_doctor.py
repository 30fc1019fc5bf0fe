"""`annotate doctor` (issue 22), its checking part: the chain's stages in order over a few records,
through the stages' own code, with scripted chat functions standing in for the models (no Ray, no
Serve): a healthy model passes; answers cut by max_tokens fail it, naming the stage and what to change.
The deploying part (`run_doctor`) is what `annotate run` does before its first shard."""

from __future__ import annotations

import asyncio
import json

from annotate.config import load_config
from annotate.engines.postprocess import finish
from annotate.executor.doctor import check_stages, describe

from bench.harness import TINY
from test_breaker import _records

GOOD = "A red ceramic mug with a chipped handle stands on a wooden table beside a laptop."


async def healthy(request):
    if request.json_schema is not None:
        text = json.dumps({"reason": "The crop shows a red ceramic mug.", "consistent": True})
    else:
        text = GOOD
    return finish(request.request_id, text, "stop", json_schema=request.json_schema, reasoning_model=False,
                  prompt_tokens=120, completion_tokens=20, latency_s=0.01)


async def cut(request):
    return finish(request.request_id, "A red ceramic mug with a", "length", json_schema=request.json_schema,
                  reasoning_model=False, prompt_tokens=120, completion_tokens=24, latency_s=0.01)


def check(chat):
    cfg = load_config(TINY)
    return asyncio.run(check_stages(cfg, _records(2), {name: chat for name in cfg.models}, {}))


def test_a_healthy_model_passes_every_stage():
    report = check(healthy)
    assert [s.stage for s in report.stages] == ["object", "validate", "context", "merge"]
    assert report.ok, describe(report)
    text = describe(report)
    assert "finish stop, tokens 120 prompt + 20 completion" in text and "all stages answered" in text
    assert "object_caption = " in text


def test_answers_cut_by_max_tokens_fail_it_with_what_to_change():
    report = check(cut)
    assert not report.ok
    object_check = report.stages[0]
    assert any("2 of 2 answers cut by max_tokens" in p and "stages.object.sampling.max_tokens" in p
               for p in object_check.problems)
    assert any("2 of 2 regions failed" in p and "`length`" in p for p in object_check.problems)
    assert "PROBLEM" in describe(report)
