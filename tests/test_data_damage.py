"""Damaged input shards: a shard that cannot be read to its end is never taken for a whole one.

After `prepare_shard` is exhausted, `stats.damage` is None for a whole shard, else a one-line reason;
the samples read before the damage still come out as records and `stats.images` counts them. Built
for the class of fault: tars cut at every block boundary and inside blocks, compressed tars cut,
corrupt headers, parquet files with a broken footer or row group, files that cannot be opened.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile

import pyarrow.parquet as pq
import pytest

import shardkit as sk
from annotate.config import ImageConfig
from annotate.data.prepare import ShardStats, prepare_shard, run_prepare
from annotate.data.shards import ShardRead, ShardRef, iter_samples

CAP = "a red square on a gradient"
ENTRY = sk.entry(CAP, "a red square", [0.25, 0.25, 0.5, 0.75])
KEYS = [f"k{i}" for i in range(6)]


def _tar_members(keys=KEYS) -> list:
    members = []
    for i, k in enumerate(keys):
        members += sk.sample_members(k, sk.jpeg(sk.photo(seed=i)), sk.meta(CAP, [ENTRY], k), txt=CAP)
    return members


def _prepare(path, box_cfg, fmt="webdataset"):
    stats = ShardStats()
    records = [p.record for p in prepare_shard(ShardRef(0, path.stem, path, fmt), box_cfg, stats)]
    return records, stats


def _layout(data: bytes) -> tuple[list[tuple[str, int]], int]:
    """(member name, offset where its padded data ends) in order, and the end-of-archive marker's offset."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        ends = [(m.name, m.offset_data + -(-m.size // 512) * 512) for m in tar.getmembers()]
    return ends, ends[-1][1]


def test_whole_shards_are_not_damaged(tmp_path, box_cfg):
    tar = sk.write_tar(tmp_path / "00000.tar", _tar_members())
    records, stats = _prepare(tar, box_cfg)
    assert stats.damage is None and stats.images == len(records) == len(KEYS)
    gz = tmp_path / "gz" / "00000.tar"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(tar.read_bytes(), mtime=0))
    records, stats = _prepare(gz, box_cfg)
    assert stats.damage is None and [r.image_key for r in records] == KEYS
    empty = sk.write_tar(tmp_path / "e" / "00000.tar", [])  # a shard with no sample is whole too
    assert _prepare(empty, box_cfg)[1].damage is None and _prepare(empty, box_cfg)[1].images == 0
    pq_path = sk.write_parquet_shard(tmp_path / "00001.parquet", [(sk.jpeg(), sk.meta(CAP, [ENTRY], k)) for k in KEYS])
    records, stats = _prepare(pq_path, box_cfg, "parquet")
    assert stats.damage is None and stats.images == len(KEYS)


def test_a_tar_cut_anywhere_before_its_end_marker_is_damaged(tmp_path, box_cfg):
    """Every 512-byte boundary (a cut between members, at a header, inside data) and offsets inside
    blocks: the stdlib reads a tar cut at or inside a header as a whole one; we must not."""
    data = sk.write_tar(tmp_path / "full.tar", _tar_members()).read_bytes()
    ends, marker = _layout(data)
    path = tmp_path / "00000.tar"
    cuts = sorted({*range(0, marker + 512, 512), *range(100, marker, 1500), marker + 1, marker + 511})
    for cut in cuts:
        path.write_bytes(data[:cut])
        records, stats = _prepare(path, box_cfg)
        assert stats.damage, f"cut at {cut} of {len(data)} bytes not reported"
        assert "\n" not in stats.damage and len(stats.damage) < 400
        assert stats.images == len(records)
        keys = [r.image_key for r in records]
        whole = [name.split(".")[0] for name, end in ends if end <= cut and name.endswith(".txt")]
        assert keys[: len(whole)] == whole, cut  # every sample before the cut came out, in order
        assert keys == KEYS[: len(keys)], cut
        for r in records:
            if r.image_key in whole:
                assert r.error is None and [g.status for g in r.regions] == ["pending"], (cut, r.image_key)
            else:  # the sample the cut falls in: it is there, and says what is missing
                assert r.image_key == keys[-1] and (r.error is None or "cut off" in r.error), (cut, r.error)
    for cut in (marker + 512, marker + 1024, len(data)):  # the end marker is there: whole
        path.write_bytes(data[:cut])
        assert _prepare(path, box_cfg)[1].damage is None, cut


