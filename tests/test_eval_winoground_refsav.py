"""Winoground (PixCLIP Table 10) and Ref-SAV mask-text retrieval (Table 5), read from small folders in
their layouts (Winoground's original release: examples.jsonl + images/<name>.png; Ref-SAV: the
refsav_1000.jsonl list with COCO RLE masks) and scored by an oracle model whose image embedding is
the mean colour under the mask and whose text embedding is the colour word: the expected scores are
worked out by hand below."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from annotate.pixclip.transforms import _MEAN, _STD
from annotate.train.benchmarks import PROTOCOLS, MaskRetrievalTask, WinogroundTask, list_digest, protocol_help, read_task
from annotate.train.eval_tasks import run_task, winoground_scores

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ("red", "green", "blue")


class ColourModel(torch.nn.Module):
    """Image: the mean RGB under the mask (plus a zero), normalised; text: the colour word's one-hot."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, image, mask, normalize=True):
        pix = image * _STD + _MEAN
        col = (pix * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1e-6)
        return F.normalize(torch.cat([col, torch.zeros(len(col), 1)], 1), dim=-1)

    def encode_text(self, feats, normalize=True):
        return F.normalize(torch.as_tensor(feats), dim=-1)


def colour_words(texts):
    out = np.zeros((len(texts), 4), dtype=np.float32)
    for i, t in enumerate(texts):
        hits = [k for k, c in enumerate(WORDS) if c in t.split()]
        out[i, hits[0] if hits else 3] = 1
    return out


def _solid(path, rgb, shape=(40, 56)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*shape, 3), rgb, dtype=np.uint8)).save(path)


# ------------------------------------------------------------------------------ Winoground
def test_winoground_scores_by_their_definitions():
    """s[n, c, i]: caption c, image i. Text needs each image to prefer its caption; image needs each caption
    to prefer its image; ties fail (strict '>', as Winoground's code)."""
    s = torch.tensor([
        [[0.9, 0.1], [0.2, 0.8]],  # all right
        [[0.5, 0.6], [0.4, 0.7]],  # text right (0.5 > 0.4, 0.7 > 0.6); image wrong (0.5 < 0.6)
        [[0.5, 0.1], [0.9, 1.0]],  # image right (0.5 > 0.1, 1.0 > 0.9); text wrong (0.5 < 0.9)
        [[0.1, 0.9], [0.8, 0.2]],  # swapped: nothing right
        [[0.5, 0.5], [0.5, 0.5]],  # ties: nothing right
    ])
    res = winoground_scores(s)
    assert res == {"text_score": 2 / 5, "image_score": 2 / 5, "group_score": 1 / 5, "n": 5}
    assert winoground_scores(torch.zeros(0, 2, 2))["n"] == 0


def _winoground_folder(root, sub=""):
    """Four examples: all right; text right only; image right only; captions swapped.
    Colours and their cosines with the caption words (red, green):
      ex 1: i0 (153, 0, 204) -> (.6, 0, .8), i1 (170, 200, 0) -> (.648, .762, 0): text .6 > 0 and .762 > .648;
            image .6 < .648 (caption red prefers i1).
      ex 2: i0 (128, 221, 0) -> (.5, .866), i1 green: text .5 < .866 (i0 prefers "green"); image .5 > 0, 1 > .866."""
    base = root / sub if sub else root
    colours = [((255, 0, 0), (0, 255, 0)), ((153, 0, 204), (170, 200, 0)), ((128, 221, 0), (0, 255, 0)),
               ((255, 0, 0), (0, 255, 0))]
    captions = [("a red thing", "a green thing")] * 3 + [("a green thing", "a red thing")]
    lines = []
    for n, ((c0, c1), (t0, t1)) in enumerate(zip(colours, captions)):
        for k, rgb in enumerate((c0, c1)):
            _solid(base / "images" / f"ex_{n}_img_{k}.png", rgb)
        lines.append(json.dumps({"id": n, "caption_0": t0, "caption_1": t1, "tag": "Object", "image_0": f"ex_{n}_img_0",
                                 "image_1": f"ex_{n}_img_1", "num_main_preds": 1, "secondary_tag": "",
                                 "collapsed_tag": "Object"}))
    base.mkdir(parents=True, exist_ok=True)
    (base / "examples.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("sub", ["", "data"])
def test_winoground_reader_and_scores(tmp_path, sub):
    _winoground_folder(tmp_path, sub)
    task = read_task("winoground", tmp_path)
    assert isinstance(task, WinogroundTask) and len(task.examples) == 4
    ex_id, (p0, p1), (c0, c1) = task.examples[1]
    assert ex_id == "1" and p0.name == "ex_1_img_0.png" and p1.name == "ex_1_img_1.png" and c0 == "a red thing"
    res = run_task(ColourModel(), task, colour_words, size=16, batch_size=3)
    assert res["task"] == "winoground" and res["n"] == 4
    assert res["text_score"] == pytest.approx(0.5) and res["image_score"] == pytest.approx(0.5)
    assert res["group_score"] == pytest.approx(0.25)


def test_winoground_missing_image_is_an_error(tmp_path):
    _winoground_folder(tmp_path)
    (tmp_path / "images" / "ex_2_img_1.png").unlink()
    with pytest.raises(FileNotFoundError, match="ex_2_img_1"):
        read_task("winoground", tmp_path)


# ------------------------------------------------------------------------------ Ref-SAV
def _rle_compressed(mask):
    from pycocotools import mask as mask_utils

    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in enc["size"]], "counts": enc["counts"].decode()}


