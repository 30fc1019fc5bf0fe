"""regions_from_meta: pixel boxes, stable ids, filters with readable reasons, hostile entries."""

from __future__ import annotations

import pytest

import shardkit as sk
from annotate.config import RegionConfig
from annotate.data.regions import regions_from_meta

W, H = 200, 100


def _regions(caption, entries, cfg=RegionConfig(), **meta_kw):
    return regions_from_meta(sk.meta(caption, entries, **meta_kw), "00003", "k1", W, H, cfg)


def test_boxes_to_pixels_ids_and_phrases():
    cap = "a dog and a ball"
    rs = _regions(cap, [sk.entry(cap, "a dog", [0.1, 0.2, 0.5, 0.8], 0.7), sk.entry(cap, "a ball", [0.6, 0.5, 0.7, 0.7])])
    assert [r.region_id for r in rs] == ["00003:k1:0", "00003:k1:1"]
    assert [r.phrase for r in rs] == ["a dog", "a ball"]
    assert rs[0].bbox == pytest.approx([20, 20, 80, 60]) and rs[0].score == pytest.approx(0.7)
    assert all(r.status == "pending" and r.error is None for r in rs)


def test_noun_chunks_source():
    cap = "a dog"
    m = sk.meta(cap, [], noun_chunks=[[0, 5, 0, 0, 1, 1, 0.5]])
    rs = regions_from_meta(m, "s", "k", W, H, RegionConfig(source="noun_chunks"))
    assert len(rs) == 1 and rs[0].bbox == pytest.approx([0, 0, W, H])


def test_non_ascii_offsets_are_str_offsets():
    cap = "Ein grüner Drache 🐉 über 東京"
    rs = _regions(cap, [sk.entry(cap, "Drache 🐉", [0, 0, 0.5, 0.5]), sk.entry(cap, "東京", [0.5, 0.5, 1, 1])])
    assert [r.phrase for r in rs] == ["Drache 🐉", "東京"]


def test_hostile_entries_fail_with_reasons():
    cap = "a thing"
    rs = _regions(cap, [
        [0, 7, -0.005, -0.005, 0.5, 0.5, 0.9],  # within box_tolerance: clipped
        [0, 7, 1.2, 1.2, 1.5, 1.5, 0.9],  # outside [0, 1]: refused (issue 25), no longer "entirely outside"
        [0, 7, 0.6, 0.2, 0.4, 0.8, 0.9],
        [0, 7, 0.3, 0.3, 0.3, 0.6, 0.9],
        [0, 50, 0.1, 0.1, 0.9, 0.9, 0.9],
        [5, 3, 0.1, 0.1, 0.9, 0.9, 0.9],
        "garbage",
        [0, 7, "x", 0, 1, 1, 0.9],
        [0, 7, float("nan"), 0, 1, 1, 0.9],
    ])
    assert rs[0].status == "pending" and rs[0].bbox == pytest.approx([0, 0, 100, 50])
    errors = [r.error for r in rs[1:]]
    assert all(r.status == "failed" for r in rs[1:])
    assert "outside [0, 1]" in errors[0]
    assert "inverted or zero-area" in errors[1] and "inverted or zero-area" in errors[2]
    assert errors[3] == "char span [0, 50) outside caption of length 7"
    assert "outside caption" in errors[4]
    assert "malformed entry" in errors[5] and "non-numeric" in errors[6] and "non-numeric" in errors[7]
    assert [r.region_index for r in rs] == list(range(9)) and len({r.region_id for r in rs}) == 9


def test_filters_reject_with_reasons_and_keep_everything():
    cap = "one two three four five"
    cfg = RegionConfig(min_score=0.3, min_area_frac=0.05, max_regions_per_image=2, merge_iou=0.9)
    rs = _regions(cap, [
        sk.entry(cap, "one", [0.0, 0.0, 0.5, 0.5], 0.12),  # low score
        sk.entry(cap, "two", [0.0, 0.0, 0.1, 0.1], 0.9),  # 1% of the image
        sk.entry(cap, "three", [0.2, 0.2, 0.8, 0.8], 0.8),
        sk.entry(cap, "four", [0.2, 0.2, 0.8, 0.81], 0.85),  # near-duplicate of three, higher score
        sk.entry(cap, "five", [0.5, 0.5, 1.0, 1.0], 0.5),
        sk.entry(cap, "one", [0.0, 0.5, 0.4, 1.0], 0.4),  # over the cap
    ], cfg)
    assert len(rs) == 6
    assert [r.status for r in rs] == ["rejected", "rejected", "rejected", "pending", "pending", "rejected"]
    assert rs[0].error == "score 0.12 < min_score 0.30"
    assert rs[1].error == "box area 1.00% of the image < min_area_frac 5.00%"
    assert rs[2].error.startswith("near-duplicate of region 3 (IoU 0.9")
    assert rs[5].error == "over max_regions_per_image 2 (rank 3 by score)"
