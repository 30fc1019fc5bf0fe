"""The paper's benchmarks read from small fixtures written in each published layout, scored by an
oracle model: its image embedding is the mean colour under the mask and its text embedding the colour
word, so a correct reader + runner scores exactly 1.0 and a mask-blind or mis-parsed one does not."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from annotate.pixclip.transforms import _MEAN, _STD
from annotate.train.benchmarks import read_task
from annotate.train.eval_tasks import run_task

pytestmark = pytest.mark.usefixtures("one_thread")

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def encode_image(self, image, mask, normalize=True):
        pix = image * _STD + _MEAN
        col = (pix * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1e-6)
        return F.normalize(torch.cat([col, torch.zeros(len(col), 1)], 1), dim=-1)

    def encode_text(self, feats, normalize=True):
        return F.normalize(feats, dim=-1)


def colour_words(texts):
    out = np.zeros((len(texts), 4), dtype=np.float32)
    for i, t in enumerate(texts):
        hits = [k for k, c in enumerate(RGB) if c in t]
        out[i, hits[0] if hits else 3] = 1
    return out


def _two_colour_image(path, left: str, right: str, fmt="JPEG"):
    """48 x 64: a `left` block at x 4..28, a `right` block at x 36..60 (rows 8..40), black elsewhere."""
    img = np.zeros((48, 64, 3), dtype=np.uint8)
    img[8:40, 4:28], img[8:40, 36:60] = RGB[left], RGB[right]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format=fmt, quality=95)


def _score(task_name, root):
    return run_task(ColourModel(), read_task(task_name, root), colour_words, size=32, batch_size=3)


def test_imagenet_s(tmp_path):
    """Class id = R + 256 * G in the segmentation PNG; id 1000 ("other") and 0 are skipped."""
    wnids = [f"n{k:08d}" for k in range(1, 920)]
    (tmp_path / "ImageNetS_categories_im919.txt").write_text("\n".join(wnids) + "\n")
    names = {1: "red fish", 2: "green frog", 300: "blue jay"}
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "\n".join(f"{wnids[k - 1]} {v}, other name" for k, v in names.items()) + "\n")
    for n, (left, right, ids) in enumerate([("red", "blue", (1, 300)), ("green", "red", (2, 1))]):
        wnid = wnids[ids[0] - 1]
        _two_colour_image(tmp_path / "validation" / wnid / f"ILSVRC2012_val_{n}.JPEG", left, right)
        seg = np.zeros((48, 64, 3), dtype=np.uint8)
        for (x0, x1), cid in zip(((4, 28), (36, 60)), ids):
            seg[8:40, x0:x1, 0], seg[8:40, x0:x1, 1] = cid % 256, cid // 256
        seg[0:4, 0:4, 0], seg[0:4, 0:4, 1] = 1000 % 256, 1000 // 256  # "other"
        (tmp_path / "validation-segmentation" / wnid).mkdir(parents=True, exist_ok=True)
        Image.fromarray(seg).save(tmp_path / "validation-segmentation" / wnid / f"ILSVRC2012_val_{n}.png")
    task = read_task("imagenet-s", tmp_path)
    assert len(task.classes) == 919 and task.classes[299] == "blue jay" and task.classes[5] == wnids[5]
    assert sorted(label for _, _, label in task.items) == [0, 0, 1, 299]
    res = _score("imagenet-s", tmp_path)
    assert res["top1"] == 1.0 and res["n"] == 4


def _coco_json(images, anns, path):
    cats = [{"id": 3, "name": "red car"}, {"id": 7, "name": "green tree"}, {"id": 9, "name": "blue sky"}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def _poly(x0, x1):
    return [[x0, 8, x1, 8, x1, 40, x0, 40]]


def _rle(x0, x1):
    from pycocotools import mask as mask_utils

    m = np.zeros((48, 64), dtype=np.uint8)
    m[8:40, x0:x1] = 1
    enc = mask_utils.encode(np.asfortranarray(m))
    return {"size": [48, 64], "counts": enc["counts"].decode()}


def test_coco_instances(tmp_path):
    """Polygon and RLE masks, crowd annotations kept (as PixCLIP's COCO_Masked_Test), 1.5x square box crops."""
    _two_colour_image(tmp_path / "val2017" / "000000000001.jpg", "red", "green")
    _two_colour_image(tmp_path / "val2017" / "000000000002.jpg", "blue", "red")
    images = [{"id": 1, "file_name": "000000000001.jpg", "height": 48, "width": 64},
              {"id": 2, "file_name": "000000000002.jpg", "height": 48, "width": 64}]
    anns = [{"id": 10, "image_id": 1, "category_id": 3, "segmentation": _poly(4, 28), "bbox": [4, 8, 24, 32], "area": 768, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 7, "segmentation": _rle(36, 60), "bbox": [36, 8, 24, 32], "area": 768, "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 9, "segmentation": _poly(4, 28), "bbox": [4, 8, 24, 32], "area": 768, "iscrowd": 0},
            {"id": 13, "image_id": 2, "category_id": 3, "segmentation": _rle(36, 60), "bbox": [36, 8, 24, 32], "area": 768, "iscrowd": 1}]
    _coco_json(images, anns, tmp_path / "annotations" / "instances_val2017.json")
    task = read_task("coco-instances", tmp_path)
    assert task.classes == ["red car", "green tree", "blue sky"] and task.box_crop == 1.5
    res = _score("coco-instances", tmp_path)
    assert res["top1"] == 1.0 and res["n"] == 4 and len(task.boxes) == 4


def test_refcoco(tmp_path):
    _two_colour_image(tmp_path / "train2014" / "COCO_train2014_000000000001.jpg", "red", "blue")
    images = [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 48, "width": 64}]
    anns = [{"id": 10, "image_id": 1, "category_id": 3, "segmentation": _poly(4, 28), "bbox": [4, 8, 24, 32], "area": 768, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 9, "segmentation": _poly(36, 60), "bbox": [36, 8, 24, 32], "area": 768, "iscrowd": 0}]
    _coco_json(images, anns, tmp_path / "refcoco" / "instances.json")
    refs = [{"ref_id": 0, "ann_id": 11, "image_id": 1, "split": "val", "category_id": 9,
             "sentences": [{"sent": "the blue one"}, {"sent": "right blue box"}]},
            {"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "val", "category_id": 3, "sentences": [{"sent": "red thing"}]},
            {"ref_id": 2, "ann_id": 11, "image_id": 1, "split": "testA", "category_id": 9, "sentences": [{"sent": "red"}]}]
    with open(tmp_path / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    res = _score("refcoco", tmp_path)
    assert res == {"task": "refcoco-val", "accuracy": 1.0, "n": 3, "images": 1}


def _check_retrieval(res, images, texts):
    assert res["images"] == images and res["texts"] == texts
    assert res["i2t_r1"] == res["t2i_r1"] == 1.0


def _solid(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 56, 3), RGB[colour], dtype=np.uint8)).save(path, format="JPEG", quality=95)


def test_flickr30k_and_coco_karpathy(tmp_path):
    images = []
    for n, colour in enumerate(RGB):
        _solid(tmp_path / "flickr30k-images" / f"{n}.jpg", colour)
        images.append({"filename": f"{n}.jpg", "split": "test",
                       "sentences": [{"raw": f"a {colour} wall"}, {"raw": f"something {colour}"}]})
    images.append({"filename": "9.jpg", "split": "train", "sentences": [{"raw": "red"}]})  # not read
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    _check_retrieval(_score("flickr30k", tmp_path), 3, 6)
    coco = tmp_path / "coco"
    for im in images[:3]:
        _solid(coco / "val2014" / im["filename"], im["sentences"][0]["raw"].split()[1])
        im["filepath"] = "val2014"
    (coco / "dataset_coco.json").write_text(json.dumps({"images": images[:3]}))
    _check_retrieval(_score("coco-retrieval", coco), 3, 6)


def test_long_text_sets(tmp_path):
    urban = tmp_path / "Urban1k"
    for n, colour in enumerate(RGB):
        _solid(urban / "image" / f"{n + 1}.jpg", colour)
        (urban / "caption" / f"{n + 1}.txt").parent.mkdir(parents=True, exist_ok=True)
        (urban / "caption" / f"{n + 1}.txt").write_text(f"A long description of a {colour} scene. " * 5)
    _check_retrieval(_score("urban1k", tmp_path), 3, 3)

    docci = tmp_path / "docci"
    lines = []
    for n, colour in enumerate(RGB):
        _solid(docci / "images" / f"test_{n:05d}.jpg", colour)
        lines.append({"example_id": f"test_{n:05d}", "split": "test", "image_file": f"test_{n:05d}.jpg",
                      "description": f"The picture is entirely {colour}."})
    lines.append({"example_id": "train_0", "split": "train", "image_file": "missing.jpg", "description": "red"})
    (docci / "docci_descriptions.jsonlines").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    _check_retrieval(_score("docci", docci), 3, 3)

    share = tmp_path / "sharegpt4v"
    recs = []
    for n, colour in enumerate(RGB):
        _solid(share / "coco" / "train2017" / f"{n}.jpg", colour)
        recs.append({"id": str(n), "image": f"coco/train2017/{n}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": f"A {colour} surface."}]})
    (share / "share-captioner_coco_lcs_sam_1246k_1107.json").write_text(json.dumps(recs))
    _check_retrieval(_score("sharegpt4v", share), 3, 3)


