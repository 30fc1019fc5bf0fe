"""Hostile shards (issue 25): no input can crash a shard, hang the reader, blow up memory or vanish
without a trace. Each test builds its own attack, runs it through `prepare_output` (or the reader) and
checks: it finishes within seconds, every sample is in the output exactly once with a reason, and a
shard that lost data is `damaged`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import shardkit as sk
from annotate.config import DataConfig, ImageConfig, LimitsConfig, MaskConfig, RegionConfig, load_config
from annotate.data.prepare import ShardStats, prepare_output, prepare_shard, run_prepare
from annotate.data.regions import regions_from_meta
from annotate.data.shards import ShardRead, ShardRef, iter_samples
from annotate.data.store import OutputStore

CAP = "a red square on a gradient"
ENTRY = sk.entry(CAP, "a red square", [0.25, 0.25, 0.5, 0.75])
JPEG = sk.jpeg(sk.photo())
CFG = DataConfig(masks=MaskConfig(source="box"))


def _prepare(path, cfg=CFG, fmt="webdataset", budget_s=10.0):
    """Prepare a hostile shard. `budget_s` bounds this process's CPU-seconds, not wall time: it guards
    against working through an attack (which took minutes to an hour), with a wide margin, and a loaded
    CI machine (other processes) must not fail it."""
    t0 = time.process_time()
    stats = ShardStats()
    records = [p.record for p in prepare_shard(ShardRef(0, path.stem, path, fmt), cfg, stats)]
    assert time.process_time() - t0 < budget_s, "the reader must refuse at once, not work through the attack"
    assert len({r.image_key for r in records}) == len(records) == stats.images
    return records, stats


def _good(key: str, seed: int = 0) -> list:
    return sk.sample_members(key, sk.jpeg(sk.photo(seed=seed)), sk.meta(CAP, [ENTRY], key), txt=CAP)


def _raw_json(key: str, text: bytes) -> list:
    return [(f"{key}.jpg", JPEG), (f"{key}.json", text)]


# ------------------------------------------------------------------ 1. every sample contained
def test_hostile_json_fails_its_sample_and_the_shard_goes_on(tmp_path):
    good_meta = sk.meta(CAP, [ENTRY], "x")
    deep = b'{"caption": "\\ud800", "x": ' + b"[" * 600 + b"1" + b"]" * 600 + b"}"
    members = [
        *_good("a"),
        *_raw_json("digits", json.dumps(good_meta).replace('"id": 0', '"id": ' + "9" * 5000).encode()),
        *_raw_json("deep", deep),
        *_raw_json("surrogate", json.dumps({**good_meta, "caption": "x"}).replace('"x"', '"\\udc80 lone"').encode()),
        *_raw_json("dupkey", b'{"caption": "a red square on a gradient", "ref_exps": [], "ref_exps": '
                             + json.dumps([ENTRY]).encode() + b"}"),
        *_raw_json("notutf8", b'{"caption": "\xff\xfe"}'),
        *_raw_json("big", json.dumps({**good_meta, "pad": "x" * 9000}).encode()),
        *_good("z", 1),
    ]
    path = sk.write_tar(tmp_path / "00000.tar", members)
    cfg = DataConfig(masks=MaskConfig(source="box"), limits=LimitsConfig(max_json_bytes=8000))
    records, stats = _prepare(path, cfg)
    by = {r.image_key: r for r in records}
    assert list(by) == ["a", "digits", "deep", "surrogate", "dupkey", "notutf8", "big", "z"]
    assert stats.damage is None  # nothing of the archive is lost: bad samples are the samples' errors
    assert by["a"].error is None and by["z"].error is None
    assert by["digits"].error is None  # a 5000-digit id is out of range, not a reason to lose the sample
    assert "nested deeper than max_json_depth" in by["deep"].error
    assert by["surrogate"].error is None and "\udc80" not in (by["surrogate"].caption or "")
    assert "'ref_exps' appears twice" in by["dupkey"].error
    assert "invalid json" in by["notutf8"].error
    assert "max_json_bytes 8000" in by["big"].error


def test_one_bad_number_fails_only_its_region(tmp_path):
    entries = [ENTRY, [0, 12, 10**400, 0.1, 0.5, 0.5, 0.9], [0, 12, 0.1, 0.1, 0.6, 1e400, 0.9],
               [0, 10**400, 0.1, 0.1, 0.6, 0.6, 0.9]]
    text = json.dumps(sk.meta(CAP, [], "k")).replace('"ref_exps": []', '"ref_exps": ' + json.dumps(entries)).encode()
    path = sk.write_tar(tmp_path / "00000.tar", _raw_json("k", text))
    (record,), stats = _prepare(path)
    assert record.error is None and record.image_bytes is not None
    assert [r.status for r in record.regions] == ["pending", "failed", "failed", "failed"]
    assert all("out of range" in r.error or "non-finite" in r.error for r in record.regions[1:3])
    assert "non-finite" in record.regions[3].error  # a 401-digit char span


def test_a_shard_that_crashes_the_writer_is_damaged_and_the_call_goes_on(tmp_path, monkeypatch):
    import annotate.data.prepare as prep

    src = tmp_path / "in"
    sk.write_tar(src / "00000.tar", _good("a"))
    sk.write_tar(src / "00001.tar", _good("b"))
    real = prep.prepare_shard

    def crashing(shard, cfg, stats=None):
        if shard.name == "00000":
            raise RuntimeError("boom")
        yield from real(shard, cfg, stats)

    monkeypatch.setattr(prep, "prepare_shard", crashing)
    summary = run_prepare(str(src), "0-1", str(tmp_path / "OUT"))
    assert "internal error" in summary["damaged"]["00000"] and "boom" in summary["damaged"]["00000"]
    assert summary["shards"]["00001"]["damage"] is None and summary["shards"]["00001"]["images"] == 1
    latest = OutputStore(tmp_path / "OUT").latest("prepare")
    assert latest["00000"]["state"] == "damaged" and latest["00001"]["state"] == "finished"


# ------------------------------------------------------------------ 2. damage from the structure
def _offsets(data: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


def _big_samples(n: int = 8) -> list:
    # images of ~8 KB, so a hole of a few samples is longer than an end-of-archive marker
    return [m for i in range(n) for m in sk.sample_members(
        f"k{i}", sk.encode(sk.photo(160, 120, seed=i), "PNG"), sk.meta(CAP, [ENTRY], f"k{i}"))]


def test_a_zero_filled_tail_is_damage(tmp_path):
    """A preallocated download that died: full length, zeros from some point on."""
    data = bytearray(sk.write_tar(tmp_path / "full.tar", _big_samples()).read_bytes())
    cut = _offsets(bytes(data))["k3.jpg"]
    data[cut:] = bytes(len(data) - cut)
    path = tmp_path / "00000.tar"
    path.write_bytes(bytes(data))
    records, stats = _prepare(path)
    assert [r.image_key for r in records] == ["k0", "k1", "k2"]
    assert stats.damage and "zero-filled tail" in stats.damage and f"from offset {cut}" in stats.damage


def test_a_zero_filled_hole_between_headers_is_damage(tmp_path):
    data = bytearray(sk.write_tar(tmp_path / "full.tar", _big_samples()).read_bytes())
    off = _offsets(bytes(data))
    start, end = off["k2.jpg"], off["k5.jpg"]
    data[start:end] = bytes(end - start)
    path = tmp_path / "00000.tar"
    path.write_bytes(bytes(data))
    records, stats = _prepare(path)
    assert [r.image_key for r in records] == ["k0", "k1", "k5", "k6", "k7"]  # read on after the hole
    assert stats.damage and "data after a zero block" in stats.damage and f"at offset {start}" in stats.damage


@pytest.mark.parametrize("compressed", [False, True])
def test_a_declared_size_past_the_end_is_refused_at_once(tmp_path, compressed):
    """A pax header declaring 10**15 bytes: refused at once (the stdlib would skip for days)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in [*_good("k0"), ("k1.jpg", JPEG), *_good("k2", 2)]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            if name == "k1.jpg":
                info.pax_headers = {"size": str(10**15)}
            tar.addfile(info, io.BytesIO(payload))
    data = gzip.compress(buf.getvalue()) if compressed else buf.getvalue()
    path = tmp_path / "00000.tar"
    path.write_bytes(data)
    records, stats = _prepare(path, budget_s=5)
    assert [r.image_key for r in records] == ["k0", "k1"]
    assert records[1].error and "cut off" in records[1].error
    assert stats.damage and "truncated tar" in stats.damage
    if not compressed:
        assert f"declares {10**15} bytes" in stats.damage and "read to offset" in stats.damage


