"""The evaluation protocols of the reference scripts (issue 26): COCO's square white-padded box crop,
the mean of per-class accuracies, and retrieval's plain 224 x 224 resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from annotate.pixclip.transforms import _MEAN, _STD
from annotate.train.benchmarks import RegionTask, RetrievalTask
from annotate.train.eval_tasks import class_mean_accuracy, run_region, run_retrieval, square_box_crop

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_masked_crop(image, bbox_xywh, bi_mask, crop_scale=1.5):
    """StuHude/PixCLIP eval/COCO/mask_image_test.py, `masked_crop` and `crop`, as published."""
    image = np.pad(image, ((600, 600), (600, 600), (0, 0)), "constant", constant_values=255)
    bi_mask = np.pad(bi_mask, ((600, 600), (600, 600)), "constant", constant_values=0)
    bbox_xywh = np.array(bbox_xywh, dtype=float)
    bbox_xywh[:2] += 600
    tl_x, tl_y = int(bbox_xywh[0]), int(bbox_xywh[1])
    w = int(bbox_xywh[2]) if int(bbox_xywh[2]) > 0 else 1
    h = int(bbox_xywh[3]) if int(bbox_xywh[3]) > 0 else 1
    image_h, image_w = image.shape[:2]
    r = max(h, w)
    tl_x -= (r - w) / 2
    tl_y -= (r - h) / 2
    half_scale = (crop_scale - 1.0) / 2
    w_l = int(tl_x - half_scale * r) if (tl_x - half_scale * r) > 0 else 0
    w_r = int(tl_x + (1 + half_scale) * r) if (tl_x + (1 + half_scale) * r) < image_w else image_w - 1
    h_t = int(tl_y - half_scale * r) if (tl_y - half_scale * r) > 0 else 0
    h_b = int(tl_y + (1 + half_scale) * r) if (tl_y + (1 + half_scale) * r) < image_h else image_h - 1
    return image[h_t:h_b, w_l:w_r, :], bi_mask[h_t:h_b, w_l:w_r]


def test_square_box_crop_is_the_reference_crop():
    """Boxes inside, across the border (white padding shows), degenerate (w = 0) and with float
    coordinates: the same pixels and mask as the reference's padded crop, without building the padding."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    mask = rng.random((60, 90)) > 0.5
    for box in ([20, 10, 30, 20], [0.0, 0.0, 12.7, 40.2], [80.5, 50.5, 9.4, 9.4], [45, 30, 0, 7], [0, 0, 90, 60]):
        got_image, got_mask = square_box_crop(image, mask, box)
        want_image, want_mask = _reference_masked_crop(image, box, mask.astype(np.uint8))
        assert np.array_equal(got_image, want_image) and np.array_equal(got_mask, want_mask.astype(bool)), box
    crop, crop_mask = square_box_crop(image, mask, [0, 0, 20, 10])
    assert crop.shape[:2] == (30, 30)  # 1.5 x max(w, h), square
    assert (crop[:5, :5] == 255).all() and not crop_mask[:5, :5].any()  # beyond the image: white, outside the mask


def test_class_mean_accuracy_weighs_every_class_alike():
    """3 items of class 0 right, 1 of class 1 wrong: the reference's 50%, not the items' 75%."""
    top = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 2]])
    labels = torch.tensor([0, 0, 0, 1])
    assert class_mean_accuracy(top, labels, 1) == pytest.approx(0.5)
    assert class_mean_accuracy(top, labels, 2) == pytest.approx(0.5)
    assert class_mean_accuracy(torch.tensor([[1, 0], [1, 2]]), torch.tensor([1, 2]), 2) == pytest.approx(1.0)


class _ColourModel(torch.nn.Module):
    """Embeds a view as the mean colour under its mask; texts are colour one-hots."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, image, mask, normalize=True):
        pix = image * _STD + _MEAN
        return F.normalize((pix * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1e-6) + 1e-3, dim=-1)

    def encode_text(self, feats, normalize=True):
        return F.normalize(torch.as_tensor(feats), dim=-1)


def _colour_words(texts):
    return np.array([[1.0 * ("red" in t), 1.0 * ("green" in t), 1.0 * ("blue" in t)] for t in texts], dtype=np.float32)


def test_region_results_report_class_mean_and_micro(tmp_path):
    """Three red regions named red (right) and one blue region labelled green (wrong)."""
    paths = []
    for i, colour in enumerate([(255, 0, 0)] * 3 + [(0, 0, 255)]):
        img = np.zeros((32, 32, 3), dtype=np.uint8)
        img[8:24, 8:24] = colour
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    square = np.zeros((32, 32), dtype=bool)
    square[8:24, 8:24] = True
    task = RegionTask("t", ["red", "green", "blue"], [(p, lambda: square, 0 if i < 3 else 1) for i, p in enumerate(paths)])
    res = run_region(_ColourModel(), task, _colour_words, size=16, batch_size=2)
    assert res["top1"] == pytest.approx(0.5) and res["top1_micro"] == pytest.approx(0.75) and res["classes_present"] == 2


def test_retrieval_sees_the_whole_image_not_a_centre_crop(tmp_path):
    """Wide images whose colour lies only at the left or right end: a centre square would show black for
    both; the reference's 224 x 224 resize keeps the ends, so each caption finds its image."""
    paths = []
    for i, (colour, side) in enumerate((((255, 0, 0), slice(0, 12)), ((0, 255, 0), slice(84, 96)))):
        img = np.zeros((32, 96, 3), dtype=np.uint8)
        img[:, side] = colour
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    task = RetrievalTask("wide", paths, [["a red thing"], ["a green thing"]])
    res = run_retrieval(_ColourModel(), task, _colour_words, size=16, batch_size=2, ks=(1,))
    assert res["i2t_r1"] == 1.0 and res["t2i_r1"] == 1.0
