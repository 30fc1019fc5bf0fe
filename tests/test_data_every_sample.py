"""Every input sample appears in the output: an unusable one as a record with an image-level `error`
saying why (and its regions, if any, failed), never as nothing. Tar member names are never trusted
as paths: a sample under an unsafe name is a record with an error and nothing of it is read."""

from __future__ import annotations

import io
import json
import tarfile

import datasets
import pyarrow.parquet as pq
import pytest

import shardkit as sk
from annotate.config import TrainConfig
from annotate.data.prepare import ShardStats, prepare_shard, run_prepare
from annotate.data.records import ImageRecord, arrow_schema, row_to_image_record
from annotate.data.shards import ShardRef
from annotate.data.writer import write_dataset_card, write_parquet_atomic

CAP = "a red square on a gradient"
ENTRY = sk.entry(CAP, "a red square", [0.25, 0.25, 0.5, 0.75])
GOOD = sk.jpeg()


def _prepare(path, box_cfg, fmt="webdataset"):
    stats = ShardStats()
    return {p.record.image_key: p.record for p in prepare_shard(ShardRef(0, "00000", path, fmt), box_cfg, stats)}, stats


@pytest.mark.parametrize("name,why", [
    ("../x", "parent directory reference"), ("a/../../x", "parent directory reference"), ("/abs/x", "absolute path"),
    ("a\\..\\x", "backslash"), ("a\nb", "control character"),
])
def test_unsafe_member_names_are_records_with_an_error(tmp_path, box_cfg, name, why):
    members = [*sk.sample_members("before", GOOD, sk.meta(CAP, [ENTRY], "before")),
               *sk.sample_members(name, GOOD, sk.meta(CAP, [ENTRY], "x")),
               *sk.sample_members("after", GOOD, sk.meta(CAP, [ENTRY], "after"))]
    records, stats = _prepare(sk.write_tar(tmp_path / "00000.tar", members), box_cfg)
    assert len(records) == 3 and stats.damage is None and stats.image_errors == 1
    key, rec = list(records.items())[1]
    assert "/" not in key and "\\" not in key and "\n" not in key and key not in ("x", "")
    assert f"unsafe member name {name + '.jpg'!r}, {name + '.json'!r} ({why}" in rec.error
    assert rec.image_bytes is None and rec.regions == [] and rec.caption == ""  # nothing of it was read
    assert records["before"].error is None and records["after"].error is None


