"""The manifest's rules, without Ray: the newest line for a shard wins, a file whose checksum no longer
matches its line is redone, a `damaged` line never counts as finished, and `plan_work` follows them."""

from __future__ import annotations

import shutil
from pathlib import Path

from annotate.config import load_config
from annotate.data.records import ImageRecord, RegionRecord
from annotate.data.writer import ShardWriter
from annotate.data.store import DAMAGED, FINAL, OutputStore, config_fingerprint, prepare_fingerprint
from annotate.executor.runner import plan_work
from annotate.stages.chain import reset_for_retry, stage_io
from annotate.stages.lineage import chain_digest
from bench.harness import SAMPLE_SHARDS, TINY


def _write(layout: OutputStore, output: str, shard: str, config: str, caption: str, **line) -> dict:
    """A one-image output file for `shard`, renamed into place, and its manifest line."""
    writer = ShardWriter(layout.output_path(output, shard))
    writer.add(ImageRecord(image_key="k", shard=shard, width=4, height=4, caption=caption))
    stats = writer.commit()
    entry = {"output": output, "shard": shard, "config": config, "sha256": stats.sha256, **stats.summary(), **line}
    layout.record(entry)
    return entry


def test_newest_line_wins_across_configs(tmp_path):
    layout = OutputStore(tmp_path)
    _write(layout, FINAL, "00000", "X", "made under X")
    assert set(layout.finished(FINAL, "X")) == {"00000"}
    _write(layout, FINAL, "00000", "Y", "made under Y")  # the file now holds Y's output
    _write(layout, FINAL, "00001", "X", "made under X")
    # X again: the old X line of 00000 must not make Y's file count as X's output
    assert set(layout.finished(FINAL, "X")) == {"00001"}
    assert set(layout.finished(FINAL, "Y")) == {"00000"}


def test_a_file_changed_since_its_line_is_redone(tmp_path):
    layout = OutputStore(tmp_path)
    _write(layout, FINAL, "00000", "X", "a")
    _write(layout, FINAL, "00001", "X", "b")
    path = layout.output_path(FINAL, "00001")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    assert set(layout.finished(FINAL, "X")) == {"00000"}
    layout.output_path(FINAL, "00000").write_bytes(b"")  # truncated to nothing
    assert layout.finished(FINAL, "X") == {}


def test_a_damaged_line_is_never_finished(tmp_path):
    layout = OutputStore(tmp_path)
    _write(layout, FINAL, "00000", "X", "whole")
    _write(layout, FINAL, "00000", "X", "part", state=DAMAGED, damage="truncated tar", samples_read=1)
    assert layout.finished(FINAL, "X") == {}
    assert layout.damaged(FINAL, "X")["00000"]["damage"] == "truncated tar"


