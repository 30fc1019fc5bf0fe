"""Figure 4, memory over scale: peak resident memory of a run over 1 shard and over 8 shards.

Each run is a separate `annotate` process (a fresh local Ray cluster, fresh engines); a sampler
sums the memory of that process and all its descendants (Ray's GCS and raylet, the workers, the
model actors and vLLM's engine processes) every 0.5 s and keeps the peak:

* RSS summed over the processes (what the issue asks for; counts shared pages, e.g. Ray's object
  store and shared libraries, once per process that maps them, so it overstates the real footprint);
* PSS summed over the processes (shared pages split between their users: adds up to real memory).

Shards are copies of the sample shards (same images and size distribution) under new numbers.

    python -m bench.memory_scale [--small] [--data-plane] [--shards-large 8] [--json FILE]

`--data-plane` measures `annotate prepare` (read, decode, regions, masks, Parquet write) instead
of the whole run: no Ray, no models, seconds instead of minutes. `--small` is that with 1 vs 2
shards (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


class TreeSampler:
    """Peak of the summed RSS and PSS of a process and its descendants, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.5, pss: bool = True):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.pss = pss
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss = 0
        for p in procs:
            try:
                if self.pss:
                    info = p.memory_full_info()
                    rss += info.rss
                    pss += info.pss
                else:
                    rss += p.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                continue
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))


def measure(cmd: list[str], env: dict | None = None, interval: float = 0.5) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeSampler(proc.pid, interval) as sampler:
        output, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}")
    return {"peak_rss_mib": sampler.peak_rss / 2**20, "peak_pss_mib": sampler.peak_pss / 2**20,
            "max_processes": sampler.peak_procs, "samples": sampler.samples,
            "seconds": time.perf_counter() - started, "output_tail": output[-600:]}


def run(small_shards: int = 1, large_shards: int = 8, data_plane: bool = False,
        config: str | Path = REPO / "pipelines" / "tiny.yaml", work_dir: str | Path | None = None) -> dict:
    from bench.shards import make_shards

    own_tmp = tempfile.TemporaryDirectory(prefix="bench-memory-") if work_dir is None else None
    work = Path(own_tmp.name if own_tmp else work_dir)
    annotate = [sys.executable, "-m", "annotate.cli"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    try:
        make_shards(work / "input", large_shards, given_masks=False)
        runs = {}
        for n in (small_shards, large_shards):
            spec = f"0-{n - 1}"
            if data_plane:
                cmd = [*annotate, "prepare", "--input", str(work / "input"), "--shards", spec,
                       "--output", str(work / f"out-{n}"), "--config", str(config)]
            else:
                cmd = [*annotate, "run", "--stage", "all", "--input", str(work / "input"), "--shards", spec,
                       "--output", str(work / f"out-{n}"), "--config", str(config)]
            runs[n] = {"command": " ".join(cmd[2:]), **measure(cmd, env)}
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
    s, l = runs[small_shards], runs[large_shards]
    return {"mode": "data plane (annotate prepare)" if data_plane else "whole run (annotate run --stage all)",
            "config": str(config), "small_shards": small_shards, "large_shards": large_shards, "runs": runs,
            "ratio_rss": l["peak_rss_mib"] / s["peak_rss_mib"],
            "ratio_pss": l["peak_pss_mib"] / s["peak_pss_mib"] if s["peak_pss_mib"] else None,
            "target": 1.2, "loadavg_1m": os.getloadavg()[0]}


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"peak memory, {res['mode']}, process tree sampled every 0.5 s")
    for col in ("shards", "peak RSS sum (MiB)", "peak PSS sum (MiB)", "max processes", "seconds"):
        table.add_column(col, justify="right")
    for n, r in res["runs"].items():
        table.add_row(str(n), f"{r['peak_rss_mib']:,.0f}", f"{r['peak_pss_mib']:,.0f}", str(r["max_processes"]),
                      f"{r['seconds']:.0f}")
    Console().print(table)
    pss = f"{res['ratio_pss']:.3f}" if res["ratio_pss"] else "n/a"
    print(f"ratio {res['large_shards']}/{res['small_shards']} shards: RSS {res['ratio_rss']:.3f}, PSS {pss}; "
          f"target <= {res['target']}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards-small", type=int, default=1)
    p.add_argument("--shards-large", type=int, default=8)
    p.add_argument("--data-plane", action="store_true", help="measure `annotate prepare` instead of a whole run")
    p.add_argument("--config", default=str(REPO / "pipelines" / "tiny.yaml"))
    p.add_argument("--small", action="store_true", help="CI mode: --data-plane over 1 vs 2 shards")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.small:
        a.data_plane, a.shards_small, a.shards_large = True, 1, 2
    res = run(a.shards_small, a.shards_large, a.data_plane, a.config)
    print_table(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