def test_links_and_special_members_are_records_with_an_error(tmp_path, box_cfg):
    m = sk.meta(CAP, [ENTRY], "s")
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, kind, link in (("sym.jpg", tarfile.SYMTYPE, "../../etc/passwd"), ("hard.jpg", tarfile.LNKTYPE, "sym.jpg"),
                                 ("fifo.jpg", tarfile.FIFOTYPE, ""), ("dev.jpg", tarfile.CHRTYPE, "")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            tar.addfile(info)
            sk_json = sk.sample_members(name.split(".")[0], None, m)[0]
            ji = tarfile.TarInfo(sk_json[0])
            ji.size = len(sk_json[1])
            tar.addfile(ji, io.BytesIO(sk_json[1]))
    records, stats = _prepare(path, box_cfg)
    assert list(records) == ["sym", "hard", "fifo", "dev"] and stats.damage is None
    for key, rec in records.items():
        assert rec.image_bytes is None and f"member '{key}.jpg' is a" in rec.error and "not followed" in rec.error
        assert [g.status for g in rec.regions] == ["failed"] and "not a regular file" in rec.regions[0].error
    assert "to '../../etc/passwd'" in records["sym"].error


@pytest.mark.parametrize("value,why", [
    (None, "ref_exps is null"), ("[[0, 5", "ref_exps is text that is not JSON"),
    ('{"a": 1}', "ref_exps is a dict, not a list"), (7, "ref_exps is a int, not a list"),
])
def test_unusable_ref_exps_leave_a_trace(tmp_path, box_cfg, value, why):
    m = {**sk.meta(CAP, [ENTRY], "k"), "ref_exps": value}
    records, stats = _prepare(sk.write_tar(tmp_path / "00000.tar", sk.sample_members("k", GOOD, m)), box_cfg)
    assert records["k"].error == why and records["k"].regions == [] and records["k"].image_bytes == GOOD
    assert stats.image_errors == 1 and any(why in p for p in stats.problems)


def test_an_empty_region_list_is_not_an_error(tmp_path, box_cfg):
    records, _ = _prepare(sk.write_tar(tmp_path / "00000.tar", sk.sample_members("k", GOOD, sk.meta(CAP, [], "k"))), box_cfg)
    assert records["k"].error is None and records["k"].regions == []


def test_parquet_rows_that_are_unusable_leave_a_trace(tmp_path, box_cfg):
    rows = [(GOOD, sk.meta(CAP, [ENTRY], "ok")), (None, sk.meta(CAP, [ENTRY], "gone", status="failed_to_download")),
            (b"<html>", sk.meta(CAP, [ENTRY], "html")), (GOOD, {**sk.meta(CAP, [], "null"), "ref_exps": None})]
    records, stats = _prepare(sk.write_parquet_shard(tmp_path / "00000.parquet", rows), box_cfg, "parquet")
    assert records["ok"].error is None
    assert records["gone"].error == "no image in the row (status: failed_to_download)"
    assert records["html"].error.startswith("image not decodable")
    assert records["null"].error == "ref_exps is null"
    assert stats.image_errors == 3 and stats.images == 4


def test_the_image_error_is_stored_and_loads(tmp_path, box_cfg, hostile_shard):
    assert "error" in arrow_schema().names  # ImageRecord.error, since schema 1.1
    path, expect = hostile_shard
    records = [p.record for p in prepare_shard(ShardRef(7, "00007", path, "webdataset"), box_cfg)]
    out = tmp_path / "OUT"
    stats = write_parquet_atomic(records, out / "data" / "00007.parquet")
    assert stats.image_errors == sum("record_error" in e for e in expect.values()) == stats.summary()["image_errors"]
    back = [row_to_image_record(r) for r in pq.read_table(out / "data" / "00007.parquet").to_pylist()]
    assert [r.error for r in back] == [r.error for r in records]
    write_dataset_card(out, "data/*.parquet")
    assert "`error`" in (out / "README.md").read_text()
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds["error"] == [r.error for r in records] and ds.features["error"] == datasets.Value("string")
    old = ImageRecord.model_validate({"image_key": "k", "shard": "0", "width": 1, "height": 1, "caption": ""})
    assert old.error is None  # rows written before 1.1 read back without one


def test_the_trainer_reads_records_with_errors(tmp_path, box_cfg, hostile_shard):
    from annotate.train.data import RegionDataset
    from annotate.train.text_cache import iter_region_texts

    path, _ = hostile_shard
    records = [p.record for p in prepare_shard(ShardRef(7, "00007", path, "webdataset"), box_cfg)]
    good = next(r for r in records if r.image_key == "good")
    good.regions[0].status, good.regions[0].fine_caption = "ok", "a red square in the middle"
    write_parquet_atomic(records, tmp_path / "OUT" / "data" / "00007.parquet")
    assert [t for _, t in iter_region_texts(tmp_path / "OUT")][:2] == [CAP, "a red square in the middle"]
    cfg = TrainConfig(eval_fraction=0.0, skip_mask_sources=[])
    ds = RegionDataset(tmp_path / "OUT", {"a red square in the middle"}, cfg, cache_dir=str(tmp_path / "hf"))
    assert [ref.image_key for ref in ds.refs] == ["good"]


def test_run_prepare_counts_image_errors(tmp_path, hostile_shard):
    path, expect = hostile_shard
    summary = run_prepare(str(path.parent), "7", str(tmp_path / "OUT"))
    n = sum("record_error" in e for e in expect.values())
    assert summary["image_errors"] == summary["shards"]["00007"]["image_errors"] == n
    assert summary["images"] == len(expect) and summary["damaged"] == {}


def test_text_no_utf8_file_can_hold_is_made_safe(tmp_path, box_cfg):
    """Member names that are not UTF-8 and json escapes that spell lone surrogates: writing either as
    is fails the whole shard's file. The name is %-escaped, the character replaced (spans stay right)."""
    cap = "a cat \ud800 on a mat"
    m = {**sk.meta("a cat x on a mat", [sk.entry("a cat x on a mat", "a mat", [0.1, 0.1, 0.9, 0.9])], "s"), "caption": cap}
    odd = b"\xff\xfek".decode("utf-8", "surrogateescape")
    members = [("s.jpg", GOOD), ("s.json", json.dumps(m).encode()), (odd + ".jpg", GOOD),
               (odd + ".json", json.dumps(sk.meta(CAP, [ENTRY], "odd")).encode())]
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records, stats = _prepare(path, box_cfg)
    assert list(records) == ["s", "%FF%FEk"] and stats.damage is None
    assert records["s"].caption == "a cat \ufffd on a mat" and records["s"].regions[0].phrase == "a mat"
    assert all(r.error is None for r in records.values())
    assert write_parquet_atomic(records.values(), tmp_path / "out.parquet").rows == 2
