"""Figure 3, pipeline overhead: `run_pipeline(--stage all)` on the tiny models vs the same requests
sent straight to the same kind of vLLM engines in one process.

Both sides start from the same stored `prepare` output (the data plane is run once, beforehand, and
copied into each pipeline output folder so the run skips it), and both end with the final Parquet
files written:

* pipeline: `run_pipeline(cfg, ..., stage="all")`, timed by `RunSummary.processing_s` (from every
  model deployment ready to the end of the run: no Ray start, no model load). The first call deploys
  the models on Serve; later calls find them running and reuse them.
* direct: `build_engine` for both models of the pipeline file in this process, then
  `stages.chain.run_chain`, the chain workers' own function, over the stored records with
  `direct_links` (each stage in chain order, in its batch size, against `engine.chat`, images decoded
  once), then `finalize_record` and the store's `ShardWriter`. Time inside `engine.chat` is reported
  separately (the models' own time).

An untimed warm-up (one shard through each side) loads the deployments and first-call costs. Then
rounds alternate pipeline, direct, pipeline, direct... into fresh output folders; the ratio is
median(pipeline) / median(direct) of wall time. CPU seconds are also kept: the direct process's, and
the pipeline's whole process tree (driver, GCS, raylet, dashboard, workers, engine actors), which
does not depend on what other tenants of a shared machine run. Ray starts its workers at niceness 15;
`--worker-niceness 0` (the default here) starts them at 0 like the direct side, so that on a shared
machine both sides compete for the CPU on equal terms (-1 keeps Ray's default). Completion tokens of both sides are reported: with temperature
0 and fixed seeds they should match, which shows that both sides did the same generation work.

    python -m bench.pipeline_overhead [--shards N] [--rounds R] [--small] [--json FILE]
"""

from __future__ import annotations

import asyncio

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IDLE_S = 10.0  # the idle cluster's CPU is sampled this long, between the warm-up and the rounds


class TreeCpu:
    """CPU seconds (user + system) used by this process and all its descendants (Ray's GCS, raylet,
    workers, engine actors) while the block runs. Sampled every 0.2 s so that processes which exit
    during the block (Ray Data's actor pools) still count, up to their last sample."""

    def __init__(self, interval: float = 0.2):
        import threading

        import psutil

        self._psutil = psutil
        self.root = psutil.Process()
        self.interval = interval
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self, into: dict[int, float]) -> None:
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                into[proc.pid] = t.user + t.system
                label = self.names.get(proc.pid)
                # A Ray worker starts as `python` and idles as `ray::IDLE` before it takes its actor's or
                # task's title: read again until it has one. "*": started during the block (its start-up,
                # imports included, is in its CPU).
                if label is None or label.rstrip("*") in _UNNAMED:
                    started = into is not self.base and proc.pid not in self.base
                    self.names[proc.pid] = _process_label(proc) + ("*" if started else "")
            except self._psutil.Error:
                continue

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample(self.last)

    def __enter__(self) -> "TreeCpu":
        self._sample(self.base)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(self.last)

    @property
    def seconds(self) -> float:
        return sum(v - self.base.get(pid, 0.0) for pid, v in self.last.items())

    def by_process(self) -> dict[str, float]:
        """CPU seconds per kind of process (Ray names its actors ray::ClassName)."""
        out: dict[str, float] = {}
        for pid, v in self.last.items():
            label = self.names.get(pid, "?")
            out[label] = out.get(label, 0.0) + v - self.base.get(pid, 0.0)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


ENGINE_PROCESS_PREFIXES = ("VLLM::",)  # vLLM's engine core and GPU/CPU workers name themselves so


def outside_engine_cpu(by_process: dict[str, float]) -> float:
    """CPU seconds of every process but vLLM's engine core and workers: what the pipeline itself costs
    (driver, Ray, readers, chain workers, Serve replicas with their tokenizer and image processor)."""
    return sum(v for k, v in by_process.items() if not k.startswith(ENGINE_PROCESS_PREFIXES))


_UNNAMED = ("python", "ray::IDLE")  # a Ray worker's titles before it runs an actor or a task


