"""Joint image/mask transforms and RLE decoding."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from annotate.pixclip.transforms import decode_rle, mask_box, prepare_views

pytestmark = pytest.mark.usefixtures("one_thread")


def test_decode_rle_roundtrip():
    m = np.zeros((10, 14), dtype=bool)
    m[2:5, 3:9] = True
    enc = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    assert np.array_equal(decode_rle({"size": [10, 14], "counts": enc["counts"].decode()}), m)


def test_views_crop_tightly_and_keep_geometry():
    image = np.zeros((40, 80, 3), dtype=np.uint8)
    mask = np.zeros((40, 80), dtype=bool)
    mask[10:20, 60:80] = True
    image[mask] = 255
    assert mask_box(mask) == (60, 10, 80, 20)
    views = prepare_views(image, mask, size=16, crop_margin=0.0)
    assert views["image"].shape == (3, 16, 16) and views["mask"].shape == (1, 16, 16)
    # the crop is filled by the object: mask all ones, image white everywhere
    assert torch.allclose(views["crop_mask"], torch.ones(1, 16, 16))
    assert views["crop_image"].std(dim=(1, 2)).max() < 1e-4
    # in the full view the mask sits where the white pixels are (same interpolation for both)
    white = views["image"].mean(0) > 0
    assert torch.equal(white, views["mask"][0] > 0.5)
