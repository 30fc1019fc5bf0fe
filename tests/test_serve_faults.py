"""Issue 22 on real Serve deployments (no stand-ins): a replica that never answers, a replica that meets a
CUDA error, and a deployment that fails to start. The tiny pipeline runs on the `hf` engine (so no vLLM
start); the faulty replicas (`faulty_replicas.py`) are `servers.ChatServer` with the real tiny model,
deployed under the application name `annotate run` uses for the VLM, which the run then finds RUNNING.
The tests share the LLM's deployment and delete every application of this module at its end."""

from __future__ import annotations

from collections import Counter

import pytest

from annotate.config import load_config

from bench.harness import SAMPLE_SHARDS, TINY, input_region_ids, output_regions
from faulty_replicas import DeviceErrorChatServer, HangingChatServer, deploy_as

pytestmark = pytest.mark.slow

HF = {"engine": "hf", "hf": {"dtype": "float32", "device": "cpu", "batch_size": 8}}
SHARDS = [0, 1]


def config(**stages):
    return load_config(TINY, {"models": {"vlm": HF, "llm": HF}, "stages": stages})


@pytest.fixture(scope="module")
def hf_session(ray_session):
    """Every application this module deploys is removed after it: later tests keep their CPUs."""
    yield
    from annotate.serving.apps import stop_apps

    stop_apps(dict(config().models))


@pytest.fixture
def own_vlm(hf_session):
    """The VLM application is this test's (a faulty replica): deleted after it."""
    yield
    from annotate.serving.apps import stop_apps

    stop_apps({"vlm": config().models["vlm"]})


def test_a_replica_that_never_answers_ends_at_its_deadline_with_every_region_accounted_for(own_vlm, tmp_path):
    from annotate.executor.runner import run_pipeline

    cfg = config(object={"deadline_s": 3.0})
    deploy_as("vlm", cfg.models["vlm"], cfg.run, HangingChatServer)
    summary = run_pipeline(cfg, SAMPLE_SHARDS, tmp_path, SHARDS, stage="all")

    assert sorted(summary.shards_written) == ["00000", "00001"]  # the run ended, and committed its shards
    regions = output_regions(tmp_path)
    assert Counter(r["region_id"] for r in regions) == input_region_ids(SAMPLE_SHARDS, SHARDS)  # each once
    asked = [r for r in regions if r["status"] != "ok" and "timeout" in (r["error"] or "")]
    # every region the hung replica was asked about failed as a timeout, none with a late answer
    assert asked and all(r["status"] == "failed" and r["object_caption"] is None for r in asked)
    assert all("no answer within 3 s" in r["error"] for r in asked), asked[0]["error"]
    assert not [r for r in regions if r["status"] == "ok"]  # nothing was answered
    # counted once per region, not once per attempt
    assert summary.failures["object"]["timeout"] == len(asked)
    assert summary.model_calls["object"]["model_calls"] == len(asked) * cfg.stages["object"].max_attempts


def test_a_replica_with_a_device_error_is_replaced_and_the_run_finishes(own_vlm, tmp_path):
    from annotate.executor.runner import run_pipeline

    cfg = config()
    starts = tmp_path / "replica-starts"
    # Serve's health check every 2 s (the production deployments: 10 s), so the replacement comes quickly.
    deploy_as("vlm", cfg.models["vlm"], cfg.run, DeviceErrorChatServer, str(starts), health_check_period_s=2)
    summary = run_pipeline(cfg, SAMPLE_SHARDS, tmp_path / "out", SHARDS, stage="all")

    assert sorted(summary.shards_written) == ["00000", "00001"]
    started = sorted(p.name for p in starts.iterdir())
    assert len(started) >= 2 and started[0].endswith("-broken"), started  # Serve replaced the broken replica
    broken_pid = int(started[0].split("-")[1])
    from annotate.serving.apps import model_app, replica_info

    assert broken_pid in [r["pid"] for r in summary.replicas if r["model"] == "vlm"]  # the one the run started on
    live = [r["pid"] for r in replica_info({"vlm": model_app("vlm", cfg.models["vlm"])})]
    assert live and broken_pid not in live  # ... is gone, and a replacement serves
    regions = output_regions(tmp_path / "out")
    assert Counter(r["region_id"] for r in regions) == input_region_ids(SAMPLE_SHARDS, SHARDS)
    # the requests the broken replica refused were sent again, never failed for it
    for r in regions:
        assert not any(s in (r["error"] or "") for s in ("CUDA", "engine_dead", "EngineDeadError")), r["error"]
    assert summary.model_calls["object"]["model_calls"] >= sum(1 for r in regions if r["object_caption"] is not None)


def test_a_deployment_that_fails_to_start_leaves_no_application_of_this_command(hf_session, tmp_path):
    from annotate.serving.apps import ensure_apps, model_app, running_apps, stop_apps

    cfg = config()
    llm, vlm = cfg.models["llm"], cfg.models["vlm"]
    broken = llm.model_copy(update={"path": str(tmp_path / "no-such-model")})
    ensure_apps({"llm": llm}, cfg.run)  # found running by the next call: not this command's to remove
    names = {n: model_app(n, m).app_name for n, m in {"llm": llm, "vlm": vlm, "broken": broken}.items()}
    stop_apps({"vlm": vlm})
    with pytest.raises(RuntimeError) as err:
        ensure_apps({"llm": llm, "vlm": vlm, "broken": broken}, cfg.run, timeout_s=600)
    message = str(err.value)
    assert "'broken' failed to deploy" in message, message
    assert "Removed the application(s) this command deployed" in message and names["vlm"] in message
    running = running_apps()
    assert running.get(names["llm"]) == "RUNNING"  # the one it found running is left alone
    assert names["vlm"] not in running and names["broken"] not in running  # what it deployed is gone
