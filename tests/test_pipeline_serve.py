"""The chain runs through Ray Serve: the models are Serve replicas (checked through Serve's status and
Ray's state API), one deployment serves two stages, and a model replica whose engine process is
SIGKILLed mid-run is replaced while the run finishes with every input region exactly once."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import ray

from bench.harness import copy_sample_shards, tiny_variant
from test_pipeline_crash import ONE_SHARD_AT_A_TIME
from bench.harness import input_region_ids, output_regions

pytestmark = pytest.mark.slow


def test_models_ran_as_serve_replicas_and_one_serves_two_stages(tiny_run_all, tiny_config):
    from ray import serve
    from ray.util.state import list_actors

    from annotate.serving.apps import model_app

    out, summary = tiny_run_all
    apps = {name: model_app(name, model) for name, model in tiny_config.models.items()}
    status = serve.status().applications
    for name, app in apps.items():
        assert status[app.app_name].status == "RUNNING", (name, status.get(app.app_name))
        deployment = status[app.app_name].deployments[app.deployment_name]
        assert deployment.replica_states.get("RUNNING") == 1, deployment
    replicas = {r["model"]: r for r in summary.replicas}
    assert set(replicas) == {"vlm", "llm"}  # two deployments for four stages
    alive = {a.pid: a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)}
    for name, replica in replicas.items():
        assert alive.get(replica["pid"], "").startswith(f"ServeReplica:{apps[name].app_name}"), (name, replica)
        # One vLLM process per replica: the engine core, running its one CPU worker itself
        # (llm_server._engine_with_in_process_worker), not a third process importing vLLM again.
        assert len(engine_processes(replica["pid"])) == 1, [p.cmdline() for p in engine_processes(replica["pid"])]
    # object and context both ran on the `vlm` deployment, validate and merge on `llm`.
    stages_by_model = {}
    for region in output_regions(out):
        if region["status"] == "ok":
            for stage in ("object", "validate", "context", "merge"):
                stages_by_model.setdefault(region["provenance"][stage]["model"], set()).add(stage)
    assert stages_by_model == {tiny_config.models["vlm"].path: {"object", "context"},
                               tiny_config.models["llm"].path: {"validate", "merge"}}


def engine_processes(replica_pid: int) -> list[psutil.Process]:
    """vLLM's engine core runs in a child process of the Serve replica (VLLM::EngineCore)."""
    return [p for p in psutil.Process(replica_pid).children(recursive=True) if p.name().startswith("VLLM")]


@pytest.mark.timeout(1800)
def test_engine_process_killed_mid_run_loses_nothing(tiny_run_all, tiny_config, tmp_path):
    """SIGKILL the `llm` replica's engine core while the run uses it; Serve replaces the replica, the
    chain workers send the lost requests again, and every region ends exactly once."""
    from annotate.config import load_config
    from annotate.executor.runner import run_pipeline
    from annotate.serving.apps import model_app, replica_info

    shards = copy_sample_shards(tmp_path / "in", 4)
    # Shards one after another in small batches (no model setting changes: the session's deployments
    # serve this run), so that three shards still need the model when the first one is written.
    config = load_config(tiny_variant(tmp_path / "one-shard-at-a-time.yaml", ONE_SHARD_AT_A_TIME))
    app = model_app("llm", config.models["llm"])
    assert app.app_name == model_app("llm", tiny_config.models["llm"]).app_name  # the session's deployment
    (before,) = [r for r in replica_info({"llm": app})]
    engines = engine_processes(before["pid"])
    assert engines, "no vLLM engine process under the replica"

    out = tmp_path / "out"
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = run_pipeline(config, shards, out, [0, 1, 2, 3], stage="all")
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    # Kill once the engine is busy with this run (its CPU time has grown), while most work remains.
    cpu_at_start = sum(p.cpu_times().user + p.cpu_times().system for p in engines)
    deadline = time.monotonic() + 900
    while sum(p.cpu_times().user + p.cpu_times().system for p in engines) < cpu_at_start + 2.0:
        assert thread.is_alive(), result
        assert time.monotonic() < deadline, "the llm engine never got busy"
        time.sleep(0.1)
    for proc in engines:
        os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(timeout=1500)
    assert not thread.is_alive(), "the run did not finish after the engine was killed"
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert sorted(summary.shards_written) == ["00000", "00001", "00002", "00003"]
    finished_after_kill = time.monotonic() - killed_at

    seen = Counter(r["region_id"] for r in output_regions(out))
    assert seen == input_region_ids(shards, [0, 1, 2, 3])  # every region exactly once
    regions = output_regions(out)
    assert not [r for r in regions if "unavailable" in (r["error"] or "")], "a region was failed for the dead replica"
    assert Counter(r["status"] for r in regions)["ok"] > 0
    (after,) = replica_info({"llm": app})
    assert after["replica"] != before["replica"] and after["pid"] != before["pid"], "the replica was not replaced"
    # The run still needed the model after the kill: the new replica answered some of its requests
    # (Serve's access log lines, "CALL <method> OK", in the replica's worker log).
    assert config.models["llm"].serving.access_log, "this check reads Serve's access log"
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    served_by_new = sum(len(re.findall(r"CALL chat\w* OK", path.read_text()))
                        for path in logs.glob(f"worker-*-{after['pid']}.err"))
    assert served_by_new > 0, "the kill came after the run's last request to the model"
    print(f"run finished {finished_after_kill:.0f} s after the engine was killed")
