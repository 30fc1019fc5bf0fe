"""A deadline per request (issue 22): `ModelClient.chat` cancels a send past the stage's deadline and
returns one retryable `timeout`; the stage asks again at the cost of an attempt, and the late answer is
never read. The deployment handle is a stand-in (`FakeHandle`: `.chat.remote(...)` /
`.chat_payload.remote(...)` return an awaitable with `cancel()`, as Serve's `DeploymentResponse`), so
no Ray cluster or Serve runs here; the deadline's default comes from the stage's `max_tokens`."""

from __future__ import annotations

import asyncio
import logging

import pytest

from annotate.config import DEADLINE_PER_TOKEN_S, DEADLINE_START_S, StageConfig, load_config
from annotate.engines.base import ChatRequest, ChatResult
from annotate.serving.apps import ModelApp
from annotate.serving.client import REPORT_TIMEOUTS_AFTER, ModelClient

from bench.harness import TINY_FIELDS


class FakeResponse:
    """Stands in for a Serve `DeploymentResponse`: awaitable once, `cancel()` recorded."""

    def __init__(self, answer, delay: float | None):
        self.answer, self.delay, self.cancelled, self.read = answer, delay, False, False

    async def _wait(self):
        await asyncio.sleep(3600 if self.delay is None else self.delay)  # None: a hung replica
        self.read = True
        return self.answer

    def __await__(self):
        return self._wait().__await__()

    def cancel(self):
        self.cancelled = True


class FakeMethod:
    def __init__(self, script):
        self.script, self.sent = script, []

    def remote(self, payload):
        answer, delay = self.script.pop(0)
        response = FakeResponse(answer(payload) if callable(answer) else answer, delay)
        self.sent.append(response)
        return response


class FakeHandle:
    """Stands in for a Serve deployment handle: a scripted list of (answer, delay) per method."""

    def __init__(self, chat=(), chat_payload=()):
        self.chat = FakeMethod(list(chat))
        self.chat_payload = FakeMethod(list(chat_payload))


def app(kind: str = "hf") -> ModelApp:
    return ModelApp(model_name="m", app_name="longgrit-m-0", deployment_name="m-hf", kind=kind, max_in_flight=4,
                    unavailable_timeout_s=5, model_id="m")


def answer(request: ChatRequest) -> ChatResult:
    return ChatResult(request_id=request.request_id, text="a red mug", finish_reason="stop", completion_tokens=3)


def request(i: int = 0) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "describe"}], request_id=f"s:img:{i}")


def test_a_hung_request_is_cancelled_and_returns_one_retryable_timeout():
    handle = FakeHandle(chat=[(answer, None)])
    client = ModelClient(app(), reasoning=False, max_in_flight=4, deadline_s=0.2, handle=handle)
    result = asyncio.run(client.chat(request()))
    assert result.error_kind == "timeout" and result.retryable and not result.ok
    assert "0 s" not in result.error and "deadline_s" in result.error
    assert len(handle.chat.sent) == 1 and handle.chat.sent[0].cancelled  # sent once, cancelled, not resent
    assert client.timeouts == 1 and client.resent == 0


def test_an_answer_within_the_deadline_is_returned_as_is():
    handle = FakeHandle(chat=[(answer, 0.01)])
    client = ModelClient(app(), reasoning=False, max_in_flight=4, deadline_s=5, handle=handle)
    result = asyncio.run(client.chat(request()))
    assert result.ok and result.text == "a red mug" and not handle.chat.sent[0].cancelled and client.timeouts == 0


