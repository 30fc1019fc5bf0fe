"""Joint image/mask transforms and RLE decoding."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from annotate.data.masks import decode_rle
from annotate.pixclip.transforms import _MEAN, _STD, full_window, mask_box, prepare_views

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
    # the crop is a square around the 20 x 10 box: the object fills its middle half of rows, all columns
    crop = views["crop_mask"][0]
    assert torch.allclose(crop[5:11], torch.ones(6, 16)) and crop[:3].max() < 0.01 and crop[-3:].max() < 0.01
    white = views["crop_image"].mean(0) > 0
    assert torch.equal(white, crop > 0.5)
    # the region lies outside CLIP's centre square (x 20..60): the square slid right onto it
    white = views["image"].mean(0) > 0
    assert torch.equal(white, views["mask"][0] > 0.5) and views["mask"].sum() > 0


def test_full_view_is_clip_resize_and_centre_crop():
    """Aspect kept (a disc stays round), the long side's ends cut off: CLIP's Resize + CenterCrop,
    applied identically to the image and the mask."""
    h, w = 60, 120
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (xx - 60) ** 2 + (yy - 30) ** 2 <= 20**2
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[disc] = 255
    image[:, :10] = 128  # a stripe at the left edge, outside the centre square (x 30..90)
    views = prepare_views(image, disc, size=30)
    m = views["mask"][0] > 0.5
    rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
    assert abs(len(rows) - len(cols)) <= 1 and 18 <= len(rows) <= 22  # round, 40 px -> 20 px
    pixels = views["image"] * _STD + _MEAN  # back to [0, 1]
    assert torch.equal(pixels.mean(0) > 0.5, m)  # image and mask aligned
    assert pixels.max() > 0.9 and pixels[..., :3].max() < 0.05  # the left stripe is cut off
    from torchvision.transforms import CenterCrop, Resize

    ref = CenterCrop(30)(Resize(30, antialias=True)(torch.from_numpy(disc)[None].float()))
    assert (torch.abs(ref - views["mask"]) > 0.5).float().mean() < 0.02


def test_full_view_slides_only_when_centre_loses_the_region():
    mask = np.zeros((40, 100), dtype=bool)
    mask[5:30, 55:85] = True  # 2/3 of it inside the centre square (x 30..70): CLIP's crop is kept
    assert full_window(mask) == (30, 0, 70, 40)
    mask[:] = False
    mask[5:30, 75:100] = True  # outside: the square slides to the right end
    assert full_window(mask) == (60, 0, 100, 40)
