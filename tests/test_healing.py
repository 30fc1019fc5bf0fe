"""Replicas that heal (issue 22): a transformers replica (`servers.ChatServer`) that meets an
unrecoverable device error (CUDA error, out of memory) marks itself unhealthy, so `check_health` raises
and Serve replaces it, and answers that request and every later one `engine_dead`; the client sends
them again as for a dead vLLM engine, without spending an attempt. Unit tests: the ChatServer runs with a
stub engine and outside Serve, the client with a stand-in handle (tests/test_deadline.py `FakeHandle`);
the hf engine with its generate call replaced by one that raises. No GPU, no Ray cluster."""

from __future__ import annotations

import asyncio

import pytest

from annotate.engines.base import ChatRequest, ChatResult, EngineDeadError
from annotate.engines.postprocess import error_result
from annotate.serving.client import ModelClient
from annotate.serving.servers import ChatServer

from test_deadline import FakeHandle, answer, app, request

CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


class StubEngine:
    """Answers until told to fail; counts its calls."""

    model_id = "stub"
    model = object()  # loaded

    def __init__(self, fail=None, result_error=None):
        self.fail, self.result_error, self.calls = fail, result_error, 0

    def chat(self, requests):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        if self.result_error is not None:
            return [error_result(r.request_id, "internal", self.result_error) for r in requests]
        return [ChatResult(request_id=r.request_id, text="a mug", finish_reason="stop") for r in requests]


def server(engine) -> ChatServer:
    s = object.__new__(ChatServer)  # no model loaded: the stub stands in for the engine
    s.engine, s.broken = engine, None
    return s


def reqs(n=2):
    return [ChatRequest(messages=[{"role": "user", "content": "x"}], request_id=f"r{i}") for i in range(n)]


@pytest.mark.parametrize("engine", [
    StubEngine(fail=RuntimeError(CUDA_ERROR)),
    StubEngine(fail=EngineDeadError("stub: device error: OutOfMemoryError: CUDA out of memory")),
    StubEngine(result_error=f"RuntimeError: {CUDA_ERROR}"),  # an engine that swallowed it into a result
])
def test_a_device_error_marks_the_replica_unhealthy_and_answers_engine_dead(engine):
    s = server(engine)
    s.check_health()  # healthy before
    results = asyncio.run(s.answer(reqs()))
    assert [r.error_kind for r in results] == ["engine_dead", "engine_dead"]
    assert all("EngineDeadError" in r.error for r in results)  # what the client resends on
    with pytest.raises(EngineDeadError, match="device error"):
        s.check_health()  # Serve replaces the replica
    later = asyncio.run(s.answer(reqs(1)))
    assert later[0].error_kind == "engine_dead" and engine.calls == 1  # the broken device is not used again


def test_other_errors_leave_the_replica_healthy():
    s = server(StubEngine(result_error="ValueError: image too small"))
    assert asyncio.run(s.answer(reqs(1)))[0].error_kind == "internal"
    s.check_health()
    s = server(StubEngine(fail=KeyError("bug")))
    with pytest.raises(KeyError):
        asyncio.run(s.answer(reqs(1)))
    s.check_health()
    assert server(StubEngine()).check_health() is None


def test_the_client_sends_a_request_again_when_its_replica_is_broken():
    dead = lambda r: error_result(r.request_id, "engine_dead", "EngineDeadError: replica unhealthy after a device error")
    handle = FakeHandle(chat=[(dead, 0.0), (answer, 0.0)])
    client = ModelClient(app(), reasoning=False, max_in_flight=4, deadline_s=5, handle=handle)
    result = asyncio.run(client.chat(request()))
    assert result.ok and result.text == "a red mug" and client.resent == 1 and len(handle.chat.sent) == 2


def test_the_hf_engine_lets_a_device_error_through():
    torch = pytest.importorskip("torch")
    from annotate.config import SamplingConfig
    from annotate.engines.hf_engine import HfEngine

    engine = object.__new__(HfEngine)
    engine.model_id = "tiny"

    def oom(sampling, chunk):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine._generate = oom
    requests = [ChatRequest(messages=[], sampling=SamplingConfig(), request_id=f"r{i}") for i in range(2)]
    with pytest.raises(EngineDeadError, match="OutOfMemoryError"):
        engine._run(requests, [(0, [], []), (1, [], [])])

    def bad_input(sampling, chunk):
        raise ValueError("image too small")

    engine._generate = bad_input  # an ordinary error still fails its own request only
    results = engine._run(requests, [(0, [], []), (1, [], [])])
    assert [r.error_kind for _, r in results] == ["invalid_input", "invalid_input"]

