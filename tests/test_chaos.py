"""A few rounds of the chaos benchmark (bench/chaos.py) in CI: the tiny pipeline killed once by each
kind but the model replica (driver, chain worker, read task), then run to the end; every input region must
be in the output exactly once and the manifest must never mark a missing or changed file finished.

It plays on the test session's own cluster and models (`ray_session`), so it costs runs, not model
loads. No replica kill: each makes Serve load that model again (about two minutes on a 2-core
machine, more than the rest of the test); tests/test_pipeline_serve.py kills a replica's engine
mid-run, and BENCHMARKS.md's chaos run kills replicas."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter

import pytest

from bench.chaos import KINDS, manifest_problems, plan_kinds
from bench.harness import REPO

ROUNDS = 3
CI_KINDS = ("driver", "chain_worker", "read_task")


def test_twenty_rounds_kill_each_kind_at_least_three_times():
    for seed in range(5):
        plan = plan_kinds(20, random.Random(seed), max_replica=3)
        counts = Counter(plan)
        assert set(counts) == set(KINDS) and min(counts.values()) >= 3 and counts["replica"] == 3, counts
        assert plan_kinds(20, random.Random(seed), max_replica=3) == plan  # the seed decides it all
    assert Counter(plan_kinds(ROUNDS, random.Random(0), max_replica=0)) == dict.fromkeys(CI_KINDS, 1)


def test_manifest_check_catches_a_missing_file_and_a_changed_one(tmp_path):
    (tmp_path / "data").mkdir()
    lines = []
    for shard, content in (("00000", b"kept"), ("00001", b"changed"), ("00002", b"removed")):
        path = tmp_path / "data" / f"{shard}.parquet"
        path.write_bytes(content)
        lines.append({"output": "final", "shard": shard, "sha256": hashlib.sha256(content).hexdigest()})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert manifest_problems(tmp_path) == []
    (tmp_path / "data" / "00001.parquet").write_bytes(b"other bytes")
    (tmp_path / "data" / "00002.parquet").unlink()
    assert manifest_problems(tmp_path) == ["final/00001: marked finished, sha256 differs",
                                           "final/00002: marked finished, file missing"]


@pytest.mark.slow
@pytest.mark.timeout(1500)  # with the models' first deployment, when no earlier test made them
def test_chaos_rounds_lose_and_duplicate_nothing(ray_session, tmp_path):
    from bench.chaos import Cluster, print_table, run_chaos

    # The session's local cluster was started by this process: its daemons and workers share our
    # process session, which is where the rounds look for what to kill.
    cluster = Cluster(ray_session.get_runtime_context().gcs_address, os.getsid(0),
                      {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    summary = run_chaos(cluster, tmp_path, rounds=ROUNDS, seed=12, max_replica=0)
    print_table(summary)

    by_kind = summary["by_kind"]
    assert {kind: row["kills"] for kind, row in by_kind.items()} == {**dict.fromkeys(CI_KINDS, 1), "replica": 0}
    assert summary["final"]["rc"] == 0, summary["final"]
    assert summary["union"]["regions_expected"] > 0
    for reader in ("pyarrow", "datasets"):
        assert summary["union"][reader] == {"lost": 0, "duplicated": 0}, (reader, summary["union"])
    for kind, row in by_kind.items():
        assert row["lost"] == 0 and row["duplicated"] == 0, (kind, row)
        assert not row["problems"], (kind, row["problems"])
    assert summary["ok"]
    # A kill drawn after the round's last shard was written does not land (the table says which);
    # at least one must have, or the test tested nothing.
    assert sum(row["landed"] for row in by_kind.values()) >= 1, by_kind
