"""Shard specs, shard discovery and streaming samples out of tar and parquet shards."""

from __future__ import annotations

import os
import threading

import pytest

import shardkit as sk
from annotate.config import ImageConfig
from annotate.data.shards import ShardRef, find_shards, iter_samples, parse_shard_spec


def test_parse_shard_spec():
    assert parse_shard_spec("0-3,7,5-6,2") == [0, 1, 2, 3, 5, 6, 7]
    assert parse_shard_spec(" 12 ") == [12]


@pytest.mark.parametrize("bad,msg", [("5-2", "before start"), ("x", "bad shard spec"), ("", "empty"),
                                     ("-3", "bad shard spec"), ("1,,2", "bad shard spec"), ("1-", "bad")])
def test_parse_shard_spec_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_shard_spec(bad)


def test_find_shards(tmp_path):
    sk.write_tar(tmp_path / "00000.tar", [])
    sk.write_parquet_shard(tmp_path / "00001.parquet", [])
    refs = find_shards(tmp_path, [0, 1])
    assert [(r.name, r.format) for r in refs] == [("00000", "webdataset"), ("00001", "parquet")]
    with pytest.raises(FileNotFoundError, match=r"00002, 00005.*00000.tar, 00001.parquet"):
        find_shards(tmp_path, [0, 2, 5])
    with pytest.raises(FileNotFoundError, match="00000"):
        find_shards(tmp_path, [0], fmt="parquet")


def _key_list(samples):
    return [s.key for s in samples]


def test_tar_samples_grouping_and_hostile_members(hostile_shard):
    path, expect = hostile_shard
    problems: list[str] = []
    samples = list(iter_samples(ShardRef(7, "00007", path, "webdataset"), ImageConfig(), problems))
    assert _key_list(samples) == list(expect)
    assert any("README" in p and "not KEY.EXT" in p for p in problems)
    by_key = {s.key: s for s in samples}
    evil = by_key["..%2F..%2Fetc%2Fevil"]
    assert evil.meta is None and evil.image_bytes is None and "'../../etc/evil.json'" in evil.error
    assert by_key["jsononly"].image_bytes is None and by_key["jsononly"].image_error == "no image in the sample"
    assert by_key["imageonly"].meta is None and by_key["imageonly"].meta_error == "no json beside the image"
    assert by_key["good@2"].duplicate_of == "good" and by_key["good"].duplicate_of is None
    assert by_key["good@2"].copy_of == "good" and by_key["good"].copy_of is None
    assert by_key["good"].text == "a red square on a gradient"


def test_tar_payload_over_max_bytes_is_not_read(tmp_path):
    big = sk.jpeg(sk.photo(200, 200))
    path = sk.write_tar(tmp_path / "00000.tar", sk.sample_members("k", big, sk.meta("c", [])))
    (s,) = iter_samples(ShardRef(0, "00000", path, "webdataset"), ImageConfig(max_bytes=len(big) - 1))
    assert s.image_bytes is None and any("max_bytes" in p for p in s.problems)


def test_tar_is_streamed_from_a_pipe(tmp_path):
    """A FIFO cannot seek: reading it works only if the tar is streamed (mode "r|*")."""
    members = []
    for i in range(5):
        members += sk.sample_members(f"{i:03d}", sk.jpeg(), sk.meta("c", [], f"{i:03d}"))
    src = sk.write_tar(tmp_path / "src.tar", members)
    fifo = tmp_path / "fifo" / "00003.tar"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(src.read_bytes()), daemon=True)
    writer.start()
    try:
        (ref,) = find_shards(fifo.parent, [3])
        samples = list(iter_samples(ref, ImageConfig()))
    finally:
        writer.join(timeout=10)
    assert _key_list(samples) == ["000", "001", "002", "003", "004"]


@pytest.mark.parametrize("column", ["jpg", "image"])
def test_parquet_samples(tmp_path, column):
    rows = [(sk.jpeg(), sk.meta("a cat", [[2, 5, 0.1, 0.1, 0.5, 0.5, 0.8]], f"{i:03d}")) for i in range(5)]
    rows.append((None, sk.meta("missing", [], "005", status="failed_to_download")))
    rows.append((sk.jpeg(), sk.meta("again", [], "001")))
    path = sk.write_parquet_shard(tmp_path / "00002.parquet", rows, image_column=column)
    samples = list(iter_samples(ShardRef(2, "00002", path, "parquet"), ImageConfig()))
    assert _key_list(samples) == ["000", "001", "002", "003", "004", "005", "001@2"]
    assert samples[0].meta["ref_exps"] == [[2, 5, 0.1, 0.1, 0.5, 0.5, 0.8]]
    assert column not in samples[0].meta and samples[0].image_bytes.startswith(b"\xff\xd8")
    assert samples[5].image_bytes is None and "failed_to_download" in samples[5].problems[0]
