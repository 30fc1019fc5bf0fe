"""A run's lineage without Ray: the models' identities (which read every weight file the first time) are
made only when a run needs them, once; what an earlier run changed is named per stage; a running
deployment of replaced weights is refused. A run whose shards are all finished returns before Ray."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from annotate.config import load_config
from annotate.data.records import ImageRecord
from annotate.data.store import FINAL, OutputStore, config_fingerprint
from annotate.data.writer import ShardWriter
from annotate.executor import relineage
from annotate.executor.relineage import RunLineage, lineage_counts, refuse_stale_deployments
from annotate.executor.runner import run_pipeline
from annotate.stages.lineage import LineageKey
from fixtures_pipeline import merge_prompt_changed
from bench.harness import SAMPLE_SHARDS, TINY


def _finish(store: OutputStore, output: str, shard: str, config: str, **line) -> None:
    """A one-image output of `shard`, committed with its `finished` manifest line."""
    writer = ShardWriter(store.output_path(output, shard))
    writer.add(ImageRecord(image_key="k", shard=shard, width=4, height=4, caption="done"))
    stats = writer.commit()
    store.record({"output": output, "shard": shard, "config": config, "sha256": stats.sha256, **stats.summary(), **line})


@pytest.fixture
def identified(monkeypatch) -> list[str]:
    """The models whose identity was asked for, in order (a fake identity: no weights read)."""
    calls: list[str] = []

    def fake_identity(model, console=None):
        calls.append(model.path)
        return {"path": model.path, "revision": None, "weights": "fake"}

    monkeypatch.setattr(relineage, "model_identity", fake_identity)
    return calls


@pytest.fixture
def shards(tmp_path) -> Path:
    src = tmp_path / "in"
    shutil.copytree(SAMPLE_SHARDS, src)
    return src


def test_a_stage_run_with_every_shard_finished_identifies_no_model(tmp_path, shards, monkeypatch):
    def no_identity(model, console=None):
        raise AssertionError(f"identified {model.path} for a run with nothing to do")

    monkeypatch.setattr(relineage, "model_identity", no_identity)
    cfg = load_config(TINY)
    store = OutputStore(tmp_path / "out")
    for shard in ("00000", "00001"):
        _finish(store, "validate", shard, config_fingerprint(cfg))
    summary = run_pipeline(cfg, shards, store.root, [0, 1], stage="validate")
    assert summary.shards_skipped == ["00000", "00001"] and summary.lineage == {}


def test_a_whole_chain_run_with_every_shard_finished_checks_their_lineage_once(tmp_path, shards, identified):
    """Finished dataset lines keep the chain's digest, and a model folder replaced under the same path
    changes it: the identities are needed to call them finished, made once for all shards."""
    cfg = load_config(TINY)
    digest = RunLineage(cfg).chain
    models = sorted({cfg.models[cfg.stages[s].model].path for s in cfg.stages})
    assert sorted(identified) == models
    identified.clear()
    store = OutputStore(tmp_path / "out")
    for shard in ("00000", "00001"):
        _finish(store, FINAL, shard, config_fingerprint(cfg), lineage=digest)
    summary = run_pipeline(cfg, shards, store.root, [0, 1], stage="all")
    assert summary.shards_skipped == ["00000", "00001"]
    assert sorted(identified) == models  # once per model, not once per shard


def test_finished_lines_without_a_lineage_identify_no_model(tmp_path, shards, identified):
    cfg = load_config(TINY)
    store = OutputStore(tmp_path / "out")
    for shard in ("00000", "00001"):
        _finish(store, FINAL, shard, config_fingerprint(cfg))  # a stage-by-stage run's lines: no digest
    summary = run_pipeline(cfg, shards, store.root, [0, 1], stage="all")
    assert summary.shards_skipped == ["00000", "00001"] and identified == []


def _key(digest: str, **parts: str) -> LineageKey:
    return LineageKey(digest, {"data": "d", "inputs": "i", "model": "m", "prompt": "p", "sampling": "s",
                               "params": "x", **parts})


def test_lineage_counts_name_what_changed_since_the_run_that_made_each_field(tmp_path):
    store = OutputStore(tmp_path / "out")
    writer = ShardWriter(store.output_path(FINAL, "00000"))
    record = ImageRecord.model_validate({
        "image_key": "k", "shard": "00000", "width": 4, "height": 4, "caption": "c",
        "regions": [{"region_id": f"00000:k:{i}", "region_index": i, "phrase": "a dog", "bbox": [0, 0, 2, 2],
                     "provenance": {"object": {"lineage": "o1"}, "merge": {"lineage": merge},
                                    "summarize": {"lineage": "s1"}}}
                    for i, merge in enumerate(["m-old", "m-lost"])]})
    writer.add(record)
    writer.commit()
    now = {"object": _key("o1"), "merge": _key("m2", prompt="p2")}
    records = [{"lineage_keys": {"merge": {"digest": "m-old", "parts": _key("m-old").parts}}}]
    counts = lineage_counts(store, [{"shard": "00000", "relineage": True}], now, records)
    assert counts["object"] == {"kept": 2, "recomputed": 0, "changed": []}
    assert counts["merge"] == {"kept": 0, "recomputed": 2, "changed": ["prompt", "unknown"]}  # m-lost: no record
    assert counts["summarize"]["changed"] == ["stage left the chain"]


def test_a_running_deployment_of_replaced_weights_is_refused():
    class App:
        deployed_now = False

    records = [{"model_identities": {"vlm": {"path": "/m", "weights": "a"}}}]
    refuse_stale_deployments(records, {"vlm": {"path": "/m", "weights": "a"}}, {"vlm": App()})
    with pytest.raises(RuntimeError, match="changed under the same path"):
        refuse_stale_deployments(records, {"vlm": {"path": "/m", "weights": "b"}}, {"vlm": App()})


def test_the_sam_model_is_identified_with_the_chains_models_when_the_pipeline_has_one(identified):
    from annotate.serving.apps import SEGMENT_MODEL

    cfg = load_config(TINY, {"segment": {"path": "tiny:sam"}})
    lineage = RunLineage(cfg)
    assert lineage.identities[SEGMENT_MODEL]["path"] == "tiny:sam" and "tiny:sam" in identified
    from annotate.stages.lineage import chain_lineage

    models = {key: identity for key, identity in lineage.identities.items() if key != SEGMENT_MODEL}
    assert lineage.keys == chain_lineage(cfg, models, lineage.identities[SEGMENT_MODEL]) != chain_lineage(cfg, models)


def test_a_stage_output_of_another_config_with_the_same_lineage_is_done(tmp_path, shards, identified):
    """`--stage context` after the merge prompt changed: context's output was made by the same data, models,
    prompts and settings through context (the same digest), so it is done and no model is deployed."""
    old, new = load_config(TINY), merge_prompt_changed(tmp_path)
    assert config_fingerprint(old) != config_fingerprint(new)
    assert RunLineage(old).through("context") == RunLineage(new).through("context")
    assert RunLineage(old).through("merge") != RunLineage(new).through("merge") == RunLineage(new).chain
    store = OutputStore(tmp_path / "out")
    for shard in ("00000", "00001"):
        _finish(store, "context", shard, config_fingerprint(old), lineage=RunLineage(old).through("context"))
    summary = run_pipeline(new, shards, store.root, [0, 1], stage="context")
    assert summary.shards_skipped == ["00000", "00001"]


def test_the_next_stage_reads_an_input_of_another_config_only_with_the_same_lineage(tmp_path, shards, identified):
    from annotate.data.store import prepare_fingerprint
    from annotate.executor.runner import plan_work
    from annotate.stages.chain import chain_of, stage_io

    old, new = load_config(TINY), merge_prompt_changed(tmp_path)
    through = RunLineage(new).of_output  # what run_pipeline gives plan_work
    store = OutputStore(tmp_path / "out")
    _finish(store, "context", "00000", config_fingerprint(old), lineage=RunLineage(old).through("context"))
    _finish(store, "context", "00001", config_fingerprint(old), lineage="another chain")  # e.g. another context model
    args = (new, store, shards)
    rest = (stage_io("merge", chain_of(new)), config_fingerprint(new), prepare_fingerprint(new), False, through)
    items, skipped = plan_work(*args, [0], *rest)
    assert [(i["shard"], i["input"]) for i in items] == [("00000", "context")] and skipped == []
    with pytest.raises(RuntimeError, match="run `annotate run --stage context`"):
        plan_work(*args, [1], *rest)
    # a line without a digest (made before lines kept one) is current under its own config only
    _finish(store, "context", "00000", config_fingerprint(old))
    with pytest.raises(RuntimeError, match="no finished `context` output"):
        plan_work(*args, [0], *rest)
