"""`annotate eval --zero-shot` streams its samples in batches (like `--task`): the same scores as one
forward pass over everything, with at most `batch_size` decoded images alive at any moment."""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from annotate.pixclip.build import build_pixclip
from annotate.pixclip.transforms import prepare_views
from annotate.train.evaluate import chunked_topk, load_zero_shot_json, zero_shot

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["a", "b", "c", "d", "e", "f"]


class CountingItems(Sequence):
    """Decodes (makes) an item's image when read and counts how many made images are still alive."""

    def __init__(self, n: int):
        self.n, self.live, self.peak, self.reads = n, 0, 0, 0

    def __len__(self):
        return self.n

    def _freed(self):
        self.live -= 1

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng(i)
        h, w = 20 + 3 * i, 40 - 2 * i
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), dtype=bool)
        mask[i % 5 : h // 2 + i % 7, 2 : w - i % 4] = True
        self.reads += 1
        self.live += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(image, self._freed)
        return image, mask, CLASSES[i % len(CLASSES)]


def _unbatched(model, items, feats, size):
    """The former implementation: every item decoded, one forward pass over all of them."""
    text = model.encode_text(torch.from_numpy(feats))
    labels = torch.tensor([CLASSES.index(lbl) for _, _, lbl in items])
    views = [prepare_views(img, msk, size) for img, msk, _ in items]
    emb = model.encode_image(torch.stack([v["image"] for v in views]), torch.stack([v["mask"] for v in views]))
    top = chunked_topk(emb, text, 5)
    return {"zs_top1": float((top[:, 0] == labels).float().mean()),
            "zs_top5": float((top == labels[:, None]).any(dim=1).float().mean()), "zs_classes": len(CLASSES)}


@pytest.fixture
def model_and_feats(tiny_train_cfg):
    torch.manual_seed(0)
    model = build_pixclip(tiny_train_cfg, 8).eval()
    feats = np.random.default_rng(1).standard_normal((len(CLASSES), 8)).astype(np.float32)
    return model, feats


@torch.no_grad()
def test_batched_equals_one_pass(model_and_feats, tiny_train_cfg):
    model, feats = model_and_feats
    items = [CountingItems(11)[i] for i in range(11)]
    want = _unbatched(model, items, feats, tiny_train_cfg.image_size)
    for batch_size in (1, 3, 4, 11, 64):
        got = zero_shot(model, items, CLASSES, feats, tiny_train_cfg.image_size, batch_size=batch_size)
        assert got == {**want, "zs_n": 11}, batch_size


@pytest.mark.parametrize("batch_size", [1, 3, 5])
def test_decoded_images_held_are_bounded_by_the_batch(model_and_feats, tiny_train_cfg, batch_size, monkeypatch):
    """Decoded images and their model-size views: at most one batch alive (the former code held all 13)."""
    import annotate.train.evaluate as ev

    model, feats = model_and_feats
    items = CountingItems(13)
    views = {"live": 0, "peak": 0}

    def freed():
        views["live"] -= 1

    def counting_views(*args, **kwargs):
        out = prepare_views(*args, **kwargs)
        views["live"] += 1
        views["peak"] = max(views["peak"], views["live"])
        weakref.finalize(out["image"], freed)
        return out

    monkeypatch.setattr(ev, "prepare_views", counting_views)
    res = zero_shot(model, items, CLASSES, feats, tiny_train_cfg.image_size, batch_size=batch_size)
    assert items.reads == 13 and res["zs_n"] == 13
    assert 1 <= items.peak <= batch_size and views["peak"] == batch_size  # one batch at a time
    assert items.live == 0 and views["live"] == 0


def test_json_samples_are_decoded_on_access(tmp_path, monkeypatch):
    from PIL import Image

    img = np.zeros((16, 24, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    enc = mask_utils.encode(np.asfortranarray(np.ones((16, 24), dtype=np.uint8)))
    sample = {"image": "x.png", "mask": {"size": [16, 24], "counts": enc["counts"].decode()}, "label": "a"}
    (tmp_path / "zs.json").write_text(json.dumps({"classes": ["a", "b"], "samples": [sample] * 200}))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    items, classes, template = load_zero_shot_json(tmp_path / "zs.json")
    assert len(items) == 200 and not opened and classes == ["a", "b"] and template == "{}"
    image, mask, label = items[5]
    assert image.shape == (16, 24, 3) and mask.shape == (16, 24) and label == "a" and len(opened) == 1
    (tmp_path / "bad.json").write_text(json.dumps({"classes": ["a"], "samples": [{**sample, "label": "zebra"}]}))
    with pytest.raises(ValueError, match="zebra"):
        load_zero_shot_json(tmp_path / "bad.json")
