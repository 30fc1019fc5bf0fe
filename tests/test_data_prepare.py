"""prepare_shard end to end on shards of hostile inputs: nothing stops the shard, every region is
accounted for exactly once with a status and a readable error."""

from __future__ import annotations

import numpy as np
import pytest

import shardkit as sk
from annotate.config import DataConfig, ImageConfig, MaskConfig
from annotate.data.crops import region_views
from annotate.data.masks import decode_rle
from annotate.data.prepare import ShardStats, prepare_shard
from annotate.data.shards import ShardRef, find_shards
from annotate.data.writer import status_counts


def _run(path, cfg, fmt="webdataset"):
    stats = ShardStats()
    prepared = list(prepare_shard(ShardRef(7, path.stem, path, fmt), cfg, stats))
    return prepared, stats


def test_hostile_shard(hostile_shard, box_cfg):
    path, expect = hostile_shard
    prepared, stats = _run(path, box_cfg)
    by_key = {p.record.image_key: p for p in prepared}
    assert list(by_key) == list(expect)  # every sample once, in shard order
    for key, e in expect.items():
        p = by_key[key]
        assert [r.status for r in p.record.regions] == e["status"], key
        for r in p.record.regions:
            assert (r.error is None) == (r.status == "pending"), (key, r)
            assert (r.mask is not None) == (r.status == "pending"), (key, r)
            if "error" in e:
                assert e["error"] in r.error, (key, r.error)
        if "image" in e:
            assert p.record.image_bytes is None and p.image is None, key
        if "phrases" in e:
            assert [r.phrase for r in p.record.regions] == e["phrases"]
        if "problem" in e:
            assert any(e["problem"] in msg for msg in p.problems), (key, p.problems)
        # every input sample has a record; an unusable one says why at the image level
        assert (p.record.error is None) == ("record_error" not in e), (key, p.record.error)
        if "record_error" in e:
            assert e["record_error"] in p.record.error, (key, p.record.error)
    ids = [r.region_id for p in prepared for r in p.record.regions]
    assert len(ids) == len(set(ids))
    assert stats.regions == status_counts(p.record for p in prepared)
    c = stats.regions
    assert c["regions_in"] == c["ok"] + c["rejected"] + c["failed"] + c["pending"] == sum(len(e["status"]) for e in expect.values())
    assert stats.images == len(expect) and stats.images_undecodable == sum("image" in e for e in expect.values())
    assert stats.image_errors == sum("record_error" in e for e in expect.values())
    assert any("README" in msg and "not KEY.EXT" in msg for msg in stats.problems)
    assert stats.damage is None  # odd members, links and bad samples are not damage


def test_decoded_images_are_rgb_and_sizes_come_from_the_image(hostile_shard, box_cfg):
    path, _ = hostile_shard
    by_key = {p.record.image_key: p for p in _run(path, box_cfg)[0]}
    for key in ("good", "cmyk", "gray", "png16"):
        p = by_key[key]
        assert p.image.mode == "RGB" and p.image.size == (96, 64) == (p.record.width, p.record.height)
    # undecodable: size from the json, error says why
    trunc = by_key["truncated"].record
    assert (trunc.width, trunc.height) == (96, 64) and "truncated" in trunc.regions[0].error