def test_truncated_tar_reasons_name_the_place(tmp_path, box_cfg):
    data = sk.write_tar(tmp_path / "full.tar", _tar_members()).read_bytes()
    ends, _ = _layout(data)
    path = tmp_path / "00000.tar"
    k2_txt, k3_jpg = ends[7][1], ends[8][1]  # header offsets; members go k0.jpg k0.json k0.txt k1.jpg ...
    cases = {
        k2_txt: ("ends after member 'k2.json' without the end-of-archive marker", ["k0", "k1", "k2"]),
        k2_txt + 100: ("inside the header after member 'k2.json'", ["k0", "k1", "k2"]),
        k2_txt + 600: ("stopped after member 'k2.txt' (ReadError: unexpected end of data)", ["k0", "k1", "k2"]),
        k3_jpg + 700: ("stopped while reading member 'k3.jpg'", ["k0", "k1", "k2", "k3"]),
    }
    for cut, (reason, keys) in cases.items():
        path.write_bytes(data[:cut])
        records, stats = _prepare(path, box_cfg)
        assert stats.damage.startswith("truncated tar") and reason in stats.damage, stats.damage
        assert [r.image_key for r in records] == keys
        assert [r.error is None for r in records[:3]] == [True] * 3
    # k3 was cut inside its image: it is still a record, which says so
    assert "no image in the sample (the shard is cut off inside this sample" in records[3].error


COMPRESS = {"gz": lambda b: gzip.compress(b, mtime=0), "bz2": bz2.compress, "xz": lzma.compress}


@pytest.mark.parametrize("comp", list(COMPRESS))
def test_a_cut_compressed_tar_is_damaged(tmp_path, box_cfg, comp):
    """Cut anywhere, down to the last byte: the tar's own end marker can come out of a stream that is
    cut after it, so the compressed stream's end (and gzip's trailer) is checked too."""
    data = COMPRESS[comp](sk.write_tar(tmp_path / "full.tar", _tar_members()).read_bytes())
    path = tmp_path / "00000.tar"
    path.write_bytes(data)
    assert _prepare(path, box_cfg)[1].damage is None
    for cut in sorted({int(len(data) * f) for f in (0.1, 0.35, 0.6, 0.85, 0.97)} | {len(data) - d for d in (1, 4, 8, 9, 20, 40)}):
        path.write_bytes(data[:cut])
        records, stats = _prepare(path, box_cfg)
        assert stats.damage, (comp, cut, len(data))
        assert [r.image_key for r in records] == KEYS[: len(records)] and stats.images == len(records)


def test_data_after_a_gzip_stream_is_damage(tmp_path, box_cfg):
    """`cat a.tar.gz b.tar.gz`: the second gzip member would never be read."""
    a = gzip.compress(sk.write_tar(tmp_path / "a.tar", _tar_members(KEYS[:3])).read_bytes(), mtime=0)
    b = gzip.compress(sk.write_tar(tmp_path / "b.tar", _tar_members(KEYS[3:])).read_bytes(), mtime=0)
    path = tmp_path / "00000.tar"
    path.write_bytes(a + b)
    records, stats = _prepare(path, box_cfg)
    assert [r.image_key for r in records] == KEYS[:3] and "after its end were not read" in stats.damage


def test_corrupt_bytes_in_a_tar(tmp_path, box_cfg):
    data = bytearray(sk.write_tar(tmp_path / "full.tar", _tar_members()).read_bytes())
    ends, _ = _layout(bytes(data))
    path = tmp_path / "00000.tar"
    header = ends[5][1]  # k2.jpg's header
    bad = bytearray(data)
    bad[header : header + 100] = b"\xff" * 100  # a header that fails its checksum
    path.write_bytes(bytes(bad))
    records, stats = _prepare(path, box_cfg)
    assert stats.damage.startswith("corrupt tar: 6 invalid header block(s) skipped, the first after member 'k1.txt'")
    # the reader finds the next good header: only k2's image is lost, and k2 says so
    assert [r.image_key for r in records] == KEYS
    assert [r.error for r in records] == [None, None, "no image in the sample", None, None, None]
    gz = gzip.compress(bytes(data), mtime=0)
    mid = len(gz) // 2
    path.write_bytes(gz[:mid] + bytes(b ^ 0x5A for b in gz[mid : mid + 64]) + gz[mid + 64 :])
    records, stats = _prepare(path, box_cfg)
    assert stats.damage and stats.images == len(records) < len(KEYS)