def _rle_uncompressed(mask):
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of 0s."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for px in flat:
        if px == value:
            run += 1
        else:
            counts.append(run)
            value, run = px, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _refsav_folder(root):
    """Two frames, each with two coloured objects on black; four masks, each text names its object's colour
    ("the red ..." twice would be one text: colours are unique per sample except where said)."""
    frames = {"frames/a.jpg": ((255, 0, 0), (0, 255, 0)), "frames/b.png": ((0, 0, 255), (0, 0, 0))}
    h, w = 40, 60
    left = np.zeros((h, w), bool)
    left[5:35, 4:26] = True
    right = np.zeros((h, w), bool)
    right[5:35, 34:56] = True
    for name, (lc, rc) in frames.items():
        img = np.zeros((h, w, 3), np.uint8)
        img[left], img[right] = lc, rc
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / name, quality=98)
    lines = [
        {"id": "sav_001_obj1", "image": "frames/a.jpg", "mask": _rle_compressed(left),
         "text": "the red object on the left of the frame, long description ..."},
        {"id": "sav_001_obj2", "image": "frames/a.jpg", "mask": _rle_uncompressed(right),
         "text": "the green object on the right, long description ..."},
        {"id": "sav_002_obj1", "image": "frames/b.png", "mask": _rle_compressed(left),
         "text": "the blue object, long description ..."},
    ]
    (root / "refsav_1000.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return lines


def test_refsav_reader_decodes_masks_and_scores_m2t_t2m(tmp_path):
    lines = _refsav_folder(tmp_path)
    task = read_task("refsav", tmp_path)
    assert isinstance(task, MaskRetrievalTask) and task.ids == [x["id"] for x in lines]
    mask = task.items[1][1]()  # the uncompressed RLE, decoded by data.masks.decode_rle
    assert mask.shape == (40, 60) and mask[20, 40] and not mask[20, 10] and mask.sum() == 30 * 22
    res = run_task(ColourModel(), task, colour_words, size=32, batch_size=2)
    assert res["task"] == "refsav" and res["n"] == 3
    for k in (1, 5, 10):
        assert res[f"m2t_r{k}"] == 1.0 and res[f"t2m_r{k}"] == 1.0


def test_refsav_is_mask_conditioned(tmp_path):
    """A mask-blind model (every mask all-ones) cannot tell the two objects of frame a apart: M2T R@1 falls."""
    _refsav_folder(tmp_path)
    task = read_task("refsav", tmp_path)
    blind = MaskRetrievalTask(task.name, [(p, (lambda: np.ones((40, 60), bool)), t) for p, _, t in task.items], task.ids)
    res = run_task(ColourModel(), blind, colour_words, size=32, batch_size=2)
    assert res["m2t_r1"] < 1.0


def test_refsav_list_is_recorded_and_checked(tmp_path):
    _refsav_folder(tmp_path)
    digest = hashlib.sha256((tmp_path / "refsav_1000.jsonl").read_bytes()).hexdigest()
    assert list_digest(tmp_path, "refsav") == digest and list_digest(tmp_path, "urban1k") is None
    with open(tmp_path / "refsav_1000.jsonl", "a") as f:
        f.write(json.dumps({"image": "frames/a.jpg", "text": "no mask"}) + "\n")
    with pytest.raises(ValueError, match="missing \\['mask'\\]"):
        read_task("refsav", tmp_path)


def test_protocols_say_what_the_new_tasks_are():
    help_text = protocol_help()
    assert "refsav: Table 5" in help_text and "winoground: Table 10" in help_text
    assert "not published" in PROTOCOLS["refsav"] and "user-supplied" in PROTOCOLS["refsav"]
    assert "s(c0,i0)>s(c1,i0)" in PROTOCOLS["winoground"]
