"""The durable result cache: keys, durability across a killed writer, one file per writer, a folder
removed under a worker, and (slow) a whole run whose shard was lost before its commit replaying
every model call on the rerun, byte for byte."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from annotate.config import ModelConfig, SamplingConfig
from annotate.engines.base import ChatRequest, ChatResult
from annotate.engines.result_cache import (CallTally, ResultCache, ShardStore, count_stored, model_fingerprint,
                                           remove_shard, request_key)

REPO = Path(__file__).resolve().parents[1]


def image(color=(10, 20, 30), size=(8, 8)) -> Image.Image:
    return Image.new("RGB", size, color)


def request(text="describe", img=None, request_id="r1", schema=None, **sampling) -> ChatRequest:
    content = [{"type": "image", "image": img if img is not None else image()}, {"type": "text", "text": text}]
    return ChatRequest(messages=[{"role": "user", "content": content}],
                       sampling=SamplingConfig(**sampling), json_schema=schema, request_id=request_id)


def answer(req: ChatRequest, text="a red cup", **kw) -> ChatResult:
    return ChatResult(request_id=req.request_id, text=text, finish_reason="stop", prompt_tokens=17,
                      completion_tokens=5, cached_prompt_tokens=3, latency_s=1.5, parsed={"caption": text}, **kw)


class FakeModel:
    """An async chat that answers every request and counts them."""

    def __init__(self, fail=False):
        self.calls = 0
        self.fail = fail

    async def __call__(self, req: ChatRequest) -> ChatResult:
        self.calls += 1
        if self.fail:
            return ChatResult(request_id=req.request_id, error="HTTP 500: boom", error_kind="http")
        texts = [p.get("text", "?") for p in req.messages[0]["content"]]
        return answer(req, text=f"answer to {' '.join(texts)}")


def ask(cache: ResultCache, shard: str, model, reqs) -> tuple[list[ChatResult], CallTally]:
    tally = CallTally()
    chat = cache.wrap(shard, model, tally)

    async def go():
        return [await chat(r) for r in reqs]

    return asyncio.run(go()), tally


# ------------------------------------------------------------------------------------------ keys
def test_key_changes_with_everything_that_determines_the_answer():
    model = model_fingerprint("m", {"path": "/models/m"})
    base = request_key(model, request())
    variants = {
        "model": request_key(model_fingerprint("m", {"path": "/models/other"}), request()),
        "text": request_key(model, request(text="describe it")),
        "pixels": request_key(model, request(img=image(color=(10, 20, 31)))),
        "image size": request_key(model, request(img=image(size=(8, 9)))),
        "image mode": request_key(model, request(img=image().convert("RGBA"))),
        "seed": request_key(model, request(seed=1)),
        "temperature": request_key(model, request(temperature=0.7)),
        "max_tokens": request_key(model, request(max_tokens=12)),
        "stop": request_key(model, request(stop=["."])),
        "schema": request_key(model, request(schema={"type": "object"})),
    }
    assert base is not None
    for part, key in variants.items():
        assert key != base, f"the key ignores the {part}"
    assert len(set(variants.values())) == len(variants)
    # What does not change the answer does not change the key: the request id, an equal image.
    assert request_key(model, request(request_id="other-region", img=image())) == base


def test_model_fingerprint_ignores_scale_not_outputs():
    cfg = ModelConfig(engine="vllm", path="/models/m")
    base = model_fingerprint("m", cfg.model_dump(mode="json"))
    more = cfg.model_copy(deep=True)
    more.resources.replicas, more.resources.num_cpus, more.serving.max_in_flight = 8, 4, 64
    assert model_fingerprint("m", more.model_dump(mode="json")) == base
    other = cfg.model_copy(deep=True)
    other.vllm.dtype = "float16"
    assert model_fingerprint("m", other.model_dump(mode="json")) != base
    assert model_fingerprint("paper-model", cfg.model_dump(mode="json")) != base


def test_unhashable_request_is_not_cached(tmp_path):
    bad = ChatRequest(messages=[{"role": "user", "content": [{"type": "blob", "blob": object()}]}])
    assert request_key("m", bad) is None
    model = FakeModel()
    _, tally = ask(ResultCache(tmp_path, "object", "m"), "00000", model, [bad, bad])
    assert (model.calls, tally.model_calls, tally.replayed) == (2, 2, 0)


# --------------------------------------------------------------------------------- replay, store
def test_replay_is_identical_and_errors_are_not_kept(tmp_path):
    reqs = [request(text=f"region {i}", request_id=f"r{i}") for i in range(3)]
    model = FakeModel()
    live, tally = ask(ResultCache(tmp_path, "object", "m"), "00000", model, reqs)
    assert (tally.model_calls, tally.replayed) == (3, 0)

    again = FakeModel()
    replayed, tally = ask(ResultCache(tmp_path, "object", "m"), "00000", again, reqs)
    assert (again.calls, tally.model_calls, tally.replayed) == (0, 0, 3)
    for first, second in zip(live, replayed):
        assert second.request_id == first.request_id
        assert {**vars(second), "latency_s": 0} == {**vars(first), "latency_s": 0}

    failing = FakeModel(fail=True)
    _, tally = ask(ResultCache(tmp_path, "object", "m"), "00001", failing, reqs[:1])
    assert count_stored(tmp_path / "00001") == 0  # an error is asked again next time
    assert tally.model_calls == 1


def test_result_json_cannot_hold_is_returned_not_kept(tmp_path):
    async def odd_model(req):
        return ChatResult(request_id=req.request_id, text="x", parsed={1, 2})

    results, tally = ask(ResultCache(tmp_path, "object", "m"), "00000", odd_model, [request()])
    assert results[0].parsed == {1, 2} and tally.model_calls == 1
    assert count_stored(tmp_path / "00000") == 0


def test_other_model_or_stage_does_not_replay(tmp_path):
    req = request()
    ask(ResultCache(tmp_path, "object", "m"), "00000", FakeModel(), [req])
    for cache in (ResultCache(tmp_path, "object", "another-model"), ResultCache(tmp_path, "validate", "m")):
        model = FakeModel()
        ask(cache, "00000", model, [req])
        assert model.calls == 1


def test_several_writer_files_are_all_read(tmp_path):
    """One file per writer: two workers (on two nodes, say) each write theirs; a third reads both."""
    reqs = [request(text=f"region {i}", request_id=f"r{i}") for i in range(4)]
    a, b = ResultCache(tmp_path, "object", "m"), ResultCache(tmp_path, "object", "m")
    ask(a, "00000", FakeModel(), reqs[:2])
    ask(b, "00000", FakeModel(), reqs[2:])
    files = sorted((tmp_path / "00000").glob("object-*.sqlite"))
    assert len(files) == 2 and all(str(os.getpid()) in f.name for f in files)
    model = FakeModel()
    _, tally = ask(ResultCache(tmp_path, "object", "m"), "00000", model, reqs)
    assert (model.calls, tally.replayed) == (0, 4)
    # A writer that is still working picks up the other's results on its next batch.
    model = FakeModel()
    _, tally = ask(a, "00000", model, reqs)
    assert (model.calls, tally.replayed) == (0, 4)


def test_results_survive_a_killed_writer(tmp_path):
    """SIGKILL right after the results were stored: everything answered before it is kept."""
    script = textwrap.dedent(f"""
        import asyncio, sys, time
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_result_cache import FakeModel, ask, request
        from annotate.engines.result_cache import ResultCache
        cache = ResultCache({str(tmp_path)!r}, "object", "m")
        ask(cache, "00000", FakeModel(), [request(text=f"region {{i}}", request_id=f"r{{i}}") for i in range(25)])
        print("stored", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "stored"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list((tmp_path / "00000").glob("*.sqlite-wal")), "the writer died before checkpointing (WAL kept)"
    assert count_stored(tmp_path / "00000") == 25
    model = FakeModel()
    _, tally = ask(ResultCache(tmp_path, "object", "m"), "00000", model,
                   [request(text=f"region {i}", request_id=f"r{i}") for i in range(25)])
    assert (model.calls, tally.replayed) == (0, 25)


def test_folder_removed_under_a_worker_fails_nothing(tmp_path, caplog):
    """The driver removes a committed shard's folder while a worker still holds it open."""
    cache = ResultCache(tmp_path, "object", "m")
    ask(cache, "00000", FakeModel(), [request(text="first")])
    remove_shard(tmp_path, "00000")
    assert not (tmp_path / "00000").exists()
    model = FakeModel()
    results, tally = ask(cache, "00000", model, [request(text="second"), request(text="first")])
    assert all(r.ok for r in results) and model.calls + tally.replayed == 2
    remove_shard(tmp_path, "00000")  # twice: nothing there is no error
    # A store whose folder cannot be made at all (a file stands in its way) still answers.
    (tmp_path / "00002").write_text("not a folder")
    model = FakeModel()
    results, tally = ask(ResultCache(tmp_path, "object", "m"), "00002", model, [request(text="x")] * 2)
    assert [r.ok for r in results] == [True, True] and model.calls == 2
    assert "result cache: cannot store" in caplog.text


def test_damaged_file_is_a_miss(tmp_path):
    ask(ResultCache(tmp_path, "object", "m"), "00000", FakeModel(), [request()])
    (tmp_path / "00000" / "object-elsewhere-1-deadbeef.sqlite").write_bytes(b"not a database" * 100)
    model = FakeModel()
    results, tally = ask(ResultCache(tmp_path, "object", "m"), "00000", model, [request(), request(text="new")])
    assert (model.calls, tally.replayed) == (1, 1) and all(r.ok for r in results)


def test_open_stores_are_bounded(tmp_path):
    cache = ResultCache(tmp_path, "object", "m", open_shards=2)
    for shard in ("00000", "00001", "00002"):
        ask(cache, shard, FakeModel(), [request()])
    assert list(cache.stores) == ["00001", "00002"]
    assert isinstance(cache.stores["00002"], ShardStore)
    cache.close()
    assert not list(tmp_path.glob("*/*.sqlite-wal")), "a closed writer checkpoints its WAL"


# ------------------------------------------------------------------------------------ whole run
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_rerun_replays_every_call_of_a_shard_lost_before_commit(ray_session, tiny_config, tmp_path, monkeypatch):
    """The driver dies between writing a shard's file and recording it (its manifest line is what
    makes it finished): the rerun sends no request to any model and writes the same records."""
    import pyarrow.parquet as pq
    from rich.console import Console

    from annotate.data.store import OutputStore
    from annotate.executor.progress import parse_calls
    from annotate.executor.runner import run_pipeline
    from bench.harness import SAMPLE_SHARDS

    class DriverDied(Exception):
        pass

    real_record = OutputStore.record

    def crash_on_final(self, entry):
        if entry["output"] == "final":
            raise DriverDied("the driver died before recording the shard")
        real_record(self, entry)

    out = tmp_path / "out"
    monkeypatch.setattr(OutputStore, "record", crash_on_final)
    first = io.StringIO()
    with pytest.raises(DriverDied):
        run_pipeline(tiny_config, SAMPLE_SHARDS, out, [0], console=Console(file=first, width=200))
    monkeypatch.setattr(OutputStore, "record", real_record)
    before = pq.read_table(out / "data" / "00000.parquet").to_pylist()
    asked = parse_calls(first.getvalue())
    assert set(asked) == {"object", "validate", "context", "merge"}, first.getvalue()[-2000:]
    stored = {stage: count_stored(out / "cache" / "00000", prefix=f"{stage}-") for stage in asked}

    second = io.StringIO()
    run_pipeline(tiny_config, SAMPLE_SHARDS, out, [0], console=Console(file=second, width=200))
    again = parse_calls(second.getvalue())
    assert set(again) == set(asked), second.getvalue()[-2000:]
    for stage, (calls, replayed) in again.items():
        # Every successful call of the first run is replayed; only its failed ones are asked again.
        assert replayed == stored[stage] > 0, (stage, again, stored)
        assert calls + replayed == asked[stage][0], (stage, again, asked)
    assert pq.read_table(out / "data" / "00000.parquet").to_pylist() == before
    shutil.rmtree(out)