# ------------------------------------------------------------------ 3. bounds
def test_forty_thousand_boxes_cost_nothing_and_phrases_are_bounded(tmp_path):
    """More entries than max_entries: refused before any region is built (40,000 boxes took an hour);
    de-duplication of what is allowed is O(n * max_regions_per_image); long phrases are refused."""
    caption = "x" * 100_000
    entries = [[0, 100_000, (i % 97) / 100, (i % 89) / 100, 0.99, 0.99, 0.5] for i in range(40_000)]
    text = json.dumps({**sk.meta(CAP, [], "k"), "caption": caption, "ref_exps": entries}).encode()
    path = sk.write_tar(tmp_path / "00000.tar", [*_raw_json("k", text), *_good("z")])
    cfg = DataConfig(masks=MaskConfig(source="box"), limits=LimitsConfig(max_json_bytes=10**7))
    _prepare(path, cfg, budget_s=5)
    tracemalloc.start()
    (big, z), stats = _prepare(path, cfg, budget_s=60)  # tracing memory is slow
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 150 * 2**20, peak  # no 100 KB phrase copied 40,000 times (that was 4 GB)
    assert big.regions == [] and "has 40000 entries > max_entries 128" in big.error and z.error is None

    rs = regions_from_meta({"caption": caption, "ref_exps": entries[:100]}, "s", "k", 640, 480, RegionConfig())
    assert all(r.status == "failed" and "max_phrase_chars 1000" in r.error and len(r.phrase) <= 1000 for r in rs)

    short = [[0, 1, (i % 97) / 100, (i % 89) / 100, 0.99, 0.99, (i % 7) / 7] for i in range(3000)]
    t0 = time.process_time()  # CPU-seconds of this process: a loaded machine does not count
    rs = regions_from_meta({"caption": caption, "ref_exps": short}, "s", "k", 640, 480, RegionConfig(),
                           LimitsConfig(max_entries=3000))
    assert time.process_time() - t0 < 10 and len(rs) == 3000
    assert sum(r.status == "pending" for r in rs) == 32
    assert all(r.status == "rejected" and ("over max_regions_per_image 32" in r.error or "near-duplicate" in r.error)
               for r in rs if r.status != "pending")


