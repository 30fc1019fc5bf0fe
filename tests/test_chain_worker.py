"""The chain worker (executor/workers.py): one Ray Data actor runs every stage of the chain over a batch
of images. Run here without Ray: its deployment handles are stand-ins (test_deadline.py's `FakeHandle`
shape) and its tracker a recorder, so what is checked is the worker's own logic: each record parsed
and its image decoded once per batch, the stages in chain order over the same records, each stage's
counts reported, and one in-flight limit per model shared by the stages that call it."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest

import annotate.executor.workers as workers
from annotate.config import DataConfig, MaskConfig, load_config
from annotate.data.prepare import prepare_shard
from annotate.data.shards import find_shards
from annotate.engines.postprocess import finish
from annotate.executor.shard_io import record_to_row
from annotate.executor.workers import ChainWorker, StepSpec
from annotate.serving.apps import ModelApp
from annotate.serving.client import ModelClient

from bench.harness import SAMPLE_SHARDS, TINY

# Keyed by a phrase of each stage's system prompt (prompts/object.yaml, validate.yaml, context.yaml).
ANSWERS = {"visual annotator": ("object", "A red ceramic mug with a curved handle and a glossy glaze."),
           "check image annotations": ("validate", '{"reason": "The caption fits the phrase.", "consistent": true}'),
           "spatial reasoning": ("context", "It stands on a wooden table beside a window in a bright kitchen.")}
CHAIN = ("object", "validate", "context")


class CountingHandle:
    """A deployment handle whose `chat.remote(request)` answers after a short wait, keeping the most
    requests it ever had in flight at once."""

    def __init__(self):
        self.in_flight = self.most = 0
        self.sent: list[tuple[str, str]] = []
        self.chat = self

    def remote(self, request):
        return self._answer(request)

    async def _answer(self, request):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.sent.append((_stage_of(request), request.request_id))
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        return answer(request)


def _stage_of(request) -> str:
    return next(stage for key, (stage, _) in ANSWERS.items() if key in str(request.messages[0]))


def answer(request):
    """The canned answer of the stage whose system prompt the request carries."""
    text = next(text for key, (_, text) in ANSWERS.items() if key in str(request.messages[0]))
    return finish(request.request_id, text, "stop", json_schema=request.json_schema, reasoning_model=False,
                  prompt_tokens=50, completion_tokens=12)


class Tracker:
    def __init__(self):
        self.reports: list[tuple[str, dict]] = []
        self.report = self

    async def remote(self, stage, counts):
        self.reports.append((stage, counts))


@pytest.fixture
def batch():
    data = DataConfig(masks=MaskConfig(source="box"))
    records = [p.record for shard in find_shards(SAMPLE_SHARDS, [0]) for p in prepare_shard(shard, data)]
    records = [r for r in records if r.image_bytes and any(g.status == "pending" for g in r.regions)][:3]
    assert len(records) == 3
    return data, pa.Table.from_pylist([record_to_row(r, 3) for r in records])


def _worker(cfg, data, shares, handles, monkeypatch, tracker=None):
    monkeypatch.setattr(workers, "ModelClient",
                        lambda app, *a, **k: ModelClient(app, *a, **k, handle=handles[app.model_name]))
    steps = [StepSpec(name, cfg.stages[name], _app(cfg.stages[name].model), cfg.models[cfg.stages[name].model])
             for name in CHAIN]
    return ChainWorker(steps, shares, data, tracker or Tracker())


def test_one_worker_runs_the_stages_in_order_over_records_parsed_and_decoded_once(batch, monkeypatch):
    data, table = batch
    cfg = load_config(TINY)
    assert [cfg.stages[s].model for s in CHAIN] == ["vlm", "llm", "vlm"]  # object and context share a model
    handles = {"vlm": CountingHandle(), "llm": CountingHandle()}
    parsed, decoded = [], []
    monkeypatch.setattr(workers, "row_to_record", lambda row, f=workers.row_to_record: parsed.append(1) or f(row))
    monkeypatch.setattr(workers, "decode_or_none", lambda r, d, f=workers.decode_or_none: decoded.append(1) or f(r, d))
    tracker = Tracker()
    worker = _worker(cfg, data, {"vlm": 3, "llm": 3}, handles, monkeypatch, tracker)
    out = asyncio.run(worker(table)).to_pylist()

    assert len(parsed) == len(decoded) == 3  # once per record, for all three stages
    regions = [g for row in out for g in workers.row_to_record(row).regions if g.object_caption]
    assert len(regions) > 3 and all(g.validation.consistent and g.context_caption == ANSWERS["spatial reasoning"][1]
                                    for g in regions), regions[0]
    assert [stage for stage, _ in tracker.reports] == list(CHAIN)
    assert all(c["regions_in"] == c["done"] == c["model_calls"] == len(regions) and not c["failed"]
               for _, c in tracker.reports)
    # every object request went out before any context request on the shared model: the stages ran in order
    assert [stage for stage, _ in handles["vlm"].sent] == ["object"] * len(regions) + ["context"] * len(regions)
    assert 1 < handles["vlm"].most <= 3  # concurrent, and never over the model's share


def test_stages_on_one_model_share_its_limit(batch, monkeypatch):
    """Batches in flight at different stages of the same model still send at most its share."""
    data, table = batch
    handles = {"vlm": CountingHandle(), "llm": CountingHandle()}
    worker = _worker(load_config(TINY), data, {"vlm": 2, "llm": 1}, handles, monkeypatch)

    async def three_batches():
        await asyncio.gather(worker(table), worker(table.slice(0, 2)), worker(table.slice(1, 2)))

    asyncio.run(three_batches())
    sent = [stage for stage, _ in handles["vlm"].sent]
    assert sent.count("context") == sent.count("object") > 0
    assert handles["vlm"].most == 2 and handles["llm"].most == 1


def _app(model: str) -> ModelApp:
    return ModelApp(model_name=model, app_name=f"longgrit-{model}-0", deployment_name=f"{model}-hf", kind="hf",
                    max_in_flight=64, unavailable_timeout_s=5, model_id=model)


def test_the_direct_side_runs_the_same_chain_function_to_the_same_records(batch, monkeypatch):
    """`run_chain` with `direct_links` (the benchmark's in-process side, batch calls) and the chain worker
    (served models, one request per region) leave the same fields in the same records."""
    from annotate.stages.chain import direct_links, run_chain

    data, table = batch
    cfg = load_config(TINY)
    handles = {"vlm": CountingHandle(), "llm": CountingHandle()}
    served = [workers.row_to_record(row) for row in asyncio.run(_worker(cfg, data, {"vlm": 3, "llm": 3}, handles,
                                                                          monkeypatch)(table)).to_pylist()]
    batches: list[tuple[str, int]] = []

    def chat(model):
        def call(requests):
            batches.append((model, len(requests)))
            return [answer(request) for request in requests]
        return call

    records = [workers.row_to_record(row) for row in table.to_pylist()]
    totals = asyncio.run(run_chain(direct_links(cfg, chat, CHAIN), records,
                                   lambda record: workers.decode_or_none(record, data)))
    assert list(totals) == list(CHAIN) and all(c.done == c.regions_in > 3 and not c.failed for c in totals.values())
    assert [model for model, _ in batches] == ["vlm", "llm", "vlm"]  # one batch call per stage for 3 images
    fields = ("status", "object_caption", "validation", "context_caption")
    assert [[tuple(getattr(g, f) for f in fields) for g in r.regions] for r in records] == \
        [[tuple(getattr(g, f) for f in fields) for g in r.regions] for r in served]
