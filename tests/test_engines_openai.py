"""OpenAIEngine against a fault-injecting local server, and against a real vLLM server."""

from __future__ import annotations

import logging
import time

import pytest
from PIL import Image

from annotate.config import ModelConfig, OpenAIArgs, SamplingConfig
from annotate.engines.base import ChatRequest
from annotate.engines.openai_engine import OpenAIEngine

SECRET = "sk-test-DO-NOT-LEAK-0123456789"
KEY_ENV = "LONGGRIT_TEST_API_KEY"


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def engine_for(server, scenario: str, **openai) -> OpenAIEngine:
    args = dict(base_url=server.url(scenario), api_key_env=KEY_ENV, max_retries=3, timeout_s=5.0,
                backoff_initial_s=0.01, backoff_max_s=0.05, max_in_flight=4)
    args.update(openai)
    return OpenAIEngine(ModelConfig(engine="openai", path="served-model", openai=OpenAIArgs(**args)))


def req(rid: str = "r", **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
                       request_id=rid, **kw)


@pytest.fixture(autouse=True)
def _reset(request):
    if "fault_server" in request.fixturenames:
        request.getfixturevalue("fault_server").reset()


def test_ok_body_and_auth(fault_server, api_key):
    img = Image.new("RGB", (16, 16), (0, 128, 255))
    request = ChatRequest(
        messages=[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "hi"}]}],
        sampling=SamplingConfig(max_tokens=32, min_tokens=3, seed=7, stop=["\n"]),
        request_id="x",
    )
    (r,) = engine_for(fault_server, "ok").chat([request])
    assert r.ok and r.text == "a red car on the road" and r.prompt_tokens == 7 and r.completion_tokens == 5
    assert r.latency_s > 0 and r.finish_reason == "stop"
    body = fault_server.bodies[0]
    assert body["model"] == "served-model" and body["max_tokens"] == 32 and body["seed"] == 7
    assert body["min_tokens"] == 3 and "ignore_eos" not in body and body["stop"] == ["\n"]
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert fault_server.auth_headers == [f"Bearer {SECRET}"]