def test_eval_command_runs_a_task(tmp_path, tiny_train_cfg):
    """`annotate eval --task urban1k --bench-dir PATH` on a saved run writes the task's JSON."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from annotate.cli import app
    from annotate.pixclip.build import build_pixclip
    from annotate.train.synthetic import TEXT_DIM

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_0000001"
    ckpt.mkdir(parents=True)
    save_file(build_pixclip(tiny_train_cfg, TEXT_DIM).state_dict(), ckpt / "model.safetensors")
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    (run / "run.json").write_text(json.dumps({"config": tiny_train_cfg.model_dump(mode="json"), "text_dim": TEXT_DIM, "synthetic": True}))
    for n, colour in enumerate(RGB):
        _solid(tmp_path / "urban" / "image" / f"{n}.jpg", colour)
        (tmp_path / "urban" / "caption").mkdir(parents=True, exist_ok=True)
        (tmp_path / "urban" / "caption" / f"{n}.txt").write_text(f"a {colour} scene")
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(run), "--task", "urban1k", "--bench-dir", str(tmp_path / "urban")])
    assert res.exit_code == 0, res.output
    out = json.loads((run / "eval-urban1k.json").read_text())
    assert out["task"] == "urban1k" and out["images"] == 3 and 0 <= out["i2t_r1"] <= 1