def _shards(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    shutil.copytree(SAMPLE_SHARDS, src)
    return src


def test_plan_redoes_damaged_and_mismatched_shards_and_carries_damage_downstream(tmp_path):
    cfg = load_config(TINY)
    fp, prepared = config_fingerprint(cfg), prepare_fingerprint(cfg)
    layout = OutputStore(tmp_path / "out")
    src = _shards(tmp_path)
    _write(layout, FINAL, "00000", fp, "done")
    _write(layout, "prepare", "00001", fp, "part", state=DAMAGED, damage="truncated tar", samples_read=1)
    items, skipped = plan_work(cfg, layout, src, [0, 1], stage_io("all"), fp, prepared, retry_failed=False)
    assert skipped == ["00000"]
    assert [(i["shard"], i["needs_prepare"]) for i in items] == [("00001", True)]  # damaged prepare: read again

    # a later stage uses a damaged input (what could be read) and carries its damage on
    _write(layout, "object", "00001", fp, "part", state=DAMAGED, damage="truncated tar", samples_read=1)
    items, _ = plan_work(cfg, layout, src, [1], stage_io("validate"), fp, prepared, retry_failed=False)
    assert items[0]["damage"] == {"damage": "truncated tar", "samples_read": 1}
    assert not items[0]["needs_prepare"]


def _region(error: str | None, status: str, **fields) -> RegionRecord:
    return RegionRecord(region_id="s:k:0", region_index=0, phrase="a dog", bbox=[0, 0, 2, 2], status=status,
                        error=error, **fields)


def test_retry_failed_resets_pipeline_errors_from_where_the_region_stopped():
    stopped = _region("pipeline: the region was not completed by any stage (internal error)", "failed",
                      object_caption="a dog", context_caption="kept?")
    model = _region("merge: timeout", "failed", object_caption="a dog", fine_caption="partial")
    data_plane = _region("mask: mask is empty", "failed")
    record = ImageRecord(image_key="k", shard="s", width=4, height=4, caption="", regions=[stopped, model, data_plane])
    assert reset_for_retry(record) == 2
    assert stopped.status == "pending" and stopped.error is None
    assert stopped.object_caption == "a dog"  # the stage that finished is kept
    assert stopped.validation is None and stopped.context_caption is None  # from the first missing field on
    assert model.status == "pending" and model.object_caption == "a dog" and model.fine_caption is None
    assert data_plane.status == "failed"


def test_annotate_prepare_writes_the_store_that_annotate_run_resumes(tmp_path):
    """`annotate prepare` commits each shard through the store with its manifest line, under the
    pipeline's fingerprint: a run with the same config takes those outputs instead of reading the
    shards again, and a second `prepare` skips them."""
    from annotate.data.prepare import run_prepare
    from annotate.data.store import FINISHED, PREPARE

    src, out = _shards(tmp_path), tmp_path / "out"
    first = run_prepare(str(src), "0-1", str(out), str(TINY))
    assert sorted(first["shards"]) == ["00000", "00001"] and first["skipped"] == []
    cfg = load_config(TINY)
    fp, prepared = config_fingerprint(cfg), prepare_fingerprint(cfg)
    store = OutputStore(out)
    lines = store.finished(PREPARE, prepare_fingerprint(cfg))  # keyed by the data settings alone
    assert sorted(lines) == ["00000", "00001"] and not store.finished(PREPARE, fp)
    assert all(store.is_current(line, prepare_fingerprint(cfg), FINISHED) for line in lines.values())
    items, skipped = plan_work(cfg, store, src, [0, 1], stage_io("all"), fp, prepared, retry_failed=False)
    assert skipped == [] and [(i["shard"], i["needs_prepare"], i["input"]) for i in items] == [
        ("00000", False, PREPARE), ("00001", False, PREPARE)]
    again = run_prepare(str(src), "0-1", str(out), str(TINY))
    assert again["shards"] == {} and again["skipped"] == ["00000", "00001"]
    assert len(store.manifest()) == 2  # nothing recorded twice
    import datasets

    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))  # the card points at them
    assert len(ds) == first["images"]


def test_a_run_redoes_a_shard_whose_source_was_replaced(tmp_path):
    """A prepared shard whose source file changed since (a re-download) is prepared again by the run;
    the other one is taken from the store. A single later stage refuses it, naming what to do."""
    import os

    import pytest

    from annotate.data.prepare import run_prepare
    from annotate.data.store import PREPARE

    src, out = _shards(tmp_path), tmp_path / "out"
    run_prepare(str(src), "0-1", str(out), str(TINY))
    replaced = src / "00001.tar"
    replaced.write_bytes(replaced.read_bytes() + b"\0" * 1024)  # same samples, another file
    os.utime(replaced, ns=(replaced.stat().st_atime_ns, replaced.stat().st_mtime_ns + 10**9))
    cfg = load_config(TINY)
    fp, prepared = config_fingerprint(cfg), prepare_fingerprint(cfg)
    items, _ = plan_work(cfg, OutputStore(out), src, [0, 1], stage_io("all"), fp, prepared, retry_failed=False)
    assert [(i["shard"], i["needs_prepare"], i["input"]) for i in items] == [
        ("00000", False, PREPARE), ("00001", True, PREPARE)]
    with pytest.raises(RuntimeError, match="changed since it was prepared"):
        plan_work(cfg, OutputStore(out), src, [1], stage_io("validate"), fp, prepared, retry_failed=False)


