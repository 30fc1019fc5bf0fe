"""Fixtures for the data tests: configs, the bundled sample shards, and a shard of hostile inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import shardkit as sk
from annotate.config import DataConfig, MaskConfig

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "sample_data" / "grit"


@pytest.fixture
def box_cfg() -> DataConfig:
    """Box masks: fast, so tests about records and accounting do not pay for GrabCut."""
    return DataConfig(masks=MaskConfig(source="box"))


@pytest.fixture
def sample_dir() -> Path:
    return SAMPLE_DIR


def _hostile_samples() -> list[tuple[str, list, dict]]:
    """(key, tar members, expectations) for every hostile case of the issue."""
    cap = "a red square on a gradient"
    good_entry = sk.entry(cap, "a red square", [0.25, 0.25, 0.5, 0.75])
    arr = sk.photo(96, 64)
    arr[16:48, 24:48] = (255, 0, 0)
    good_jpeg = sk.jpeg(arr)
    cases = []

    def add(key, image, meta_, expect, txt=None):
        cases.append((key, sk.sample_members(key, image, meta_, txt), expect))

    add("good", good_jpeg, sk.meta(cap, [good_entry], "good"), {"status": ["pending"]}, txt=cap)
    add("truncated", good_jpeg[: len(good_jpeg) // 2], sk.meta(cap, [good_entry], "truncated"),
        {"status": ["failed"], "error": "truncated", "image": None, "record_error": "image not decodable"})
    add("notimage", b"<html>404 not found</html>", sk.meta(cap, [good_entry], "notimage"),
        {"status": ["failed"], "error": "not an image", "image": None, "record_error": "not an image"})
    cmyk = sk.encode(Image.fromarray(arr).convert("CMYK"), "JPEG")
    add("cmyk", cmyk, sk.meta(cap, [good_entry], "cmyk"), {"status": ["pending"]})
    gray = sk.encode(Image.fromarray(arr).convert("L"), "JPEG")
    add("gray", gray, sk.meta(cap, [good_entry], "gray"), {"status": ["pending"]})
    png16 = sk.png16((np.arange(96 * 64).reshape(64, 96) * 10) % 65536)
    add("png16", png16, sk.meta(cap, [good_entry], "png16"), {"status": ["pending"]})
    outside = [
        [0, 12, -0.005, -0.005, 0.5, 0.5, 0.9],  # outside by less than box_tolerance: clipped
        [0, 12, 1.2, 1.2, 1.5, 1.5, 0.9],  # outside [0, 1]: failed
        [0, 12, 0.6, 0.2, 0.4, 0.8, 0.9],  # inverted: failed
        [0, 12, 0.3, 0.3, 0.3, 0.6, 0.9],  # zero width: failed
        [0, 99, 0.1, 0.1, 0.9, 0.9, 0.9],  # char span past the caption: failed
    ]
    add("boxes", good_jpeg, sk.meta(cap, outside, "boxes"),
        {"status": ["pending", "failed", "failed", "failed", "failed"]})
    cases.append(("jsononly", sk.sample_members("jsononly", None, sk.meta(cap, [good_entry, good_entry], "jsononly")),
                  {"status": ["failed", "failed"], "error": "no image", "image": None,
                   "record_error": "no image in the sample"}))
    cases.append(("imageonly", sk.sample_members("imageonly", good_jpeg, None),
                  {"status": [], "problem": "no json", "record_error": "no json beside the image"}))
    # metadata that is there but unusable: the image still gets a record, with the reason
    add("notlist", good_jpeg, {**sk.meta(cap, [], "notlist"), "ref_exps": {"0": good_entry}},
        {"status": [], "record_error": "ref_exps is a dict, not a list"})
    add("noregions", good_jpeg, {"caption": cap}, {"status": [], "record_error": "no ref_exps in the json"})
    cases.append(("badjson", [("badjson.jpg", good_jpeg), ("badjson.json", b'{"caption": "a red')],
                  {"status": [], "record_error": "invalid json"}))
    cases.append(("jsonlist", [("jsonlist.jpg", good_jpeg), ("jsonlist.json", b"[1, 2]")],
                  {"status": [], "record_error": "json is a list, not an object"}))
    cases.append(("linked", [("linked.jpg", sk.Link("good.jpg")), *sk.sample_members("linked", None, sk.meta(cap, [good_entry], "linked"))],
                  {"status": ["failed"], "error": "link", "image": None, "record_error": "not a regular file"}))
    add("good", good_jpeg, sk.meta(cap, [good_entry], "good"),  # the same bytes again: not annotated twice
        {"status": ["failed"], "error": "duplicate: exact copy", "key": "good@2", "record_error": "exact copy of sample 'good'"},
        txt=cap)
    uni = "Ein grüner Drache 🐉 fliegt über 東京"
    add("unicode", good_jpeg, sk.meta(uni, [sk.entry(uni, "Drache 🐉", [0.1, 0.1, 0.5, 0.5]),
                                            sk.entry(uni, "東京", [0.5, 0.5, 0.9, 0.9])], "unicode"),
        {"status": ["pending", "pending"], "phrases": ["Drache 🐉", "東京"]})
    return cases


@pytest.fixture
def hostile_shard(tmp_path) -> tuple[Path, dict]:
    """tmp/shards/00007.tar with every hostile case (plus an unsafe member name, a directory and a
    member that is no sample part), and the expectations per key in output order."""
    members: list = [("../../etc/evil.json", b"{}"), ("somedir", None), ("README", b"not a sample")]
    expect = {"..%2F..%2Fetc%2Fevil": {"status": [], "image": None, "record_error": "unsafe member name"}}
    for key, m, e in _hostile_samples():
        members += m
        expect[e.get("key", key)] = e
    path = sk.write_tar(tmp_path / "shards" / "00007.tar", members)
    return path, expect
