"""Exactly once under crashes: SIGKILL a worker and then the driver of a real `annotate run`, rerun
the same command, and check that no region is lost or duplicated and finished shards are not redone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

# ONE_SHARD_AT_A_TIME: shards finish one after another, so a kill right after the first lands mid-run.
from bench.chaos import ONE_SHARD_AT_A_TIME
from bench.harness import copy_sample_shards, input_region_ids, kill_session, output_regions, session_pids, tiny_variant, wait_for
from fixtures_pipeline import free_session_models

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]  # own_cluster: run before the shared deployments (conftest.py)
SHARDS = 4


def final_lines(out: Path) -> list[dict]:
    manifest = out / "manifest.jsonl"
    if not manifest.exists():
        return []
    return [json.loads(line) for line in manifest.read_text().splitlines() if '"output": "final"' in line]


@pytest.mark.timeout(2400)  # two full runs, each starting its own Ray cluster and engines
def test_sigkill_worker_and_driver_then_rerun(tmp_path):
    free_session_models()  # this test starts a cluster of its own
    shards = copy_sample_shards(tmp_path / "in", SHARDS)
    out = tmp_path / "out"
    config = tiny_variant(tmp_path / "tiny-one-shard-at-a-time.yaml", ONE_SHARD_AT_A_TIME)
    cmd = [sys.executable, "-m", "annotate.cli", "run", "--stage", "all", "--shards", f"0-{SHARDS - 1}",
           "--input", str(shards), "--output", str(out), "--config", str(config)]
    log = open(tmp_path / "run1.log", "w")
    # A new session, so that killing its process group takes the local Ray cluster down with the driver.
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        # 1. A chain worker dies while the models are busy: Ray restarts it and the run goes on.
        wait_for(lambda: bool(session_pids("ChainWorker", proc.pid)) and any((out / "stages" / "prepare").glob("*.parquet")),
                 900, proc, "chain workers running")
        os.kill(session_pids("ChainWorker", proc.pid)[0], signal.SIGKILL)
        # 2. Once a shard is finished, the driver dies at once, with everything it started.
        wait_for(lambda: len(final_lines(out)) >= 1, 900, proc, "the first shard finished after a worker was killed")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_session(proc.pid)
        log.close()
    finished_before = {e["shard"]: e["sha256"] for e in final_lines(out)}
    assert 1 <= len(finished_before) < SHARDS, f"kill came too late to test a resume: {finished_before}"
    mtimes = {s: (out / "data" / f"{s}.parquet").stat().st_mtime_ns for s in finished_before}

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    # A quiet console: Ray's, Serve's and vLLM's output (the cluster and the models start again here) is in
    # the log file the summary names, not on the terminal among the bars and counts.
    terminal = rerun.stdout + rerun.stderr
    named = re.search(r"^Library logs \(Ray, Serve, vLLM\): (\S+)$", rerun.stdout, re.M)
    assert named, terminal[-3000:]
    logged = Path(named.group(1)).read_text()
    assert "Started a local Ray instance" in logged and "Started a local Ray instance" not in terminal
    library_line = re.compile(r'^(\{"asctime"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING)|(INFO|WARNING) \d{4}-)')
    assert not [line for line in terminal.splitlines() if library_line.match(line)], terminal[-3000:]
    assert "Deployment Options" not in terminal and "model vlm: deploying" in terminal
    lines = final_lines(out)
    per_shard = Counter(e["shard"] for e in lines)
    assert set(per_shard) == {f"{i:05d}" for i in range(SHARDS)}
    for shard, sha in finished_before.items():  # not recomputed: one manifest line, same file
        assert per_shard[shard] == 1
        assert (out / "data" / f"{shard}.parquet").stat().st_mtime_ns == mtimes[shard]
    assert not list((out / "data").glob(".*")), "a half-written file was left in the dataset folder"

    seen = Counter(r["region_id"] for r in output_regions(out))
    assert seen == input_region_ids(shards, list(range(SHARDS)))  # every region exactly once
