"""Masks (given / GrabCut / box, fallbacks, RLE) and the region views built from them."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from annotate.config import CropConfig, MaskConfig
from annotate.data import masks as masks_mod
from annotate.data.crops import region_views
from annotate.data.masks import MaskError, decode_rle, encode_rle, make_mask
from annotate.data.records import RegionRecord


def _region(bbox, index=0):
    return RegionRecord(region_id=f"s:k:{index}", region_index=index, phrase="x", bbox=list(bbox))


def _disk_image(h=120, w=160, cx=80, cy=60, r=30):
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal(40, 10, (h, w, 3)), 0, 255).astype(np.uint8)  # dark noisy background
    yy, xx = np.mgrid[0:h, 0:w]
    disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    img[disk] = (230, 200, 40)
    return img, disk


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside pycocotools with numpy 2
def test_rle_round_trip_and_pycocotools_compat():
    m = np.zeros((7, 11), bool)
    m[2:5, 3:9] = True
    rle = encode_rle(m)
    assert rle.size == [7, 11] and isinstance(rle.counts, str)
    assert (decode_rle(rle) == m).all()
    assert (mask_utils.decode({"size": rle.size, "counts": rle.counts.encode()}) == m).all()
    uncompressed = {"size": [7, 11], "counts": [int(c) for c in _uncompressed_counts(m)]}
    assert (decode_rle(uncompressed) == m).all()


def _uncompressed_counts(m):
    flat = m.flatten(order="F").astype(int)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return counts


def test_box_mask():
    img = np.zeros((10, 20, 3), np.uint8)
    m, src = make_mask(img, _region([2.5, 1, 5, 4]), {}, MaskConfig(source="box"))
    assert src == "box" and m.shape == (10, 20) and m[1:5, 2:8].all() and m.sum() == 4 * 6


def test_given_mask_and_fallbacks():
    img = np.zeros((20, 30, 3), np.uint8)
    given = np.zeros((20, 30), bool)
    given[5:10, 5:12] = True
    meta = {"seudo_masks": [encode_rle(given).model_dump(), encode_rle(np.ones((5, 5), bool)).model_dump(), None,
                           {"size": [20, 30], "counts": "not an rle"}]}
    cfg = MaskConfig(source="given")
    m, src = make_mask(img, _region([4, 4, 10, 8], 0), meta, cfg)
    assert src == "given" and (m == given).all()
    for idx in (1, 2, 3, 4):  # wrong size, null, corrupt, missing entry
        m, src = make_mask(img, _region([4, 4, 10, 8], idx), meta, cfg)
        assert src == "box" and m.sum() == 80
    with pytest.raises(MaskError, match="is 5x5"):
        make_mask(img, _region([4, 4, 10, 8], 1), meta, MaskConfig(source="given", fallback="fail"))


def test_grabcut_finds_the_object():
    img, disk = _disk_image()
    m, src = make_mask(img, _region([40, 20, 80, 80]), {}, MaskConfig(source="grabcut"))
    assert src == "grabcut" and _iou(m, disk) > 0.85
    m2, _ = make_mask(img, _region([40, 20, 80, 80]), {}, MaskConfig(source="grabcut"))
    assert (m == m2).all()  # deterministic


def test_grabcut_runs_downscaled(monkeypatch):
    img, disk = _disk_image(h=900, w=1200, cx=600, cy=450, r=250)
    seen = []
    real = masks_mod.cv2.grabCut

    def spy(image, *a, **k):
        seen.append(image.shape[:2])
        return real(image, *a, **k)

    monkeypatch.setattr(masks_mod.cv2, "grabCut", spy)
    t = time.perf_counter()
    m, src = make_mask(img, _region([330, 180, 540, 540]), {}, MaskConfig(source="grabcut", grabcut_max_side=128))
    assert time.perf_counter() - t < 5
    assert src == "grabcut" and max(seen[0]) <= 128 and m.shape == (900, 1200) and _iou(m, disk) > 0.85


def test_grabcut_tiny_result_falls_back():
    img = np.full((60, 60, 3), 128, np.uint8)  # nothing to segment
    cfg = MaskConfig(source="grabcut", min_mask_frac=0.99)
    m, src = make_mask(img, _region([10, 10, 30, 30]), {}, cfg)
    assert src == "box" and m.sum() == 900
    whole, src = make_mask(img, _region([0, 0, 60, 60]), {}, MaskConfig(source="grabcut"))
    assert src == "box"  # no background around the box
    with pytest.raises(MaskError):
        make_mask(img, _region([10, 10, 30, 30]), {}, MaskConfig(source="grabcut", min_mask_frac=0.99, fallback="fail"))


def test_region_views_crop_around_mask():
    from PIL import Image

    img, disk = _disk_image()
    cfg = CropConfig(margin=0.1, min_side=16)
    v = region_views(Image.fromarray(img), disk, [0, 0, 160, 120], cfg)  # mask decides the crop, not the bbox
    x0, y0, x1, y1 = v.crop_box
    assert (x0, y0, x1, y1) == (43, 23, 118, 98)  # disk spans 50..110 x 30..90 (61 px), +ceil(6.1) px margin
    assert v.crop.size == v.crop_mask.size == (75, 75) and v.crop.mode == "RGB" and v.crop_mask.mode == "L"
    cm = np.asarray(v.crop_mask)
    assert set(np.unique(cm)) == {0, 255} and ((cm > 0) == disk[y0:y1, x0:x1]).all()
    hl = np.asarray(v.highlighted).astype(int)
    assert v.highlighted.size == (160, 120)
    assert hl[0, 0, 0] == 255 and (hl[60, 80] != img[60, 80]).any()  # outline on bbox edge, mask tinted


def test_region_views_min_side_and_max_side():
    from PIL import Image

    mask = np.zeros((50, 400), bool)
    mask[20:22, 300:302] = True
    v = region_views(Image.new("RGB", (400, 50)), mask, [300, 20, 2, 2], CropConfig(min_side=32, margin=0))
    x0, y0, x1, y1 = v.crop_box
    assert x1 - x0 == 32 and y1 - y0 == 32 and x0 <= 300 and x1 >= 302
    big = np.ones((300, 2000), bool)
    v = region_views(Image.new("RGB", (2000, 300)), big, [0, 0, 2000, 300], CropConfig(max_side=500))
    assert max(v.crop.size) == 500 and v.crop_mask.size == v.crop.size and max(v.highlighted.size) == 500