def test_pixel_limit_in_a_shard(tmp_path):
    cap = "a thing"
    path = sk.write_tar(tmp_path / "00000.tar", sk.sample_members("big", sk.jpeg(sk.photo(80, 60)), sk.meta(cap, [[0, 7, 0, 0, 1, 1, 1]], "big", width=80, height=60)))
    cfg = DataConfig(images=ImageConfig(max_pixels=1000), masks=MaskConfig(source="box"))
    (p,), _ = _run(path, cfg)
    assert p.record.image_bytes is None and p.record.regions[0].status == "failed"
    assert "max_pixels 1000" in p.record.regions[0].error


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_rotated_box_lands_on_the_object(tmp_path, orientation):
    """The box is drawn on the DISPLAYED image; the stored pixels are rotated with an EXIF tag."""
    displayed = sk.photo(120, 80)
    displayed[:] = (30, 90, 200)
    displayed[10:40, 70:110] = (255, 0, 0)  # red block, displayed x 70..110, y 10..40
    cap = "a red block"
    m = sk.meta(cap, [sk.entry(cap, "a red block", [70 / 120, 10 / 80, 110 / 120, 40 / 80])], "rot",
                width=80, height=120)  # json size as stored (pre-rotation) must not be trusted
    path = sk.write_tar(tmp_path / "00000.tar", sk.sample_members("rot", sk.jpeg_with_orientation(displayed, orientation), m))
    cfg = DataConfig(masks=MaskConfig(source="grabcut"))
    (p,), _ = _run(path, cfg)
    rec, region = p.record, p.record.regions[0]
    assert (rec.width, rec.height) == (120, 80) and region.status == "pending"
    assert region.bbox == pytest.approx([70, 10, 40, 30], abs=1e-3)
    mask = decode_rle(region.mask)
    assert mask.shape == (80, 120)
    crop = np.asarray(region_views(p.image, mask, region.bbox, cfg.crops).crop)
    red = (crop[..., 0] > 200) & (crop[..., 2] < 80)
    assert red.mean() > 0.6


def test_grabcut_and_given_masks_on_the_sample(sample_dir):
    (ref,) = find_shards(sample_dir, [1])
    cfg = DataConfig(masks=MaskConfig(source="given"))
    prepared = list(prepare_shard(ref, cfg))
    sources = {p.record.image_key: [r.mask_source for r in p.record.regions] for p in prepared}
    assert sources["000010001"] == ["given"] * 3  # the coins carry seudo_masks
    assert all(s == "box" for k, v in sources.items() if k != "000010001" for s in v)  # fallback


@pytest.mark.parametrize("column", ["jpg", "image"])
def test_parquet_shard(tmp_path, box_cfg, column):
    cap = "a cat on a mat"
    rows = [
        (sk.jpeg(), sk.meta(cap, [sk.entry(cap, "a cat", [0.1, 0.1, 0.5, 0.5]), sk.entry(cap, "a mat", [0, 0.5, 1, 1])], "000")),
        (None, sk.meta(cap, [sk.entry(cap, "a cat", [0.1, 0.1, 0.5, 0.5])], "001", status="failed_to_download")),
        (b"garbage", sk.meta(cap, [sk.entry(cap, "a mat", [0, 0.5, 1, 1])], "002")),
    ]
    path = sk.write_parquet_shard(tmp_path / "00004.parquet", rows, image_column=column)
    (ref,) = find_shards(tmp_path, [4])
    prepared = list(prepare_shard(ref, box_cfg))
    assert [[r.status for r in p.record.regions] for p in prepared] == [["pending", "pending"], ["failed"], ["failed"]]
    assert "failed_to_download" in prepared[1].record.regions[0].error
    assert "not an image" in prepared[2].record.regions[0].error
    assert prepared[0].record.url == "https://example.invalid/000.jpg"


def test_a_crash_inside_one_sample_does_not_stop_the_shard(hostile_shard, box_cfg, monkeypatch):
    from annotate.data import prepare as prep

    real = prep._add_mask

    def flaky(region, *a, **k):
        if ":gray:" in region.region_id:
            raise RuntimeError("boom")  # escapes prepare_sample, unlike a mask error
        return real(region, *a, **k)

    monkeypatch.setattr(prep, "_add_mask", flaky)
    path, expect = hostile_shard
    prepared, stats = _run(path, box_cfg)
    assert len(prepared) == len(expect)
    gray = next(p for p in prepared if p.record.image_key == "gray")
    assert [r.status for r in gray.record.regions] == ["failed"]
    assert gray.record.regions[0].error == "internal error: RuntimeError: boom"
    assert any("internal error: RuntimeError: boom" in msg for msg in stats.problems)