def _process_label(proc) -> str:
    import os as _os

    if proc.pid == _os.getpid():
        return "driver (bench process)"
    name = proc.name()
    cmd = " ".join(proc.cmdline()[:3])
    if name.startswith("VLLM::") or cmd.startswith("VLLM::"):
        return "VLLM::EngineCore"
    if name.startswith("ray::") or cmd.startswith("ray::"):
        # An actor's title carries the method it is in (ray::ServeController.listen_for_change): drop it.
        return re.sub(r"\.[A-Za-z_]\w*$", "", (name if name.startswith("ray::") else cmd).split()[0])
    for key in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env", "agent"):
        if key in cmd or key in name:
            return key
    return name


def _prepare(cfg, input_dir: Path, ids: list[int], root: Path) -> None:
    from annotate.data.prepare import prepare_output
    from annotate.data.shards import find_shards
    from annotate.data.store import OutputStore, prepare_fingerprint

    store, fingerprint = OutputStore(root), prepare_fingerprint(cfg)
    for ref in find_shards(input_dir, ids, cfg.data.shard_format):
        store.record(prepare_output(ref, cfg.data, store, fingerprint))


def _seed_output(prepared: Path, out: Path) -> None:
    """A fresh run folder whose `prepare` output is already finished (same files, same manifest)."""
    (out / "stages").mkdir(parents=True)
    shutil.copytree(prepared / "stages" / "prepare", out / "stages" / "prepare")
    shutil.copy(prepared / "manifest.jsonl", out / "manifest.jsonl")


def run_direct(cfg, engines: dict, prepared: Path, shard_names: list[str], out: Path) -> dict:
    from annotate.data.store import FINAL, PREPARE, OutputStore, iter_stored_records
    from annotate.data.writer import fill
    from annotate.executor.workers import decode_or_none
    from annotate.stages.chain import direct_links, finalize_record, run_chain

    source = OutputStore(prepared)
    model_s = 0.0

    def timed(model: str):
        chat = engines[model].chat

        def call(requests):
            nonlocal model_s
            t = time.perf_counter()
            try:
                return chat(requests)
            finally:
                model_s += time.perf_counter() - t
        return call

    started, cpu = time.perf_counter(), time.process_time()
    records = [rec for name in shard_names for rec in iter_stored_records(source.output_path(PREPARE, name))]
    totals = asyncio.run(run_chain(direct_links(cfg, timed), records, lambda record: decode_or_none(record, cfg.data)))
    for record in records:
        finalize_record(record, cfg.quality)
    by_shard: dict[str, list] = {}
    for record in records:
        by_shard.setdefault(record.shard, []).append(record)
    target = OutputStore(out)
    for shard, recs in by_shard.items():
        fill(target.writer(FINAL, shard, len(recs)), recs).commit()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu, "model_seconds": model_s, "images": len(records),
            "completion_tokens": sum(c.completion_tokens for c in totals.values()),
            "prompt_tokens": sum(c.prompt_tokens for c in totals.values()),
            "per_stage": {k: {"regions_in": c.regions_in, "done": c.done, "failed": c.failed, "retried": c.retried,
                              "completion_tokens": c.completion_tokens} for k, c in totals.items()}}


