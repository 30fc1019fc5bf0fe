"""The output contract: OUT/data/*.parquet + OUT/README.md load with `datasets` both ways; the
bundled sample shards; `annotate prepare`."""

from __future__ import annotations

import hashlib
import io
import tarfile

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from annotate.data.masks import decode_rle
from annotate.data.prepare import prepare_shard
from annotate.data.records import arrow_schema, row_to_image_record
from annotate.data.shards import find_shards
from annotate.data.writer import status_counts, write_dataset_card, write_parquet_atomic


@pytest.fixture
def written(tmp_path, hostile_shard, box_cfg):
    path, _ = hostile_shard
    (ref,) = find_shards(path.parent, [7])
    records = [p.record for p in prepare_shard(ref, box_cfg)]
    out = tmp_path / "OUT"
    stats = write_parquet_atomic(iter(records), out / "data" / "00007.parquet")
    (out / "logs").mkdir()
    (out / "logs" / "run.jsonl").write_text('{"not": "data"}\n')
    (out / "manifest.json").write_text("{}")
    write_dataset_card(out, "data/*.parquet", shards=["00007"])
    return out, records, stats


def test_write_stats_and_atomicity(written):
    out, records, stats = written
    path = out / "data" / "00007.parquet"
    assert stats.rows == len(records) and stats.status == status_counts(records)
    assert stats.regions == stats.status["regions_in"]
    assert stats.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(p.name for p in (out / "data").iterdir()) == ["00007.parquet"]  # no temp left
    table = pq.read_table(path)
    assert table.schema.equals(arrow_schema(), check_metadata=False)
    back = [row_to_image_record(r) for r in table.to_pylist()]
    assert [_rounded(r.model_dump()) for r in back] == [_rounded(r.model_dump()) for r in records]


def _rounded(x):
    """bbox and score are float32 in the file: compare at that precision."""
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def test_failed_write_leaves_nothing(tmp_path, written):
    _, records, _ = written

    def boom():
        yield records[0]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_parquet_atomic(boom(), tmp_path / "x" / "00000.parquet")
    assert list((tmp_path / "x").iterdir()) == []


def test_empty_shard_writes_a_valid_file(tmp_path):
    stats = write_parquet_atomic([], tmp_path / "e.parquet")
    assert stats.rows == 0 and pq.read_table(tmp_path / "e.parquet").num_rows == 0


def _check_dataset(ds, records):
    assert len(ds) == len(records)
    for row, rec in zip(ds, records):
        assert row["image_key"] == rec.image_key
        if rec.image_bytes is None:
            assert row["image"] is None
            continue
        assert isinstance(row["image"], Image.Image)
        assert row["image"].size == (rec.width, rec.height)
        for r in row["regions"]:
            if r["mask"] is not None:
                assert decode_rle(r["mask"]).shape == (rec.height, rec.width)


def test_loads_with_datasets_both_ways(written, tmp_path):
    out, records, _ = written
    cache = str(tmp_path / "hf-cache")
    by_files = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train", cache_dir=cache)
    by_folder = datasets.load_dataset(str(out), split="train", cache_dir=cache)
    for ds in (by_files, by_folder):
        _check_dataset(ds, records)
    assert by_folder.features["image"] == datasets.Image()


def test_sample_shards_are_small_real_and_reproducible(sample_dir, tmp_path):
    from annotate.data.sample import build

    shipped = sorted(sample_dir.glob("*.tar"))
    assert [p.name for p in shipped] == ["00000.tar", "00001.tar"]
    assert sum(p.stat().st_size for p in sample_dir.rglob("*") if p.is_file()) < 1_000_000
    rebuilt = build(tmp_path)
    for a, b in zip(shipped, rebuilt):
        assert a.read_bytes() == b.read_bytes(), f"{a} differs from a fresh build: run python -m annotate.data.sample"
    with tarfile.open(shipped[0]) as tar:
        jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
        assert 3 <= len(jpgs) <= 5
        img = Image.open(io.BytesIO(tar.extractfile(jpgs[0]).read()))
        assert img.format == "JPEG" and max(img.size) <= 384
        assert np.asarray(img).std() > 20  # a photograph, not a flat test card


def test_cli_prepare_on_the_sample(sample_dir, tmp_path):
    from annotate.cli import app

    out = tmp_path / "OUT"
    result = CliRunner().invoke(app, ["prepare", "--input", str(sample_dir), "--shards", "0-1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "stages" / "prepare").iterdir()) == ["00000.parquet", "00001.parquet"]
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 8
    for row in ds:
        assert 2 <= len(row["regions"]) <= 4 and isinstance(row["image"], Image.Image)
        for r in row["regions"]:
            assert r["status"] == "pending" and r["mask_source"] in ("grabcut", "box")
            assert r["phrase"] and r["phrase"] in row["caption"]
            m = decode_rle(r["mask"])
            assert m.shape == (row["height"], row["width"]) and m.any()
    bad = CliRunner().invoke(app, ["prepare", "--input", str(sample_dir), "--shards", "0-3", "--output", str(out)])
    assert bad.exit_code != 0 and "00002, 00003" in str(bad.exception)