def test_a_whole_chain_rerun_under_another_config_reuses_the_dataset_by_lineage(tmp_path):
    """A dataset shard finished under another config is the input of a whole-chain run given lineage
    keys, when its prepared regions are still current and its rows are of this schema; otherwise (no
    keys: a single stage; or an older schema) the shard is made from `prepare` as before."""
    cfg = load_config(TINY)
    fp, prepared = config_fingerprint(cfg), prepare_fingerprint(cfg)
    layout = OutputStore(tmp_path / "out")
    src = _shards(tmp_path)
    for shard in ("00000", "00001"):
        _write(layout, "prepare", shard, prepared, "regions")
        _write(layout, FINAL, shard, "an-earlier-config", "described")
    old = layout.output_path(FINAL, "00001")  # a file of the previous schema: not reused
    records = [ImageRecord(image_key="k", shard="00001", width=4, height=4, caption="c", schema_version="1.2")]
    writer = ShardWriter(old)
    writer.add(records[0])
    stats = writer.commit()
    layout.record({"output": FINAL, "shard": "00001", "config": "an-earlier-config", "sha256": stats.sha256,
                   **stats.summary()})

    keys = {"object": "o", "validate": "v", "context": "c", "merge": "m"}
    current = lambda output: chain_digest(keys)  # noqa: E731 (the run's digest through the stage writing `output`)
    items, skipped = plan_work(cfg, layout, src, [0, 1], stage_io("all"), fp, prepared, retry_failed=False, lineage=current)
    assert skipped == []
    assert [(i["shard"], i["relineage"], i["input"], i["needs_prepare"]) for i in items] == [
        ("00000", True, FINAL, False), ("00001", False, "prepare", False)]
    items, _ = plan_work(cfg, layout, src, [0], stage_io("all"), fp, prepared, retry_failed=False)  # no keys given
    assert [(i["relineage"], i["input"]) for i in items] == [(False, "prepare")]
    _write(layout, "prepare", "00000", "other-data-settings", "regions")  # the data settings changed
    items, _ = plan_work(cfg, layout, src, [0], stage_io("all"), fp, prepared, retry_failed=False, lineage=current)
    assert [(i["relineage"], i["needs_prepare"]) for i in items] == [(False, True)]


def test_a_finished_shard_of_this_config_but_another_lineage_is_made_again_by_lineage(tmp_path):
    """The config fingerprint does not cover a model folder's contents: a dataset line keeps the chain's
    lineage digest, and a shard finished under this config with another digest is reused by lineage,
    not skipped; with the same digest (or none: a line of a stage-by-stage run) it is finished."""
    cfg = load_config(TINY)
    fp, prepared = config_fingerprint(cfg), prepare_fingerprint(cfg)
    layout = OutputStore(tmp_path / "out")
    src = _shards(tmp_path)
    keys = {"object": "o", "validate": "v", "context": "c", "merge": "m"}
    current = lambda output: chain_digest(keys)  # noqa: E731 (the run's digest through the stage writing `output`)
    for shard, lineage in (("00000", chain_digest({**keys, "context": "c-old-weights"})), ("00001", chain_digest(keys))):
        _write(layout, "prepare", shard, prepared, "regions")
        _write(layout, FINAL, shard, fp, "described", lineage=lineage)
    _write(layout, "prepare", "00002", prepared, "regions")
    _write(layout, FINAL, "00002", fp, "described")  # no lineage kept
    shutil.copy(src / "00001.tar", src / "00002.tar")
    items, skipped = plan_work(cfg, layout, src, [0, 1, 2], stage_io("all"), fp, prepared, retry_failed=False, lineage=current)
    assert [(i["shard"], i["relineage"]) for i in items] == [("00000", True)] and skipped == ["00001", "00002"]
