"""The breaker and the deadline in a real run (issue 22): Ray Data, the tiny models on Ray Serve (the
`hf` engine, so no vLLM start), the sample shards. A defect that fails every request the same way (a
deadline far below any answer's time: every request of `object` is cancelled as a `timeout`, as on a
hung replica) stops the run with `BreakerTripped` before any shard is recorded as finished; the rerun
after the fix (the deadline removed: it is no part of the config fingerprint, so nothing else changes)
resumes and gives every input region exactly once."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import pytest

from annotate.config import load_config
from annotate.data.store import FINAL, FINISHED, OutputStore
from annotate.stages.breaker import BreakerTripped

from bench.harness import SAMPLE_SHARDS, TINY, input_region_ids

pytestmark = pytest.mark.slow

HF = {"engine": "hf", "hf": {"dtype": "float32", "device": "cpu", "batch_size": 8}}


def config(deadline_s: float | None):
    """The tiny pipeline on the hf engine. With a deadline: the defect, and a breaker sized for the sample
    shards' 24 regions. Without: the fix, and the default breaker (min_count 50: random weights answer the
    JSON stage with no constrained decoding here, so it would trip on `parse`, rightly, with a small one)."""
    overrides = {"models": {"vlm": HF, "llm": HF}}
    if deadline_s is not None:
        overrides["stages"] = {"object": {"deadline_s": deadline_s}}
        overrides["run"] = {"breaker": {"window": 20, "min_count": 5, "threshold": 0.8}}
    return load_config(TINY, overrides)


@pytest.fixture
def hf_models(ray_session):
    """The hf-engine deployments are this test's alone: deleted after it, so later runs of the session
    have their CPUs and memory."""
    yield
    from annotate.serving.apps import needed_models, stop_apps

    stop_apps(needed_models(config(None)))


def test_a_systematic_timeout_stops_the_run_and_the_fixed_rerun_resumes(hf_models, tmp_path):
    from annotate.executor.runner import run_pipeline

    with pytest.raises(BreakerTripped) as err:
        run_pipeline(config(deadline_s=0.001), SAMPLE_SHARDS, tmp_path, [0, 1], stage="all")
    trip = err.value.trip
    assert trip.stage == "object" and trip.kind == "timeout" and len(trip.samples) == 2
    assert "no answer within 0.001 s" in trip.samples[0] and "deadline" in str(err.value)
    store = OutputStore(tmp_path)
    assert not any(line.get("state") == FINISHED for line in store.latest(FINAL).values())
    assert not list((tmp_path / "data").glob("*.parquet"))  # no shard half-written either
    (record,) = [json.loads(p.read_text()) for p in store.runs_dir.glob("*.json")]  # what stopped it, on record
    assert record["stopped"]["stage"] == "object" and record["stopped"]["kind"] == "timeout"
    assert record["failures"]["object"].get("timeout", 0) >= 5

    summary = run_pipeline(config(deadline_s=None), SAMPLE_SHARDS, tmp_path, [0, 1], stage="all")
    assert sorted(summary.shards_written) == ["00000", "00001"]
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "data" / "*.parquet"), split="train")
    seen = Counter(r["region_id"] for row in ds for r in row["regions"])
    assert seen == input_region_ids(SAMPLE_SHARDS, [0, 1])  # every region once: nothing lost or duplicated
    assert not any("timeout" in (r["error"] or "") for row in ds for r in row["regions"])
