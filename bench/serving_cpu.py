"""CPU-seconds per region outside the model engines, whole chain: what the pipeline itself costs.

GPU time is bought by the hour; the CPU around it (driver, Ray, shard readers, chain workers, Serve
replicas with their tokenizer and image processor) must stay small enough that a GPU node's CPUs
keep its GPUs fed. Counted here: CPU seconds (user + system) of every process of the run's process
tree except vLLM's engine core and workers, over a run of the whole chain on >= 500 regions, start-up
excluded (an untimed warm-up run on one shard deploys the models first), divided by the regions.
The data plane is excluded as well: both sides start from the same stored `prepare` output.

With `--old-worktree DIR` (a checkout of commit 3d599e8, the last with the old design:
`git worktree add --detach DIR 3d599e8`) the same measurement runs on that code in a subprocess in the
same invocation, with its own `pipelines/tiny.yaml`. There the engine ran inside its Ray actor
(`ray::EngineActor`, vLLM in-process), so that whole process is excluded as the engine: its non-engine
share (Ray actor plumbing, chat templates, image processing) counts for the old design's benefit.

With `--sizes 24,72,24,72` the measured runs go in that order on one cluster (one warm-up), and the
figure is also given at the margin: the least-squares slope of CPU outside the engines against regions
over those runs. A cost paid once per run (worker start-up, imports) leaves the slope; what each region
costs, and what the cluster costs per second of a run, stay in it.

    python -m bench.serving_cpu [--shards 42 | --sizes 24,72,24,72] [--old-worktree DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Processes that are the model engine itself: vLLM's engine core and workers (new design), the
# engine actor holding an in-process vLLM (old design).
ENGINE_LABELS = ("VLLM::", "ray::EngineActor")


def measure(sizes: list[int], work: Path) -> list[dict]:
    """Measured runs of the whole chain, one per entry of `sizes` (shards), in that order, on one cluster,
    with the tiny pipeline of the code base on sys.path.

    Uses only what both designs' code bases have (bench.pipeline_overhead's helpers, run_pipeline)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["RAY_worker_niceness"] = "0"
    from rich.console import Console

    from annotate.config import load_config
    from annotate.cluster import ensure_ray
    from annotate.executor.runner import run_pipeline
    from bench.pipeline_overhead import TreeCpu, _prepare, _seed_output
    from bench.shards import make_shards

    import annotate

    cfg = load_config(Path(annotate.__file__).resolve().parents[1] / "pipelines" / "tiny.yaml")
    console = Console(stderr=True)
    ids = make_shards(work / "input", max(sizes), given_masks=False)
    _prepare(cfg, work / "input", ids, work / "prepared")
    ensure_ray(cfg.run)
    _seed_output(work / "prepared", work / "warmup")
    run_pipeline(cfg, work / "input", work / "warmup", ids[:1], stage="all", console=console)  # deploys; untimed
    runs = []
    for i, shards in enumerate(sizes):
        out = work / f"measured-{i}"
        _seed_output(work / "prepared", out)
        started = time.perf_counter()
        with TreeCpu() as tree:
            summary = run_pipeline(cfg, work / "input", out, ids[:shards], stage="all", console=console)
        wall = time.perf_counter() - started
        by_process = tree.by_process()
        regions = sum(v["regions"] for v in summary.shards_written.values())
        engine = sum(v for k, v in by_process.items() if k.startswith(ENGINE_LABELS))
        outside = tree.seconds - engine
        runs.append({"code": str(Path(annotate.__file__).resolve().parents[1]), "shards": shards, "regions": regions,
                     "wall_s": wall, "processing_s": summary.processing_s, "cpu_s_total": tree.seconds,
                     "cpu_s_engine": engine, "cpu_s_outside_engine": outside,
                     "cpu_s_per_region_outside_engine": outside / max(regions, 1),
                     "cpu_by_process": by_process,
                     "status": {k: sum(v[k] for v in summary.shards_written.values()) for k in ("ok", "rejected", "failed")}})
    return runs


def marginal(runs: list[dict]) -> float | None:
    """CPU-s outside the engines per extra region: the least-squares slope over runs of several sizes."""
    xs, ys = [r["regions"] for r in runs], [r["cpu_s_outside_engine"] for r in runs]
    return statistics.linear_regression(xs, ys).slope if len(set(xs)) >= 2 else None


def measure_in(worktree: Path, sizes: list[int], work: Path) -> list[dict]:
    """`measure` on another checkout: this file's function, that checkout's `annotate` and `bench`."""
    code = ("import importlib.util, json, sys; from pathlib import Path; "
            f"spec = importlib.util.spec_from_file_location('serving_cpu', {str(Path(__file__).resolve())!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            f"print('RESULT ' + json.dumps(m.measure({sizes!r}, Path({str(work)!r}))))")
    env = {**os.environ, "PYTHONPATH": str(worktree)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=worktree, env=env, capture_output=True, text=True,
                          timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"old-design run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=42, help="copies of the sample shards (about 12 regions each)")
    p.add_argument("--sizes", help="several measured runs, these shard counts in this order (e.g. 24,72,24,72)")
    p.add_argument("--old-worktree", help="checkout of commit 3d599e8 (the old design), measured in a subprocess")
    p.add_argument("--small", action="store_true", help="2 shards (a smoke run, not the figure)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else [2 if a.small else a.shards]
    work = Path(tempfile.mkdtemp(prefix="serving-cpu-"))
    res: dict = {}
    if a.old_worktree:  # first, so that this process has no Ray cluster of its own yet
        res["old_design"] = measure_in(Path(a.old_worktree), sizes, work / "old")
    res["new_design"] = measure(sizes, work / "new")
    slopes = {name: marginal(runs) for name, runs in res.items()}
    for name, runs in res.items():
        for r in runs:
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["cpu_by_process"].items())[:10])
            print(f"{name}: {r['shards']} shards, {r['regions']} regions, {r['cpu_s_per_region_outside_engine']:.3f} "
                  f"CPU-s/region outside the engine ({r['cpu_s_outside_engine']:.1f} of {r['cpu_s_total']:.1f} CPU-s); "
                  f"wall {r['processing_s']:.1f} s; by process: {top}")
        if slopes[name] is not None:
            print(f"{name}: at the margin {slopes[name]:.3f} CPU-s per region outside the engine (slope over {len(runs)} runs)")
    if a.json:
        Path(a.json).write_text(json.dumps({**res, "marginal": slopes}, indent=2))
    return res


if __name__ == "__main__":
    main()