def test_concatenated_tars_are_read_whole(tmp_path, box_cfg):
    """`cat a.tar b.tar`: the stdlib stops at the first end marker and drops b's samples silently."""
    a = sk.write_tar(tmp_path / "a.tar", _tar_members(KEYS[:3])).read_bytes()
    b = sk.write_tar(tmp_path / "b.tar", _tar_members(KEYS[3:])).read_bytes()
    path = tmp_path / "00000.tar"
    path.write_bytes(a + b)
    records, stats = _prepare(path, box_cfg)
    assert [r.image_key for r in records] == KEYS and stats.damage is None
    path.write_bytes(a + b[:1000])  # the second one cut: damaged
    assert "truncated tar" in _prepare(path, box_cfg)[1].damage


@pytest.mark.parametrize("content", [b"", b"not a tar at all, an html error page" * 20, b"\0" * 100])
def test_a_file_that_is_no_tar_is_damaged(tmp_path, box_cfg, content):
    path = tmp_path / "00000.tar"
    path.write_bytes(content)
    records, stats = _prepare(path, box_cfg)
    assert records == [] and stats.images == 0 and stats.damage


def test_an_unreadable_file_is_damaged(tmp_path, box_cfg, monkeypatch):
    """Permission denied on open, and an I/O error in the middle of a member (a bad disk sector)."""
    import annotate.data.tar_reader as tar_reader

    path = sk.write_tar(tmp_path / "00000.tar", _tar_members())
    real_open = open

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(tar_reader, "open", denied, raising=False)
    records, stats = _prepare(path, box_cfg)
    assert records == [] and stats.damage.startswith("cannot open the file (PermissionError")

    class BadSector(io.RawIOBase):
        def __init__(self, fh):
            self.fh, self.pos = fh, 0

        def readable(self):
            return True

        def readinto(self, b):
            if self.pos >= 9000:
                raise OSError(5, "Input/output error")
            n = self.fh.readinto(memoryview(b)[: min(len(b), 9000 - self.pos)])
            self.pos += n
            return n

    monkeypatch.setattr(tar_reader, "open", lambda *a, **k: io.BufferedReader(BadSector(real_open(*a, **k))), raising=False)
    records, stats = _prepare(path, box_cfg)
    assert "unreadable tar" in stats.damage and "Input/output error" in stats.damage, stats.damage
    assert [r.image_key for r in records] == KEYS[: len(records)] and 0 < len(records) < len(KEYS)


def test_a_shard_that_vanished_or_is_a_directory_is_damaged(tmp_path, box_cfg):
    for fmt, name in (("webdataset", "00000.tar"), ("parquet", "00001.parquet")):
        records, stats = _prepare(tmp_path / name, box_cfg, fmt)
        assert records == [] and stats.damage and "No such file" in stats.damage
        (tmp_path / "d" / name).mkdir(parents=True)
        records, stats = _prepare(tmp_path / "d" / name, box_cfg, fmt)
        assert records == [] and stats.damage


def _parquet(tmp_path, n=8, **write_kw):
    rows = [(sk.jpeg(sk.photo(seed=i)), sk.meta(CAP, [ENTRY], f"{i:03d}")) for i in range(n)]
    path = sk.write_parquet_shard(tmp_path / "full.parquet", rows, **write_kw)  # row groups of 2 rows
    return path.read_bytes(), pq.ParquetFile(path).metadata


