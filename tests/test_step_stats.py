"""The engine-step stats plugin (annotate.engines.step_stats) and its reader, without an engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path
from types import SimpleNamespace

import pytest

from annotate.engines.step_stats import ENV_DIR, StepRecorder, plugin_site, read_steps, summarize

REPO = Path(__file__).resolve().parent.parent


def sched(running: int, waiting: int, skipped: int = 0, kv: float = 0.25):
    return SimpleNamespace(num_running_reqs=running, num_waiting_reqs=waiting, num_skipped_waiting_reqs=skipped,
                           kv_cache_usage=kv)


def iteration(gen: int, prompt: int = 0, started: int = 0, finished: int = 0, preempted: int = 0):
    return SimpleNamespace(num_generation_tokens=gen, prompt_token_stats=SimpleNamespace(total=prompt),
                           time_to_first_tokens_iter=[0.01] * started, finished_requests=[None] * finished,
                           num_preempted_reqs=preempted)


def test_recorder_writes_one_line_per_step(tmp_path):
    rec = StepRecorder(max_num_seqs=4, engine_idx=1, out_dir=str(tmp_path))
    rec.record(sched(2, 3, skipped=1), iteration(2, prompt=40, started=2))
    rec.record(sched(4, 0), iteration(4, prompt=20, started=2, finished=1))
    rec.record(sched(3, 0), None)  # a step that produced no token
    rec.record(None, iteration(9))  # no scheduler stats: not a step
    rec.close()
    assert rec.path == tmp_path / f"steps-{os.getpid()}-1.jsonl"
    steps = read_steps(tmp_path)
    assert [s["step"] for s in steps] == [0, 1, 2]
    first = steps[0]
    assert {k: first[k] for k in ("engine_idx", "pid", "max_num_seqs", "num_running_reqs", "num_waiting_reqs",
                                  "generation_tokens", "prompt_tokens", "started_reqs", "finished_reqs",
                                  "preempted_reqs", "kv_cache_usage")} == {
        "engine_idx": 1, "pid": os.getpid(), "max_num_seqs": 4, "num_running_reqs": 2, "num_waiting_reqs": 4,
        "generation_tokens": 2, "prompt_tokens": 40, "started_reqs": 2, "finished_reqs": 0, "preempted_reqs": 0,
        "kv_cache_usage": 0.25}
    assert [s["generation_tokens"] for s in steps] == [2, 4, 0]
    assert [s["finished_reqs"] for s in steps] == [0, 1, 0]
    assert steps[0]["time"] <= steps[1]["time"] <= steps[2]["time"]


def test_recorder_is_a_noop_without_the_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DIR, raising=False)
    monkeypatch.chdir(tmp_path)
    rec = StepRecorder(max_num_seqs=4)
    assert not rec.enabled and rec.path is None
    rec.record(sched(1, 0), iteration(1))
    assert rec.steps == 0
    assert list(tmp_path.iterdir()) == []


def test_recorder_takes_its_folder_from_the_env_var(tmp_path, monkeypatch):
    out = tmp_path / "steps"
    monkeypatch.setenv(ENV_DIR, str(out))
    rec = StepRecorder(max_num_seqs=8, engine_idx=0)
    rec.record(sched(1, 0), iteration(1, started=1))
    rec.close()
    assert [p.name for p in out.iterdir()] == [f"steps-{os.getpid()}-0.jsonl"]
    assert read_steps(out)[0]["max_num_seqs"] == 8


def test_recorder_turns_itself_off_on_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rec = StepRecorder(max_num_seqs=4, out_dir=str(blocker / "sub"))  # a folder under a file: mkdir fails
    rec.record(sched(1, 0), iteration(1))  # must not raise (it would fail every request in flight)
    assert not rec.enabled and rec.steps == 0


def test_read_steps_merges_files_by_time_and_skips_a_cut_line(tmp_path):
    a = [{"time": 1.0, "step": 0, "generation_tokens": 1}, {"time": 3.0, "step": 1, "generation_tokens": 1}]
    b = [{"time": 2.0, "step": 0, "generation_tokens": 5}]
    (tmp_path / "steps-1-0.jsonl").write_text("".join(json.dumps(s) + "\n" for s in a) + '{"time": 4.0, "ste')
    (tmp_path / "steps-2-0.jsonl").write_text("".join(json.dumps(s) + "\n" for s in b))
    (tmp_path / "other.jsonl").write_text(json.dumps({"time": 0.0}) + "\n")
    assert [s["time"] for s in read_steps(tmp_path)] == [1.0, 2.0, 3.0]


def _step(t, running, waiting, gen, started=0, m=4):
    return {"time": t, "num_running_reqs": running, "num_waiting_reqs": waiting, "generation_tokens": gen,
            "prompt_tokens": 0, "started_reqs": started, "finished_reqs": 0, "max_num_seqs": m}


def test_summarize_occupancy_starvation_and_window():
    steps = [
        _step(0, 4, 2, 4, started=4),  # full, requests waiting
        _step(1, 2, 0, 4),             # starved: nothing waiting, 2 of 4 running, 2 requests still to come
        _step(2, 3, 0, 3, started=1),  # starved
        _step(3, 4, 0, 4, started=1),  # the 6th (last) request starts here: not counted
        _step(4, 1, 0, 2),             # the tail: not starvation
        _step(5, 0, 0, 1),
    ]
    s = summarize(steps, n_requests=6)
    assert s["steps"] == 6 and s["generation_tokens"] == 18
    assert s["occupancy"] == pytest.approx(18 / (4 * 6))
    assert s["full_steps"] == 3
    assert s["last_admission_step"] == 3
    assert s["starved_steps"] == 2
    assert s["started_reqs"] == 6 and s["seconds"] == 5
    # an explicit max_num_seqs overrides the steps' own
    assert summarize(steps, max_num_seqs=8)["occupancy"] == pytest.approx(18 / (8 * 6))
    # a window: steps 1..3 only; 2 requests start in it, so with n=2 the last admission is its 3rd step
    w = summarize(steps, t0=1, t1=3, n_requests=2)
    assert w["steps"] == 3 and w["generation_tokens"] == 11 and w["last_admission_step"] == 2
    assert w["starved_steps"] == 2
    # not every request started in the window: every step counts as "more to come"
    assert summarize(steps, n_requests=7)["starved_steps"] == 4
    assert summarize(steps)["starved_steps"] is None
    empty = summarize([], n_requests=1)
    assert (empty["steps"], empty["occupancy"], empty["starved_steps"]) == (0, 0.0, 0)


# ------------------------------------------------------------------------- against vLLM's own classes
def test_vllm_logger_records_real_stats(tmp_path, monkeypatch):
    loggers = pytest.importorskip("vllm.v1.metrics.loggers")  # importing vLLM takes 10-20 s on a small CPU
    from vllm.v1.metrics.stats import IterationStats, SchedulerStats

    from annotate.engines import step_stats

    cls = step_stats.StepStatsLogger
    assert issubclass(cls, loggers.StatLoggerBase)
    # what the entry point resolves to (by getattr on the module: vLLM is imported only then)
    ep = EntryPoint("longgrit_steps", "annotate.engines.step_stats:StepStatsLogger", "vllm.stat_logger_plugins")
    assert ep.load() is cls
    assert cls.__module__ == "annotate.engines.step_stats" and cls.__qualname__ == "StepStatsLogger"
    # vLLM's plugin loader accepts it (it refuses anything that is not a StatLoggerBase subclass)
    monkeypatch.setattr(loggers, "load_plugins_by_group", lambda group: {"longgrit_steps": cls})
    assert loggers.load_stat_logger_plugin_factories() == [cls]

    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=32))
    # as vLLM's StatLoggerManager wraps a per-engine logger
    adapter = loggers.PerEngineStatLoggerAdapter(config, [0], cls)
    it = IterationStats()
    it.num_generation_tokens = 7
    it.prompt_token_stats.total = 300
    it.time_to_first_tokens_iter = [0.1, 0.2]
    adapter.record(SchedulerStats(num_running_reqs=7, num_waiting_reqs=3, num_skipped_waiting_reqs=1), it)
    adapter.record(SchedulerStats(num_running_reqs=6, num_waiting_reqs=0), None, engine_idx=0)
    adapter.log_engine_initialized()
    adapter.per_engine_stat_loggers[0].recorder.close()
    steps = read_steps(tmp_path)
    assert [(s["num_running_reqs"], s["num_waiting_reqs"], s["generation_tokens"], s["prompt_tokens"],
             s["started_reqs"], s["max_num_seqs"]) for s in steps] == [(7, 4, 7, 300, 2, 32), (6, 0, 0, 0, 0, 32)]

    monkeypatch.delenv(ENV_DIR)
    quiet = cls(config, 0)
    quiet.record(SchedulerStats(num_running_reqs=1), it)
    assert quiet.recorder.steps == 0 and len(list(tmp_path.iterdir())) == 1


def test_plugin_only_where_the_benchmark_puts_it(tmp_path):
    """The project declares no vLLM plugin (production engines never load the logger); the folder
    `plugin_site` writes offers it, as vLLM's loader finds entry points, once it is on the path."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "vllm.stat_logger_plugins" not in project.get("entry-points", {})
    site = plugin_site(tmp_path / "site")
    code = ("from importlib.metadata import entry_points; "
            "print([e.value for e in entry_points(group='vllm.stat_logger_plugins') if e.name == 'longgrit_steps'])")
    without = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    with_site = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONPATH": str(site)})
    assert without.stdout.strip() == "[]"
    assert with_site.stdout.strip() == "['annotate.engines.step_stats:StepStatsLogger']"
