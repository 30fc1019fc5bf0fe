"""Colliding keys: every input sample gets a unique key, the same for the same shard bytes; a repeated
key is renamed and annotated (it most often names another image), never dropped, never a crash; only
a byte-identical repeat is kept out of the chain, with a record that says so."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

import shardkit as sk
from annotate.data.prepare import ShardStats, prepare_shard, run_prepare
from annotate.data.shards import ShardRef
from annotate.data.writer import write_parquet_atomic

CAP = "a red square on a gradient"
ENTRY = sk.entry(CAP, "a red square", [0.25, 0.25, 0.5, 0.75])


def _sample(key: str, seed: int) -> tuple[str, bytes, dict]:
    return key, sk.jpeg(sk.photo(seed=seed)), sk.meta(CAP, [ENTRY], key)


# (shard's keys in order, the keys they must get); each sample is another image unless noted
ORDERS = {
    "genuine @2 later": (["k1", "k1", "k1@2"], ["k1", "k1@2", "k1@2@2"]),
    "genuine @2 earlier": (["k1@2", "k1", "k1"], ["k1@2", "k1", "k1@3"]),
    "three and a genuine @3": (["k1", "k1", "k1@3", "k1"], ["k1", "k1@2", "k1@3", "k1@4"]),
    "apart": (["k1", "k2", "k1", "k2", "k1"], ["k1", "k2", "k1@2", "k2@2", "k1@3"]),
    "renamed twice over": (["a", "a", "a@2", "a@2", "a@2@2"], ["a", "a@2", "a@2@2", "a@2@3", "a@2@2@2"]),
}


def _shard(tmp_path, keys: list[str], fmt: str):
    samples = [_sample(k, i) for i, k in enumerate(keys)]
    if fmt == "webdataset":
        members = [m for k, img, meta in samples for m in sk.sample_members(k, img, meta, txt=CAP)]
        path = sk.write_tar(tmp_path / "00000.tar", members)
    else:
        path = sk.write_parquet_shard(tmp_path / "00000.parquet", [(img, meta) for _, img, meta in samples])
    return ShardRef(0, "00000", path, fmt)


def _prepare(ref, box_cfg):
    stats = ShardStats()
    return [p.record for p in prepare_shard(ref, box_cfg, stats)], stats


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
@pytest.mark.parametrize("order", list(ORDERS))
def test_colliding_keys_are_unique_stable_and_annotated(tmp_path, box_cfg, fmt, order):
    keys, expected = ORDERS[order]
    ref = _shard(tmp_path, keys, fmt)
    records, stats = _prepare(ref, box_cfg)
    assert [r.image_key for r in records] == expected
    assert [r.image_key for r in _prepare(ref, box_cfg)[0]] == expected  # stable: same bytes, same keys
    for r in records:  # another image under a repeated key goes through the chain like any other
        assert r.error is None and [g.status for g in r.regions] == ["pending"], r.image_key
    ids = [g.region_id for r in records for g in r.regions]
    assert len(ids) == len(set(ids)) == len(keys)
    assert sum("renamed" in p for p in stats.problems) == sum(a != b for a, b in zip(keys, expected))
    written = write_parquet_atomic(records, tmp_path / "out" / "00000.parquet")  # no "written twice"
    assert written.rows == len(keys) and stats.damage is None


def test_annotate_prepare_does_not_crash_on_colliding_keys(tmp_path):
    """The issue's case: `k1`, `k1` again for another image, and a genuine `k1@2`."""
    ref = _shard(tmp_path / "in", ["k1", "k1", "k1@2"], "webdataset")
    summary = run_prepare(str(ref.path.parent), "0", str(tmp_path / "OUT"))
    table = pq.read_table(tmp_path / "OUT" / "stages" / "prepare" / "00000.parquet")
    assert sorted(table.column("image_key").to_pylist()) == ["k1", "k1@2", "k1@2@2"]
    assert summary["shards"]["00000"]["images"] == 3 and summary["totals"]["pending"] == 3
    assert summary["damaged"] == {}


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_an_exact_copy_is_recorded_not_annotated_twice(tmp_path, box_cfg, fmt):
    k, img, meta = _sample("k1", 0)
    other = _sample("k1", 1)
    if fmt == "webdataset":
        members = [*sk.sample_members(k, img, meta), *sk.sample_members(*other), *sk.sample_members(k, img, meta)]
        ref = ShardRef(0, "00000", sk.write_tar(tmp_path / "00000.tar", members), fmt)
    else:
        path = sk.write_parquet_shard(tmp_path / "00000.parquet", [(img, meta), other[1:], (img, meta)])
        ref = ShardRef(0, "00000", path, fmt)
    records, stats = _prepare(ref, box_cfg)
    assert [r.image_key for r in records] == ["k1", "k1@2", "k1@3"]
    assert records[1].error is None and records[1].regions[0].status == "pending"
    copy = records[2]
    assert copy.error == "exact copy of sample 'k1' (same key, image and json)"
    assert [g.status for g in copy.regions] == ["failed"] and copy.regions[0].error.startswith("duplicate: exact copy")
    assert stats.image_errors == 1


def test_repeated_parts_split_samples_in_a_tar(tmp_path, box_cfg):
    """k1.jpg k1.json k1.jpg k1.json: the same part twice starts another sample with the same key."""
    a, b = _sample("k1", 0), _sample("k1", 1)
    path = sk.write_tar(tmp_path / "00000.tar", [*sk.sample_members(*a), *sk.sample_members(*b)])
    records, _ = _prepare(ShardRef(0, "00000", path, "webdataset"), box_cfg)
    assert [r.image_key for r in records] == ["k1", "k1@2"]
    assert records[0].image_bytes == a[1] and records[1].image_bytes == b[1]