def test_json_schema_response_format(fault_server, api_key):
    schema = {"title": "Verdict check", "type": "object",
              "properties": {"consistent": {"type": "boolean"}, "reason": {"type": "string"}},
              "required": ["consistent", "reason"]}
    (r,) = engine_for(fault_server, "json").chat([req(json_schema=schema)])
    assert r.ok and r.parsed == {"consistent": True, "reason": "matches"}
    fmt = fault_server.bodies[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == schema and fmt["json_schema"]["name"] == "Verdict_check"


def test_length_finish(fault_server, api_key):
    (r,) = engine_for(fault_server, "length").chat([req()])
    assert r.error_kind == "length"


def test_5xx_retried_then_gives_up(fault_server, api_key):
    (r,) = engine_for(fault_server, "e500", max_retries=3).chat([req()])
    assert r.error_kind == "http" and "500" in r.error and r.retryable
    assert fault_server.counts["e500"] == 4


def test_transient_5xx_recovers(fault_server, api_key):
    (r,) = engine_for(fault_server, "flaky", max_retries=3).chat([req()])
    assert r.ok and fault_server.counts["flaky"] == 3


def test_429_retried(fault_server, api_key):
    (r,) = engine_for(fault_server, "e429", max_retries=2).chat([req()])
    assert r.error_kind == "http" and "429" in r.error
    assert fault_server.counts["e429"] == 3


@pytest.mark.parametrize("scenario,kind", [("e400", "invalid_input"), ("e404", "rejected")])
def test_other_4xx_not_retried(fault_server, api_key, scenario, kind):
    (r,) = engine_for(fault_server, scenario, max_retries=3).chat([req()])
    assert r.error_kind == kind and not r.retryable
    assert fault_server.counts[scenario] == 1


@pytest.mark.timeout(60)
def test_timeout_retried_and_bounded(fault_server, api_key):
    started = time.monotonic()
    (r,) = engine_for(fault_server, "slow", timeout_s=0.3, max_retries=2).chat([req()])
    assert r.error_kind == "timeout" and r.retryable
    assert fault_server.counts["slow"] == 3
    assert time.monotonic() - started < 4  # 3 x 0.3 s plus short backoffs


def test_connection_reset_retried(fault_server, api_key):
    (r,) = engine_for(fault_server, "reset", max_retries=2).chat([req()])
    assert r.error_kind == "http" and fault_server.counts["reset"] == 3


@pytest.mark.parametrize("scenario", ["malformed", "nochoices"])
def test_malformed_body_is_an_error_result(fault_server, api_key, scenario):
    results = engine_for(fault_server, scenario).chat([req("a"), req("b")])
    assert [r.error_kind for r in results] == ["http", "http"]
    assert all("malformed" in r.error for r in results)


def test_in_flight_limit(fault_server, api_key):
    fault_server.delay_s = 0.2
    try:
        results = engine_for(fault_server, "ok", max_in_flight=3).chat([req(str(i)) for i in range(12)])
    finally:
        fault_server.delay_s = 0.05
    assert [r.request_id for r in results] == [str(i) for i in range(12)] and all(r.ok for r in results)
    assert fault_server.max_in_flight["ok"] == 3


def test_bad_messages_fail_alone(fault_server, api_key):
    bad = ChatRequest(messages=[{"role": "user", "content": [{"type": "audio"}]}], request_id="bad")
    results = engine_for(fault_server, "ok").chat([req("good"), bad])
    assert results[0].ok and results[1].error_kind == "invalid_input"
    assert fault_server.counts["ok"] == 1


def test_api_key_never_leaks(fault_server, api_key, caplog):
    caplog.set_level(logging.DEBUG)
    engine = engine_for(fault_server, "e500", max_retries=1)
    results = engine.chat([req()])
    results += engine_for(fault_server, "e404").chat([req()])
    results += engine_for(fault_server, "malformed").chat([req()])
    results += engine_for(fault_server, "slow", timeout_s=0.2, max_retries=0).chat([req()])
    assert all(not r.ok for r in results)
    texts = [repr(engine), str(engine), str(vars(engine)), caplog.text] + [repr(r) for r in results]
    assert not any(SECRET in t for t in texts)
    assert all(h == f"Bearer {SECRET}" for h in fault_server.auth_headers)


def test_missing_key_env_is_an_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=KEY_ENV):
        OpenAIEngine(ModelConfig(engine="openai", path="m", openai=OpenAIArgs(api_key_env=KEY_ENV)))


def test_connection_refused_is_an_error_result():
    from fixtures_engines import free_port

    args = OpenAIArgs(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1, backoff_initial_s=0.01,
                      backoff_max_s=0.02, timeout_s=2)
    (r,) = OpenAIEngine(ModelConfig(engine="openai", path="m", openai=args)).chat([req()])
    assert r.error_kind == "http"


# ------------------------------------------------------------------------- real vLLM server
@pytest.mark.slow
def test_real_vllm_server(openai_server_url):
    from fixtures_engines import OPENAI_SERVED_NAME

    engine = OpenAIEngine(ModelConfig(engine="openai", path=OPENAI_SERVED_NAME,
                                      openai=OpenAIArgs(base_url=openai_server_url, timeout_s=60, max_retries=1)))
    schema = {"type": "object",
              "properties": {"consistent": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 24}},
              "required": ["consistent", "reason"], "additionalProperties": False}
    plain = [req(f"p{i}", sampling=SamplingConfig(max_tokens=16, min_tokens=4, seed=i)) for i in range(3)]
    structured = req("json", sampling=SamplingConfig(max_tokens=64), json_schema=schema)
    cut = req("cut", sampling=SamplingConfig(max_tokens=6, ignore_eos=True))
    too_long = ChatRequest(messages=[{"role": "user", "content": "red car " * 1500}], request_id="long")
    results = engine.chat(plain + [structured, cut, too_long])
    by_id = {r.request_id: r for r in results}
    for i in range(3):
        r = by_id[f"p{i}"]
        assert (r.ok or r.error_kind == "length") and r.text and r.completion_tokens >= 4 and r.prompt_tokens > 0
    assert by_id["json"].ok, by_id["json"].error
    assert set(by_id["json"].parsed) == {"consistent", "reason"}
    assert by_id["cut"].error_kind == "length" and by_id["cut"].completion_tokens == 6
    assert by_id["long"].error_kind == "invalid_input", by_id["long"].error
