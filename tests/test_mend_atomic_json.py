"""One atomic writer for the store's small files (data/writer.atomic_file, store.write_json_atomic): run
records, frozen benchmarks, side files, the card and gallery pages appear whole or not at all, fsynced with
their folder, and a write that fails leaves the previous file and no temporary behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotate.data.store import OutputStore, json_bytes, write_bytes_atomic, write_json_atomic


@pytest.fixture
def fsynced(monkeypatch) -> list[Path]:
    """The paths os.fsync was called on (a file's path is its temporary's: it is fsynced before the rename)."""
    seen: list[Path] = []
    real_fsync = os.fsync

    def spy(fd):
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def _durable(path: Path, fsynced: list[Path]) -> bool:
    """`path`'s contents (its temporary) and its folder were fsynced, and no temporary is left."""
    folder = path.parent
    file_synced = any(p.parent == folder and p.name.startswith(f".{path.name}.") for p in fsynced)
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    return file_synced and folder in fsynced and not leftovers


def test_write_json_atomic_writes_a_whole_durable_shared_file(tmp_path, fsynced):
    path = tmp_path / "new" / "record.json"  # the folder is made when missing
    obj = {"b": 1, "a": [1, 2], "text": "ü"}
    assert write_json_atomic(path, obj, indent=2, sort_keys=True) == path
    assert path.read_bytes() == json_bytes(obj, indent=2, sort_keys=True) and json.loads(path.read_text()) == obj
    assert path.read_bytes().endswith(b"\n") and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert _durable(path, fsynced)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    write_json_atomic(path, {"run": 1})
    before = path.read_bytes()

    def chunks():
        yield b'{"run": '
        raise RuntimeError("the page generator broke")

    with pytest.raises(RuntimeError, match="broke"):
        write_bytes_atomic(path, chunks())
    with pytest.raises(TypeError):
        write_json_atomic(path, {"run": object()})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_the_run_record_is_written_atomically(tmp_path, fsynced):
    from annotate.executor.runner import RunSummary, _write_run_record

    store = OutputStore(tmp_path)
    _write_run_record(store, RunSummary(output_dir=tmp_path, stage="all"), "tiny.yaml", "f1ng3rpr1nt", {}, {})
    [path] = store.runs_dir.glob("*.json")
    record = json.loads(path.read_text())
    assert record["config"] == "f1ng3rpr1nt" and record["pipeline"] == "tiny.yaml" and record["stage"] == "all"
    assert _durable(path, fsynced)


def test_the_frozen_benchmark_is_written_atomically(tmp_path, fsynced):
    pytest.importorskip("skimage.data")
    from bench.train_data import write_pipeline_output

    from annotate.train.frozen import load_benchmark, make_benchmark

    out = write_pipeline_output(tmp_path / "out", side=32, copies=1)
    info = make_benchmark(out, n=3, seed=0)
    path = Path(info["benchmark"])
    assert _durable(path, fsynced)
    digest = load_benchmark(out).digest
    assert make_benchmark(out, n=3, seed=0) == info and load_benchmark(out).digest == digest  # a re-run: the same file
    with pytest.raises(ValueError, match="differs"):
        make_benchmark(out, n=3, seed=1)


def test_side_files_and_the_card_are_written_atomically(tmp_path, fsynced):
    store = OutputStore(tmp_path)
    scores = pa.table({"region_id": ["r0"], "score": [0.5]})
    side = store.write_side_file(store.region_text_scores_path, scores, by="test")
    assert store.region_text_scores() == {"r0": 0.5}
    assert json.loads(pq.read_schema(side).metadata[b"longgrit"])["by"] == "test"
    assert _durable(side, fsynced)
    store.write_card("final", title="atomic card")
    assert "# atomic card" in (tmp_path / "README.md").read_text() and _durable(tmp_path / "README.md", fsynced)


def test_a_gallery_page_that_fails_leaves_the_previous_page(tmp_path, monkeypatch, fsynced):
    from annotate import gallery

    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    index = gallery.write_gallery(out).index
    before = index.read_bytes()
    assert _durable(index, fsynced)

    def broken_index(pages, out_dir):
        yield "<html>half a page"
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(gallery, "_index_page", broken_index)
    with pytest.raises(RuntimeError, match="drawing failed"):
        gallery.write_gallery(out)
    assert index.read_bytes() == before
    assert not [p.name for p in index.parent.iterdir() if p.name.startswith(".")]


def test_the_trainer_fsyncs_its_latest_pointer_through_the_public_fsync_dir(tmp_path, fsynced):
    from annotate.train.trainer import _point_latest, latest_checkpoint

    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000010"
    checkpoint.mkdir(parents=True)
    _point_latest(checkpoint)
    assert latest_checkpoint(tmp_path / "run") == checkpoint and checkpoint.parent in fsynced
