"""REC as ReCLIP / Alpha-CLIP run it (issue 26): detector proposals with given SAM masks, all splits,
right when the chosen proposal's box has IoU > 0.5 with the referred box. Files are written by the test
in ReCLIP's release layout (reclip_data/<dataset>_<split>.jsonl, <dataset>_dets_dict.json) plus the
per-proposal SAM masks as COCO RLE; the model is the colour oracle, so the expected accuracy is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from annotate.train.benchmarks import PROTOCOLS, ProposalReferringTask, read_task
from annotate.train.eval_tasks import box_iou, run_task
from test_eval_winoground_refsav import ColourModel, colour_words

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 48, 64


def _rle(mask):
    from pycocotools import mask as mask_utils

    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in enc["size"]], "counts": enc["counts"].decode()}


def _block(x, y, w, h):
    m = np.zeros((H, W), bool)
    m[y : y + h, x : x + w] = True
    return m


def _reclip_folder(root, dataset="refcoco", split="testA", sam=True):
    """Image 1: red object at (4, 8, 20, 30), green at (40, 8, 20, 30). Image 2: a blue object at (10, 10, 20, 20),
    whose only proposal is a loose box (IoU 0.25 with it): picked, yet wrong by ReCLIP's IoU test. Image 3 has
    no detections (the whole image is its one proposal, IoU 400 / 3072 with the referred box: wrong)."""
    objects = {1: [(11, (255, 0, 0), (4, 8, 20, 30)), (12, (0, 255, 0), (40, 8, 20, 30))],
               2: [(21, (0, 0, 255), (10, 10, 20, 20))],
               3: [(31, (0, 0, 255), (10, 10, 20, 20))]}
    (root / "train2014").mkdir(parents=True)
    lines = []
    for image_id, objs in objects.items():
        img = np.zeros((H, W, 3), np.uint8)
        for _, rgb, (x, y, w, h) in objs:
            img[y : y + h, x : x + w] = rgb
        Image.fromarray(img).save(root / "train2014" / f"COCO_train2014_{image_id:012d}.jpg", quality=98)
        anns = [{"id": ann_id, "bbox": list(box), "category_id": 1} for ann_id, _, box in objs]
        for ann_id, rgb, _ in objs:
            colour = {(255, 0, 0): "red", (0, 255, 0): "green", (0, 0, 255): "blue"}[rgb]
            lines.append({"file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "image_id": image_id,
                          "ann_id": ann_id, "anns": anns, "height": H, "width": W,
                          "sentences": [{"raw": f"The {colour.upper()} thing"}, {"raw": f"{colour} object"}]})
    data = root / "reclip_data"
    data.mkdir()
    (data / f"{dataset}_{split}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    # proposals: image 1 a bit loose around each object (IoU > 0.5), plus a decoy on the black background
    dets = {"1": [[3, 7, 22, 32, 0.9], [39, 7, 22, 32, 0.8], [26, 40, 10, 6, 0.3]],
            "2": [[0, 0, 40, 40, 0.7]]}
    (data / f"{dataset}_dets_dict.json").write_text(json.dumps(dets))
    if sam:
        masks = {"1": [_rle(_block(4, 8, 20, 30)), _rle(_block(40, 8, 20, 30)), _rle(_block(26, 40, 10, 6))],
                 "2": [_rle(_block(10, 10, 20, 20))]}
        (data / f"{dataset}_sam_masks.json").write_text(json.dumps(masks))


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert box_iou((10, 10, 20, 20), (0, 0, 40, 40)) == pytest.approx(0.25)


def test_rec_with_proposals_and_sam_masks(tmp_path):
    _reclip_folder(tmp_path)
    task = read_task("rec-refcoco-testA", tmp_path)
    assert isinstance(task, ProposalReferringTask) and task.masks == "sam" and len(task.images) == 3
    path, boxes, masks, sentences = task.images[0]
    assert path.name == "COCO_train2014_000000000001.jpg"  # ReCLIP's file name with the ann id cut off
    assert len(boxes) == len(masks) == 3 and sentences[0] == ("the red thing", [(4.0, 8.0, 20.0, 30.0)])
    assert task.images[2][1] == [None]  # no detections: the whole image
    res = run_task(ColourModel(), task, colour_words, size=32, batch_size=2)
    # image 1: 4 expressions right; image 2: the blue proposal is chosen but IoU 0.25; image 3: whole image
    assert res["n"] == 8 and res["accuracy"] == pytest.approx(4 / 8) and res["masks"] == "sam"


def test_rec_without_mask_file_uses_box_masks_and_says_so(tmp_path):
    _reclip_folder(tmp_path, sam=False)
    task = read_task("rec-refcoco-testA", tmp_path)
    assert task.masks == "box"
    mask = task.images[0][2][0]()
    assert mask.shape == (H, W) and mask[7:39, 3:25].all() and mask.sum() == 22 * 32
    res = run_task(ColourModel(), task, colour_words, size=32, batch_size=4)
    assert res["masks"] == "box" and res["accuracy"] == pytest.approx(4 / 8)


@pytest.mark.parametrize("name", ["rec-refcoco-val", "rec-refcoco-testB", "rec-refcoco+-testA", "rec-refcocog-test"])
def test_every_split_is_reachable(tmp_path, name):
    _, dataset, split = name.split("-")
    _reclip_folder(tmp_path, dataset, split)
    assert read_task(name, tmp_path).name == name
    assert "IoU > 0.5" in PROTOCOLS[name]


def test_mask_count_must_match_the_proposals(tmp_path):
    _reclip_folder(tmp_path)
    masks_file = tmp_path / "reclip_data" / "refcoco_sam_masks.json"
    masks = json.loads(masks_file.read_text())
    masks["1"] = masks["1"][:2]
    masks_file.write_text(json.dumps(masks))
    with pytest.raises(ValueError, match="2 SAM masks for 3 proposals"):
        read_task("rec-refcoco-testA", tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        read_task("rec-refcocog-testA", tmp_path)