def run(shards: int = 8, rounds: int = 2, config: str | Path = REPO / "pipelines" / "tiny.yaml",
        work_dir: str | Path | None = None, worker_niceness: int | None = 0) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if worker_niceness is not None:
        # Ray starts its workers (model actors included) at niceness 15 by default; on a machine shared
        # with other users' nice-0 processes they then get less CPU than the direct side (nice 0).
        os.environ["RAY_worker_niceness"] = str(worker_niceness)
    import ray
    from rich.console import Console

    from annotate.config import load_config
    from annotate.engines.factory import build_engine
    from ray import serve
    from annotate.cluster import ensure_ray
    from annotate.executor.runner import run_pipeline
    from bench.shards import make_shards

    cfg = load_config(config)
    own_tmp = tempfile.TemporaryDirectory(prefix="bench-overhead-") if work_dir is None else None
    work = Path(own_tmp.name if own_tmp else work_dir)
    console = Console(stderr=True)
    try:
        ids = make_shards(work / "input", shards, given_masks=False)
        names = [f"{i:05d}" for i in ids]
        t = time.perf_counter()
        _prepare(cfg, work / "input", ids, work / "prepared")
        prepare_s = time.perf_counter() - t

        t = time.perf_counter()
        # The direct side is the in-process engine (one process, no Serve): the only place besides the
        # engine tests that still builds `VllmEngine` itself.
        engines = {name: build_engine(cfg.models[name].model_copy(update={
            "vllm": cfg.models[name].vllm.model_copy(update={"in_process": True})}))
            for name in sorted({s.model for s in cfg.stages.values()})}
        direct_load_s = time.perf_counter() - t
        t = time.perf_counter()
        ensure_ray(cfg.run)
        ray_start_s = time.perf_counter() - t

        # Untimed warm-up over one shard: loads the deployments, starts the Ray Data machinery once.
        _seed_output(work / "prepared", work / "pipeline-warmup")
        t = time.perf_counter()
        run_pipeline(cfg, work / "input", work / "pipeline-warmup", ids[:1], stage="all", console=console)
        warmup_s = time.perf_counter() - t
        run_direct(cfg, engines, work / "prepared", names[:1], work / "direct-warmup")

        # The cluster standing still, deployments up, for IDLE_S: what Ray's services, the idle replicas and
        # engines, and this process's own sampling (TreeCpu) cost per second whatever the run does. On a
        # GPU node that rate is spread over many more regions per second than here.
        with TreeCpu() as idle:
            time.sleep(IDLE_S)
        idle_rates = {k: v / IDLE_S for k, v in idle.by_process().items()}
        idle_outside = outside_engine_cpu(idle_rates)

        pipeline, direct = [], []
        for r in range(rounds):
            out = work / f"pipeline-{r}"
            _seed_output(work / "prepared", out)
            t = time.perf_counter()
            with TreeCpu() as tree:
                summary = run_pipeline(cfg, work / "input", out, ids, stage="all", console=console)
            wall = time.perf_counter() - t
            assert len(summary.shards_written) == shards, summary.shards_written
            by_process = tree.by_process()
            regions = sum(v["regions"] for v in summary.shards_written.values())
            pipeline.append({"seconds": summary.processing_s, "wall_seconds": wall, "cpu_seconds": tree.seconds,
                             "cpu_by_process": by_process,
                             "cpu_seconds_per_region_outside_engine": outside_engine_cpu(by_process) / max(regions, 1),
                             "cpu_seconds_per_region_outside_engine_net_of_idle":
                                 (outside_engine_cpu(by_process) - idle_outside * wall) / max(regions, 1),
                             "completion_tokens": sum(v["completion_tokens"] for v in summary.shards_written.values()),
                             "prompt_tokens": sum(v["prompt_tokens"] for v in summary.shards_written.values()),
                             "status": {k: sum(v[k] for v in summary.shards_written.values())
                                        for k in ("regions", "ok", "rejected", "failed", "pending")}})
            console.print(f"round {r}: pipeline {summary.processing_s:.2f} s")
            d = run_direct(cfg, engines, work / "prepared", names, work / f"direct-{r}")
            direct.append(d)
            console.print(f"round {r}: direct {d['seconds']:.2f} s (model {d['model_seconds']:.2f} s)")
        for e in engines.values():
            e.close()
        serve.shutdown()
        ray.shutdown()
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()

    p_med = statistics.median(p["seconds"] for p in pipeline)
    d_med = statistics.median(d["seconds"] for d in direct)
    m_med = statistics.median(d["model_seconds"] for d in direct)
    pc_med = statistics.median(p["cpu_seconds"] for p in pipeline)
    dc_med = statistics.median(d["cpu_seconds"] for d in direct)
    return {
        "shards": shards, "rounds": rounds, "config": str(config), "images": direct[0]["images"],
        "regions": pipeline[0]["status"]["regions"], "prepare_seconds": prepare_s,
        "direct_engine_load_seconds": direct_load_s, "ray_start_seconds": ray_start_s,
        "pipeline": pipeline, "direct": direct,
        "pipeline_seconds": p_med, "direct_seconds": d_med, "direct_model_seconds": m_med,
        "ratio": p_med / d_med, "ratio_per_round": [p["seconds"] / d["seconds"] for p, d in zip(pipeline, direct)],
        "pipeline_cpu_seconds": pc_med, "direct_cpu_seconds": dc_med, "cpu_ratio": pc_med / dc_med,
        "cpu_seconds_per_region_outside_engine": statistics.median(
            p["cpu_seconds_per_region_outside_engine"] for p in pipeline),
        "idle_seconds": IDLE_S, "idle_cpu_per_second_by_process": idle_rates,
        "idle_cpu_per_second_outside_engine": idle_outside,
        "cpu_seconds_per_region_outside_engine_net_of_idle": statistics.median(
            p["cpu_seconds_per_region_outside_engine_net_of_idle"] for p in pipeline),
        "worker_niceness": worker_niceness, "warmup_seconds": warmup_s,
        "target": 1.25, "loadavg_1m": os.getloadavg()[0],
    }


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pipeline overhead: {res['shards']} shards, {res['images']} images, {res['regions']} regions, "
                        f"{res['rounds']} alternating rounds (median)")
    for col in ("side", "seconds", "CPU s (process tree)", "model s (in chat)", "completion tokens", "prompt tokens"):
        table.add_column(col, justify="left" if col == "side" else "right")
    for i, (p, d) in enumerate(zip(res["pipeline"], res["direct"])):
        table.add_row(f"pipeline, round {i}", f"{p['seconds']:.2f}", f"{p['cpu_seconds']:.2f}", "",
                      str(p["completion_tokens"]), str(p["prompt_tokens"]))
        table.add_row(f"direct, round {i}", f"{d['seconds']:.2f}", f"{d['cpu_seconds']:.2f}", f"{d['model_seconds']:.2f}",
                      str(d["completion_tokens"]), str(d["prompt_tokens"]))
    Console().print(table)
    print(f"ratio pipeline / direct = {res['ratio']:.3f} (per round: "
          f"{', '.join(f'{x:.3f}' for x in res['ratio_per_round'])}); target <= {res['target']}")
    print(f"CPU seconds pipeline / direct = {res['cpu_ratio']:.3f} (Ray worker niceness {res['worker_niceness']})")
    print(f"pipeline CPU-s per region outside vLLM's engine processes = "
          f"{res['cpu_seconds_per_region_outside_engine']:.3f}")
    print(f"the cluster standing still (deployments up, {res['idle_seconds']} s): "
          f"{res['idle_cpu_per_second_outside_engine']:.3f} CPU-s per second outside the engines ("
          + ", ".join(f"{k} {v:.3f}" for k, v in list(res["idle_cpu_per_second_by_process"].items())[:6])
          + f"); per region net of that rate x the round's wall: "
          f"{res['cpu_seconds_per_region_outside_engine_net_of_idle']:.3f}")
    for i, p in enumerate(res["pipeline"]):
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(p.get("cpu_by_process", {}).items())[:10])
        print(f"pipeline round {i} CPU-s by process: {top}")
    print(f"excluded: Ray start {res['ray_start_seconds']:.1f} s, direct engine load {res['direct_engine_load_seconds']:.1f} s, "
          f"prepare {res['prepare_seconds']:.1f} s; load average (1 min) {res['loadavg_1m']:.2f}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=8, help="copies of the sample shards (4 images each)")
    p.add_argument("--rounds", type=int, default=2, help="alternating pipeline/direct rounds")
    p.add_argument("--config", default=str(REPO / "pipelines" / "tiny.yaml"))
    p.add_argument("--small", action="store_true", help="CI mode: 2 shards, 1 round (still loads 4 engines)")
    p.add_argument("--worker-niceness", type=int, default=0,
                   help="RAY_worker_niceness for the run (Ray's default is 15; -1: leave Ray's default)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.small:
        a.shards, a.rounds = 2, 1
    res = run(a.shards, a.rounds, a.config, worker_niceness=None if a.worker_niceness < 0 else a.worker_niceness)
    print_table(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