@pytest.mark.parametrize("how", ["footer", "magic", "half", "footer_len"])
def test_a_parquet_that_cannot_be_opened_is_damaged(tmp_path, box_cfg, how):
    data, _ = _parquet(tmp_path)
    broken = {"footer": data[:-40] + b"\x13" * 32 + data[-8:], "magic": data[:-4] + b"XXXX",
              "half": data[: len(data) // 2], "footer_len": data[:-8] + b"\xff\xff\xff\x7f" + data[-4:]}[how]
    path = tmp_path / "00004.parquet"
    path.write_bytes(broken)
    records, stats = _prepare(path, box_cfg, "parquet")
    assert stats.damage and "parquet" in stats.damage and stats.images == len(records)


@pytest.mark.parametrize("column", ["jpg", "key", "ref_exps"])
def test_a_corrupt_row_group_loses_only_its_rows(tmp_path, box_cfg, column):
    data, meta = _parquet(tmp_path)
    rg = meta.row_group(2)
    chunk = next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema.split(".")[0] == column)
    bad = bytearray(data)
    bad[chunk.data_page_offset : chunk.data_page_offset + 32] = b"\xff" * 32  # the page header
    path = tmp_path / "00004.parquet"
    path.write_bytes(bytes(bad))
    records, stats = _prepare(path, box_cfg, "parquet")
    assert stats.damage and "row group 2" in stats.damage, stats.damage
    keys = [r.image_key for r in records]
    assert keys[:4] == ["000", "001", "002", "003"] and keys[-2:] == ["006", "007"]  # the other groups
    assert all(r.error is None for r in records if r.image_key not in ("004", "005"))
    if column == "jpg":  # the json of the broken group is still there: its rows come out with an error
        assert keys == [f"{i:03d}" for i in range(8)]
        for r in records[4:6]:
            assert "image not read" in r.error and [g.status for g in r.regions] == ["failed"]
        assert "2 row(s) kept without their image, 0 lost" in stats.damage
    else:
        assert len(keys) == 6 and "2 lost" in stats.damage


def test_iter_samples_reports_damage_through_shard_read(tmp_path):
    data = sk.write_tar(tmp_path / "full.tar", _tar_members()).read_bytes()
    path = tmp_path / "00000.tar"
    path.write_bytes(data[:4096])
    read = ShardRead()
    samples = list(iter_samples(ShardRef(0, "00000", path, "webdataset"), ImageConfig(), read))
    assert samples and read.damage and any("damaged" in p for p in read.problems)
    problems: list[str] = []  # a plain list still collects the problems, damage included
    list(iter_samples(ShardRef(0, "00000", path, "webdataset"), ImageConfig(), problems))
    assert any("truncated tar" in p for p in problems)


def test_run_prepare_reports_damage_and_writes_what_was_read(tmp_path, capsys):
    src = tmp_path / "in"
    whole = sk.write_tar(src / "00000.tar", _tar_members())
    data = whole.read_bytes()
    (src / "00001.tar").write_bytes(data[: _layout(data)[0][8][1]])  # cut after k2's members
    (src / "00002.parquet").write_bytes(b"PAR1 not really")
    out = tmp_path / "OUT"
    summary = run_prepare(str(src), "0-2", str(out))
    assert set(summary["damaged"]) == {"00001", "00002"}
    assert summary["shards"]["00000"]["damage"] is None
    assert "truncated tar" in summary["shards"]["00001"]["damage"] and summary["shards"]["00001"]["images"] == 3
    assert summary["damaged"]["00001"] == summary["shards"]["00001"]["damage"]
    assert pq.read_table(out / "stages" / "prepare" / "00001.parquet").column("image_key").to_pylist() == ["k0", "k1", "k2"]
    assert pq.read_table(out / "stages" / "prepare" / "00002.parquet").num_rows == 0
    err = capsys.readouterr().err
    assert "00001" in err and "DAMAGED" in err


def test_page_checksums_are_verified_when_the_file_has_them(tmp_path, box_cfg):
    """Flipped bytes inside image data decode without error; a page checksum is what catches them."""
    data, meta = _parquet(tmp_path, write_page_checksum=True, compression="none")
    rg = meta.row_group(1)
    chunk = next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema == "jpg")
    bad = bytearray(data)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    middle = start + chunk.total_compressed_size // 2
    bad[middle : middle + 16] = bytes(b ^ 0xFF for b in bad[middle : middle + 16])
    path = tmp_path / "00004.parquet"
    path.write_bytes(bytes(bad))
    records, stats = _prepare(path, box_cfg, "parquet")
    assert stats.damage and "row group 1" in stats.damage and len(records) == 8
    assert [r.error is not None for r in records] == [False, False, True, True, False, False, False, False]


def test_a_member_whose_size_is_wrong_is_damage(tmp_path, box_cfg):
    """A header with a valid checksum but a size past its data: the reader lands inside other data."""
    data = bytearray(sk.write_tar(tmp_path / "full.tar", _tar_members()).read_bytes())
    ends, _ = _layout(bytes(data))
    h = ends[5][1]  # k2.jpg's header
    size = int(data[h + 124 : h + 135].decode(), 8) + 1100
    data[h + 124 : h + 136] = f"{size:011o}\0".encode()
    data[h + 148 : h + 156] = b" " * 8
    data[h + 148 : h + 156] = f"{sum(data[h : h + 512]):06o}\0 ".encode()
    path = tmp_path / "00000.tar"
    path.write_bytes(bytes(data))
    records, stats = _prepare(path, box_cfg)
    assert stats.damage and "corrupt tar" in stats.damage, stats.damage
    keys = [r.image_key for r in records]
    assert keys[:2] == ["k0", "k1"] and keys[-3:] == ["k3", "k4", "k5"]  # found again after the bad member