def test_the_vllm_path_has_the_deadline_too():
    summary = {"text": "a red mug", "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 3}
    handle = FakeHandle(chat_payload=[(summary, None), (summary, 0.01)])
    client = ModelClient(app("llm"), reasoning=False, max_in_flight=4, deadline_s=0.2, handle=handle)
    first, second = asyncio.run(_both(client))
    assert first.error_kind == "timeout" and handle.chat_payload.sent[0].cancelled
    assert second.ok and second.text == "a red mug"


async def _both(client):
    return await client.chat(request(0)), await client.chat(request(1))


def test_the_stage_retries_a_timeout_once_and_takes_one_answer(caplog):
    """Through the stage's own retry loop: the first send hangs, the second answers; the region is
    answered once, the timeout counted once, and the hung response's late answer is never read."""
    from annotate.config import CropConfig
    from annotate.stages.batch import run_stage_async
    from annotate.stages.chain import build_stage

    from test_breaker import _records

    cfg = load_config(TINY_FIELDS)
    stage = build_stage("object", cfg.stages["object"], "scripted")
    handle = FakeHandle(chat=[(answer, None), (answer, 0.01)])
    client = ModelClient(app(), reasoning=False, max_in_flight=4, deadline_s=0.2, handle=handle)
    items = _records(1)
    counts = asyncio.run(run_stage_async(stage, items, client.chat, CropConfig(max_side=64), max_attempts=2))
    region = items[0][0].regions[0]
    assert counts.timeouts == 1 and counts.retried == 1 and counts.done == 1 and counts.failed == 0
    assert region.object_caption and region.status != "failed"
    assert len(handle.chat.sent) == 2 and handle.chat.sent[0].cancelled and not handle.chat.sent[0].read


def test_a_stage_whose_every_send_hangs_fails_its_regions_as_timeouts():
    from annotate.config import CropConfig
    from annotate.stages.batch import run_stage_async
    from annotate.stages.chain import build_stage

    from test_breaker import _records

    cfg = load_config(TINY_FIELDS)
    stage = build_stage("object", cfg.stages["object"], "scripted")
    handle = FakeHandle(chat=[(answer, None)] * 6)
    client = ModelClient(app(), reasoning=False, max_in_flight=8, deadline_s=0.1, handle=handle)
    items = _records(3)
    counts = asyncio.run(run_stage_async(stage, items, client.chat, CropConfig(max_side=64), max_attempts=2))
    assert counts.failed == 3 and counts.failures_by_kind == {"timeout": 3} and counts.timeouts == 6
    assert all(r.error.startswith("object: timeout:") for rec, _ in items for r in rec.regions)


def test_a_model_that_keeps_timing_out_is_reported(caplog):
    handle = FakeHandle(chat=[(answer, None)] * REPORT_TIMEOUTS_AFTER + [(answer, 0.0)])
    client = ModelClient(app(), reasoning=False, max_in_flight=8, deadline_s=0.05, handle=handle)

    async def sends():
        for i in range(REPORT_TIMEOUTS_AFTER + 1):
            await client.chat(request(i))

    with caplog.at_level(logging.WARNING, logger="annotate.serving.client"):
        asyncio.run(sends())
    warnings = [r.getMessage() for r in caplog.records if "in a row got no answer" in r.getMessage()]
    assert len(warnings) == 1 and "longgrit-m-0" in warnings[0]
    assert client.timeouts == REPORT_TIMEOUTS_AFTER and client.timeouts_in_a_row == 0  # the answer reset it


def test_the_default_deadline_follows_max_tokens_and_changes_no_record():
    from annotate.data.store import config_fingerprint

    stage = StageConfig(model="m", prompt="p", sampling={"max_tokens": 256})
    assert stage.request_deadline_s() == DEADLINE_START_S + DEADLINE_PER_TOKEN_S * 256 == 248
    assert StageConfig(model="m", prompt="p", deadline_s=30).request_deadline_s() == 30
    with pytest.raises(ValueError):
        StageConfig(model="m", prompt="p", deadline_s=0)
    cfg = load_config(TINY_FIELDS)
    faster = cfg.model_copy(deep=True)
    faster.stages["object"].deadline_s = 5.0
    assert config_fingerprint(faster) == config_fingerprint(cfg)