def test_parts_no_step_reads_are_skipped_unread(tmp_path):
    members = [*_good("k0"), ("k0.npy", b"\0" * 3_000_000), ("k0.png", sk.encode(sk.photo(), "PNG")),
               *[(f"k0.part{i}", b"x") for i in range(5000)]]  # a sample of 5000 parts: only counted
    path = sk.write_tar(tmp_path / "00000.tar", members)
    read = ShardRead()
    samples = list(iter_samples(ShardRef(0, "00000", path, "webdataset"), ImageConfig(), read))
    (s,) = samples
    assert s.meta is not None and s.image_bytes == sk.jpeg(sk.photo(seed=0)) and read.damage is None
    assert "5001 parts no step reads were skipped unread" in s.problems


@pytest.mark.parametrize("text, why", [
    ("a: &a [1, 2]\nb: &b [*a, *a]\nc: [*b, *b]\n", "anchors|aliases"),
    ("a: [1, 2]\nb: *a\n", "aliases|undefined alias|not valid YAML"),
    ("- name: x\n", "not a mapping"),
    ("name: x\nstages: [1, 2]\n", "not a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_pipeline_files_that_attack_or_are_not_mappings_are_refused(tmp_path, text, why):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=why):
        load_config(path)


def test_a_huge_pipeline_file_is_refused_unread(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\n" + "# pad\n" * 300_000)
    with pytest.raises(ValueError, match="not a pipeline file"):
        load_config(path)


@pytest.mark.parametrize("section, values", [
    (ImageConfig, {"max_bytes": -1}), (ImageConfig, {"max_pixels": 0}), (LimitsConfig, {"max_entries": 0}),
    (LimitsConfig, {"max_json_bytes": -5}), (RegionConfig, {"box_tolerance": -0.1}),
])
def test_negative_limits_are_refused(section, values):
    with pytest.raises(ValueError):
        section(**values)


# ------------------------------------------------------------------ 4. parquet column by column
def test_parquet_bad_values_fail_their_row_unused_columns_never_decoded(tmp_path):
    n = 6
    notes = [b"fine"] * n
    notes[2] = b"\xff\xfe not utf-8"  # in a column no step reads
    whens = [5] * n
    whens[3] = 2**62  # a timestamp Python's datetime cannot hold, in a column no step reads
    captions = [CAP.encode()] * n
    captions[4] = b"\xff\xfe bad"  # in the caption: fails its row only
    box = pa.list_(pa.list_(pa.float64()))
    table = pa.table({
        "key": pa.array([f"{i:03d}" for i in range(n)]),
        "caption": pa.array(captions, pa.binary()).view(pa.string()),
        "width": pa.array([96] * n), "height": pa.array([64] * n),
        "ref_exps": pa.array([[ENTRY]] * n, box),
        "jpg": pa.array([JPEG] * n, pa.binary()),
        "when": pa.array(whens, pa.int64()).cast(pa.timestamp("ns")).cast(pa.timestamp("us"), safe=False),
        "note": pa.array(notes, pa.binary()).view(pa.string()),
    })
    path = tmp_path / "00001.parquet"
    pq.write_table(table, path, row_group_size=64)
    with pytest.raises(Exception):
        pq.read_table(path).to_pylist()  # what reading every column of a batch did
    records, stats = _prepare(path, fmt="parquet")
    assert stats.damage is None and [r.image_key for r in records] == [f"{i:03d}" for i in range(n)]
    assert [r.error is None for r in records] == [True, True, True, True, False, True]
    assert "column 'caption': value not readable" in records[4].error
    assert all(r.regions[0].status == "pending" for i, r in enumerate(records) if i != 4)


def test_parquet_keys_are_cleaned_like_tar_member_names(tmp_path, capsys):
    rows = [(JPEG, sk.meta(CAP, [ENTRY], "000")), (JPEG, sk.meta(CAP, [ENTRY], "../../etc/passwd")),
            (JPEG, sk.meta(CAP, [ENTRY], "red\x1b[31mALERT\x1b]0;pwned\x07"))]
    src = tmp_path / "in"
    sk.write_parquet_shard(src / "00001.parquet", rows)
    summary = run_prepare(str(src), "1", str(tmp_path / "OUT"))
    keys = pq.read_table(tmp_path / "OUT" / "stages" / "prepare" / "00001.parquet").column("image_key").to_pylist()
    errors = pq.read_table(tmp_path / "OUT" / "stages" / "prepare" / "00001.parquet").column("error").to_pylist()
    assert keys[0] == "000" and keys[1] == "..%2F..%2Fetc%2Fpasswd" and "\x1b" not in keys[2]
    assert errors[0] is None and "unsafe key" in errors[1] and "unsafe key" in errors[2]
    assert summary["image_errors"] == 2
    err = capsys.readouterr().err
    assert "\x1b]" not in err and "\x1b[31m" not in err and "\x07" not in err


# ------------------------------------------------------------------ 5. wrong is refused
def test_wrong_boxes_fail_their_region_with_the_reason():
    W, H = 640, 480
    entries = [
        [0, 12, 0.1, 0.1, 0.5, 0.5, 0.9],  # fine
        [0, 12, 10, 20, 300, 400, 0.9],  # pixel coordinates: not a whole-image region
        [0, 12, 0.5, 0.5, 0.1, 0.1, 0.9],  # inverted
        [0, 12, 0.1, 0.1, 0.1005, 0.5, 0.9],  # 0.3 pixel wide
        [0, 12, 0.1, 0.1, float("inf"), 0.5, 0.9],
        [0, 12, -0.004, 0.0, 1.004, 1.0, 0.9],  # float noise at the edges: clipped
    ]
    rs = regions_from_meta({"caption": CAP, "ref_exps": entries}, "s", "k", W, H, RegionConfig(merge_iou=1.0))
    assert [r.status for r in rs] == ["pending", "failed", "failed", "failed", "failed", "pending"]
    assert "outside [0, 1]" in rs[1].error and "pixel coordinates" in rs[1].error
    assert "inverted" in rs[2].error and "under min_box_pixels" in rs[3].error and "non-finite" in rs[4].error
    assert rs[5].bbox == pytest.approx([0, 0, W, H])


# ------------------------------------------------------------------ 6. trust
def test_only_allowed_image_formats_are_opened(tmp_path):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    buf = io.BytesIO()
    Image.fromarray(sk.photo()).save(buf, "PPM")  # Pillow reads it; GRIT never has it
    members = []
    for key, payload in [("eps", eps), ("ppm", buf.getvalue()), ("webp", sk.encode(sk.photo(), "WEBP")),
                         ("gif", sk.encode(sk.photo(), "GIF")), ("png", sk.encode(sk.photo(), "PNG"))]:
        members += [(f"{key}.jpg", payload), (f"{key}.json", json.dumps(sk.meta(CAP, [ENTRY], key)).encode())]
    records, _ = _prepare(sk.write_tar(tmp_path / "00000.tar", members))
    by = {r.image_key: r for r in records}
    assert "not an image of an allowed format" in by["eps"].error
    assert "not an image of an allowed format" in by["ppm"].error
    assert all(by[k].error is None for k in ("webp", "gif", "png"))


def test_nothing_from_the_input_reaches_the_terminal_raw(tmp_path, capsys):
    src = tmp_path / "in"
    members = [("evil\x1b]0;x\x07.jpg", JPEG), ("evil\x1b]0;x\x07.json", b"{}"), ("\x1b[2J", b"x"), *_good("k")]
    sk.write_tar(src / "00000.tar", members)
    data = (src / "00000.tar").read_bytes()
    (src / "00001.tar").write_bytes(data[: len(data) // 2])  # damaged: its reason names members
    summary = run_prepare(str(src), "0-1", str(tmp_path / "OUT"))
    assert list(summary["damaged"]) == ["00001"]
    err = capsys.readouterr().err
    assert "DAMAGED" in err and "\x1b" not in err and "\x07" not in err


# ------------------------------------------------------------------ 7. bookkeeping
def test_a_replaced_input_is_redone(tmp_path):
    src = tmp_path / "in"
    path = sk.write_tar(src / "00000.tar", _good("a"))
    out = str(tmp_path / "OUT")
    assert list(run_prepare(str(src), "0", out)["shards"]) == ["00000"]
    assert run_prepare(str(src), "0", out)["skipped"] == ["00000"]
    sk.write_tar(path, [*_good("a"), *_good("b", 1)])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    summary = run_prepare(str(src), "0", out)
    assert summary["skipped"] == [] and summary["shards"]["00000"]["images"] == 2
    line = OutputStore(out).latest("prepare")["00000"]
    assert line["input"]["size"] == path.stat().st_size


def test_a_torn_manifest_line_never_hides_the_next(tmp_path):
    store = OutputStore(tmp_path)
    store.record({"output": "prepare", "shard": "00000", "config": "c", "sha256": "x"})
    with open(store.manifest_path, "a") as f:
        f.write('{"output": "prepare", "shard": "00001", "conf')  # a crash mid-write
    store.record({"output": "prepare", "shard": "00002", "config": "c", "sha256": "y"})
    assert [e["shard"] for e in store.manifest()] == ["00000", "00002"]
    # a manifest written before torn lines were ended: the next line was appended to the cut one
    with open(store.manifest_path, "a") as f:
        f.write('{"output": "prepare", "shard": "00003", "con' + json.dumps({"output": "prepare", "shard": "00004"}) + "\n")
    assert [e["shard"] for e in store.manifest()] == ["00000", "00002", "00004"]


def test_prepare_over_a_folder_of_hostile_shards_in_one_call(tmp_path):
    """The issue's "done when": one call, no traceback, every shard accounted for, lost data damaged."""
    src = tmp_path / "in"
    data = sk.write_tar(tmp_path / "full.tar", _big_samples()).read_bytes()
    off = _offsets(data)
    tail = bytearray(data)
    tail[off["k3.jpg"]:] = bytes(len(data) - off["k3.jpg"])
    (src / "00000.tar").parent.mkdir(parents=True)
    (src / "00000.tar").write_bytes(bytes(tail))
    sk.write_tar(src / "00001.tar", [*_good("a"), *_raw_json("b", b'{"x": ' + b"9" * 6000 + b"}")])
    (src / "00002.tar").write_bytes(b"\0" * 2048 + data)  # zeros, then a whole archive
    (src / "00003.parquet").write_bytes(b"PAR1 garbage")
    t0 = time.process_time()  # CPU-seconds of this process (prepare runs in it): a loaded machine does not count
    summary = run_prepare(str(src), "0-3", str(tmp_path / "OUT"))
    assert time.process_time() - t0 < 60
    assert set(summary["damaged"]) == {"00000", "00002", "00003"}
    assert summary["shards"]["00001"]["images"] == 2 and summary["shards"]["00001"]["damage"] is None
    latest = OutputStore(tmp_path / "OUT").latest("prepare")
    assert {s: line["state"] for s, line in latest.items()} == {
        "00000": "damaged", "00001": "finished", "00002": "damaged", "00003": "damaged"}


def test_the_dataset_card_describes_the_whole_output(tmp_path):
    src = tmp_path / "in"
    sk.write_tar(src / "00000.tar", _good("a"))
    data = sk.write_tar(src / "00001.tar", [*_good("b"), *_good("c", 1)]).read_bytes()
    (src / "00001.tar").write_bytes(data[: len(data) // 2])
    out = tmp_path / "OUT"
    run_prepare(str(src), "0", str(out))
    run_prepare(str(src), "1", str(out))  # a second call, with another shard
    card = (out / "README.md").read_text()
    info = json.loads(card.split("```json", 1)[1].split("```", 1)[0])
    assert set(info["shards"]) == {"00000", "00001"} and list(info["damaged"]) == ["00001"]
    assert info["totals"]["images"] == info["shards"]["00000"]["images"] + info["shards"]["00001"]["images"]


def test_a_given_mask_with_a_hostile_size_is_refused_before_decoding(tmp_path):
    rle = {"size": [100_000, 100_000], "counts": "0"}
    m = sk.meta(CAP, [ENTRY], "k", seudo_masks=[rle])
    path = sk.write_tar(tmp_path / "00000.tar", [("k.jpg", JPEG), ("k.json", json.dumps(m).encode())])
    cfg = DataConfig(masks=MaskConfig(source="given", fallback="fail"))
    (record,), _ = _prepare(path, cfg, budget_s=5)
    assert record.regions[0].status == "failed" and "100000x100000 (h x w), image is 64x96" in record.regions[0].error
