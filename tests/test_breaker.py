"""The per-stage breaker (annotate/stages/breaker.py, issue 22): it trips on a systematic failure within
its threshold and not on scattered ones; a stage's real counts (stages/batch.py `StageCounts`, from
`run_stage` with a scripted engine) feed it; the driver's loop stops on it (runner `ShardOutputs.write`
with a stand-in dataset and display, no Ray) and `annotate run` ends with its message and exit code 4.
Pure and fast: no Ray, no model."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from annotate.config import BreakerConfig, CropConfig, load_config
from annotate.data.masks import encode_rle
from annotate.data.records import ImageRecord, RegionRecord
from annotate.engines.postprocess import finish
from annotate.stages.batch import StageCounts, run_stage
from annotate.stages.breaker import Breaker, BreakerTripped, StageBreakers, Trip
from annotate.stages.chain import build_stage

from bench.harness import TINY_FIELDS

DEFAULTS = BreakerConfig()


def test_defaults_stop_a_systematic_failure_within_the_first_hundred_regions():
    breaker = Breaker.of("merge", DEFAULTS)
    trips = [breaker.add("length", sample=f"merge: length: cut at 64 tokens ({i})") for i in range(DEFAULTS.min_count)]
    assert all(t is None for t in trips[:-1])  # never before min_count outcomes
    trip = trips[-1]
    assert trip is not None and trip.kind == "length" and trip.seen == DEFAULTS.min_count and trip.share == 1.0
    assert len(trip.samples) == 2


def test_a_failure_that_starts_mid_stage_trips_once_it_fills_the_window_share():
    breaker = Breaker("validate", window=200, min_count=50, threshold=0.8)
    for _ in range(1000):
        assert breaker.add("ok") is None
    tripped_at = None
    for i in range(1, 201):
        if breaker.add("parse") is not None:
            tripped_at = i
            break
    assert tripped_at == 160  # 160 of the last 200 = 0.8


def test_scattered_failures_of_mixed_kinds_never_trip():
    rng = random.Random(0)
    breaker = Breaker.of("context", DEFAULTS)
    kinds = ["length", "parse", "timeout", "echo", "internal"]
    for _ in range(5000):  # 60% failures, but no kind above 20%
        outcome = rng.choice(kinds) if rng.random() < 0.6 else rng.choice(["ok", "rejected"])
        assert breaker.add(outcome) is None


def test_one_kind_below_the_threshold_does_not_trip_and_rejections_are_answers():
    breaker = Breaker.of("validate", DEFAULTS)
    for i in range(2000):
        assert breaker.add("parse" if i % 10 < 7 else "ok") is None  # 70% < 80%
    breaker = Breaker.of("validate", DEFAULTS)
    for _ in range(2000):
        assert breaker.add("rejected") is None  # a stage that rejects everything has answered


def test_counts_in_large_chunks_keep_their_proportions():
    """The driver feeds what changed between two looks: one chunk of 1000 outcomes with 20% failures
    must not look like 200 failures in a row."""
    breaker = Breaker.of("object", DEFAULTS)
    assert breaker.add_counts({"ok": 800, "length": 200}) is None
    assert breaker.seen == pytest.approx(DEFAULTS.window)
    assert breaker.add_counts({"ok": 5, "length": 5}) is None
    assert breaker.add_counts({"length": 1000}) is not None


def test_disabled_breaker_never_trips():
    breakers = StageBreakers(BreakerConfig(enabled=False), ["merge"])
    assert breakers.observe({"merge": {"done": 0, "rejected": 0, "failed": 500,
                                       "failures_by_kind": {"length": 500}}}) is None


def test_stage_breakers_feed_the_change_between_cumulative_looks():
    breakers = StageBreakers(DEFAULTS, ["object", "merge"])
    looks = [
        {"object": {"done": 40, "rejected": 0, "failed": 2, "failures_by_kind": {"parse": 2}}},
        {"object": {"done": 80, "rejected": 0, "failed": 4, "failures_by_kind": {"parse": 4}},
         "merge": {"done": 1, "rejected": 0, "failed": 30, "failures_by_kind": {"length": 30},
                   "error_samples": {"length": ["merge: length: a", "merge: length: b"]}}},
        {"object": {"done": 40, "rejected": 0, "failed": 2, "failures_by_kind": {"parse": 2}}},  # an old look, late
        {"merge": {"done": 2, "rejected": 0, "failed": 60, "failures_by_kind": {"length": 60}}},
    ]
    assert [breakers.observe(look) for look in looks[:3]] == [None, None, None]
    trip = breakers.observe(looks[3])
    assert trip is not None and trip.stage == "merge" and trip.kind == "length"
    assert trip.seen == pytest.approx(62) and trip.failed == pytest.approx(60)  # nothing counted twice
    assert breakers.breakers["object"].seen == pytest.approx(84)


def test_the_message_names_stage_kind_two_samples_and_what_to_check():
    message = str(BreakerTripped(Trip("merge", "length", 60, 62, ("merge: length: a", "merge: length: b", "c"))))
    assert "'merge'" in message and "`length`" in message and "97%" in message
    assert "merge: length: a" in message and "merge: length: b" in message and "  - c" not in message
    assert "max_tokens" in message and "rerun the same command" in message and "--retry-failed" in message


# --- a stage's own counts feed it ------------------------------------------------------------------

def _records(n: int) -> list[tuple[ImageRecord, Image.Image]]:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:40, 10:40] = 1
    out = []
    for i in range(n):
        region = RegionRecord(region_id=f"s:img{i}:0", region_index=0, phrase="a red mug", bbox=[10, 10, 30, 30],
                              mask=encode_rle(mask), mask_source="given")
        out.append((ImageRecord(image_key=f"img{i}", shard="s", width=64, height=64, caption="a mug",
                                regions=[region]), Image.new("RGB", (64, 64), (200, 30, 30))))
    return out


def cut_off(requests):
    """A scripted systematic defect: every answer runs into max_tokens (a wrong stop token)."""
    return [finish(r.request_id, "The mug is red and the mug is red and", "length", json_schema=r.json_schema,
                   reasoning_model=False, prompt_tokens=90, completion_tokens=64, latency_s=0.01) for r in requests]


def test_a_scripted_systematic_failure_trips_it_through_the_stage_counts():
    cfg = load_config(TINY_FIELDS)
    stage = build_stage("object", cfg.stages["object"], "scripted")
    total = StageCounts()
    breakers = StageBreakers(DEFAULTS, ["object"])
    trip, regions = None, 0
    for _ in range(20):  # batches of 8 images, as a chain worker reports them
        counts = run_stage(stage, _records(8), cut_off, CropConfig(max_side=64), max_attempts=2)
        total.add(counts)
        regions += counts.regions_in
        trip = breakers.observe({"object": total.__dict__})
        if trip:
            break
    assert trip is not None and trip.kind == "length" and regions <= 2 * DEFAULTS.min_count
    assert total.failures_by_kind == {"length": total.failed} and total.retried == total.failed
    assert len(total.error_samples["length"]) == 2 and all(": object: length: output cut" in s for s in trip.samples)


def test_stage_counts_sum_failures_by_kind_and_keep_two_samples():
    a, b = StageCounts(), StageCounts()
    a.fail("parse", "p1")
    a.fail("length", "l1")
    b.fail("parse", "p2")
    b.fail("parse", "p3")
    a.add(b)
    assert a.failed == 4 and a.failures_by_kind == {"parse": 3, "length": 1}
    assert a.error_samples == {"parse": ["p1", "p2"], "length": ["l1"]}
    assert b.failures_by_kind == {"parse": 2}  # the part is left as it was


# --- the driver stops on it ------------------------------------------------------------------------

class _Display:
    def __init__(self, trip_after: int):
        self.looks, self.trip_after = 0, trip_after

    def raise_if_tripped(self, look=False):
        self.looks += 1
        if self.looks > self.trip_after:
            raise BreakerTripped(Trip("merge", "length", 50, 50, ("a", "b")))

    def shard_done(self):
        pass


class _Dataset:
    """Stands in for a Ray dataset: iter_batches is a generator whose closing is seen."""

    def __init__(self):
        self.closed = self.yielded = 0

    def iter_batches(self, **_):
        try:
            while True:
                self.yielded += 1
                yield pa.table({"x": pa.array([], pa.int64())})
        finally:
            self.closed += 1


def test_the_driver_loop_stops_and_closes_the_stream(tmp_path, monkeypatch):
    from annotate.data.store import OutputStore
    from annotate.executor.runner import ShardOutputs

    monkeypatch.setattr(ShardOutputs, "record_prepared", lambda self: None)  # the ledger actor: none here
    outputs = ShardOutputs(OutputStore(tmp_path), "data", "fp", ledger=None, damage={})
    ds = _Dataset()
    with pytest.raises(BreakerTripped):
        outputs.write(ds, _Display(trip_after=3))
    assert ds.yielded == 4 and ds.closed == 1 and outputs.committed == set()


def test_annotate_run_ends_with_the_message_and_exit_code_4(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)  # `--output y`: its logs/ folder is made here, not in the checkout

    import annotate.executor.runner as runner
    from annotate.cli import BREAKER_EXIT_CODE, app

    def tripped(*args, **kwargs):
        raise BreakerTripped(Trip("merge", "length", 50, 50, ("merge: length: cut", "merge: length: cut 2")))

    monkeypatch.setattr(runner, "run_pipeline", tripped)
    result = CliRunner().invoke(app, ["run", "--shards", "0", "--input", "x", "--output", "y",
                                      "--config", str(TINY_FIELDS)])
    assert result.exit_code == BREAKER_EXIT_CODE == 4
    assert "stage 'merge'" in result.output and "merge: length: cut 2" in result.output
    assert "Traceback" not in result.output
    assert list((tmp_path / "y" / "logs").glob("*.log"))  # the libraries' log, outside the terminal
