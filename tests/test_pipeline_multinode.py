"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`, on
127.0.0.1). `annotate serve --address` deploys the models, pinned to nodes by the custom resources
that the pipeline file declares (the way a 76B model is pinned to the 8-GPU nodes of a real cluster);
`annotate run --address` then uses those running deployments without loading a model;
`annotate serve --stop` takes them down."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from bench.harness import REPO, SAMPLE_SHARDS, TINY

from fixtures_pipeline import free_session_models
from bench.harness import input_region_ids, output_regions

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]  # own_cluster: run before the shared deployments (conftest.py)
RAY = str(Path(sys.executable).with_name("ray"))
# `ray start --head` (Ray 2.60) enables token authentication; every node and driver that joins the
# cluster must run in token mode too (the token is in ~/.ray/auth_token on this machine).
CLUSTER_ENV = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_node_cluster(tmp_path):
    port = free_port()
    env = CLUSTER_ENV
    temp_dir = f"/tmp/ray-2node-{port}"  # short: Ray's unix socket paths must stay under 108 bytes
    common = ["--num-cpus", "2", "--disable-usage-stats"]
    head = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard",
            "false", "--temp-dir", temp_dir, "--resources", json.dumps({"node_a": 1}), *common]
    worker = [RAY, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
              "--resources", json.dumps({"node_b": 1}), *common]
    free_session_models()
    try:
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=300)
        subprocess.run(worker, check=True, env=env, capture_output=True, timeout=300)
        yield f"127.0.0.1:{port}"
    finally:
        # Not `ray stop`: that would also stop the test session's own local cluster. Every process of
        # this cluster names its temp dir (or the GCS port) on its command line.
        for pattern in (temp_dir, f"127.0.0.1:{port}"):
            subprocess.run(["pkill", "-9", "-f", pattern], capture_output=True)


@pytest.mark.timeout(1800)
def test_run_on_two_nodes_places_models_by_resources(two_node_cluster, tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["models"]["vlm"]["resources"]["custom"] = {"node_a": 0.5}
    raw["models"]["llm"]["resources"]["custom"] = {"node_b": 0.5}
    for stage in raw["stages"].values():
        stage["prompt"] = str((TINY.parent / stage["prompt"]).resolve())
    config = tmp_path / "two-node.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"

    def annotate(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "annotate.cli", *args, "--config", str(config),
                               "--address", two_node_cluster],
                              capture_output=True, text=True, timeout=timeout, cwd=REPO, env=CLUSTER_ENV)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    served = json.loads(annotate("serve").stdout.strip().splitlines()[-1])
    assert sorted(served["deployed"]) == ["llm", "vlm"]
    assert json.loads(annotate("serve", timeout=300).stdout.strip().splitlines()[-1])["deployed"] == []  # already up
    annotate("run", "--stage", "all", "--shards", "0-1", "--input", str(SAMPLE_SHARDS), "--output", str(out))

    probe = subprocess.run(
        [sys.executable, "-c", "import json, ray; ray.init(address='%s'); "
         "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))" % two_node_cluster],
        capture_output=True, text=True, timeout=300, check=True, env=CLUSTER_ENV,
    )
    nodes = json.loads(probe.stdout.strip().splitlines()[-1])
    assert len(nodes) == 2
    (record_path,) = (out / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["models_deployed"] == []  # the run used the deployments `annotate serve` started
    assert {(r["model"], r["pid"]) for r in record["replicas"]} == {(r["model"], r["pid"]) for r in served["replicas"]}
    replicas = {r["model"]: r["node"] for r in record["replicas"]}
    assert replicas["vlm"] != replicas["llm"], "both models ran on one node"
    assert "node_a" in nodes[replicas["vlm"]] and "node_b" in nodes[replicas["llm"]]

    seen = Counter(r["region_id"] for r in output_regions(out))
    assert seen == input_region_ids(SAMPLE_SHARDS, [0, 1])

    stopped = json.loads(annotate("serve", "--stop", timeout=300).stdout.strip().splitlines()[-1])
    assert sorted(stopped["stopped"]) == sorted(served["apps"].values())
