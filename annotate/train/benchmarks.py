"""Readers for the paper's evaluation benchmarks, each from its published layout on a local path.

A reader returns one of three task kinds (run by `eval_tasks.py`):
- `RegionTask`: classify (image, mask) pairs among class names (ImageNet-S, COCO instances);
- `ReferringTask`: pick, among an image's instance masks, the one an expression refers to (RefCOCO/+/g);
- `RetrievalTask`: whole-image <-> caption retrieval, several captions per image allowed (Flickr30k
  and COCO Karpathy test splits; ShareGPT4V, Urban1k, DOCCI long-text retrieval).
Images and masks are loaded lazily (`load`), so a task with 50k instances holds paths, not pixels.

Layout assumptions are listed per reader; the uncertain ones say so and sit in one place, so a
reader can be adjusted against a real copy.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MaskFn = Callable[[], np.ndarray]


def load_image(path: str | Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@dataclass
class RegionTask:
    name: str
    classes: list[str]
    items: list[tuple[Path, MaskFn, int]]  # (image, mask loader, class index)
    template: str = "a photo of a {}."
    box_crop: float | None = None  # COCO protocol: a square of this multiple of the box's long side first
    boxes: list[tuple[float, float, float, float]] | None = None  # per item, COCO's (x, y, w, h), for box_crop


@dataclass
class ReferringTask:
    name: str
    # per image: (image path, candidate mask loaders, [(expression, index of the target candidate)])
    images: list[tuple[Path, list[MaskFn], list[tuple[str, int]]]]


@dataclass
class RetrievalTask:
    name: str
    images: list[Path]
    captions: list[list[str]] = field(default_factory=list)  # captions[i]: the texts of images[i]


def _find(root: Path, *names: str) -> Path:
    for name in names:
        hits = sorted(root.glob(name)) if any(c in name for c in "*?[") else [root / name]
        for hit in hits:
            if hit.exists():
                return hit
    raise FileNotFoundError(f"none of {names} under {root}")


# ------------------------------------------------------------------------------ ImageNet-S
def read_imagenet_s(root: Path, split: str = "validation") -> RegionTask:
    """ImageNet-S (919 classes). Layout: `<split>/<wnid>/<name>.JPEG` images,
    `<split>-segmentation/<wnid>/<name>.png` masks whose pixel class id is R + 256 * G (0 background,
    1000 "other": both skipped), `ImageNetS_categories_im919.txt` (the class of id k is line k, from 1).
    Names come from ImageNet's `LOC_synset_mapping.txt` ("n01440764 tench, Tinca tinca": first name
    used) when present, else the wnid. One item per (image, class present in its mask)."""
    wnids = _find(root, "ImageNetS_categories_im919.txt", "**/ImageNetS_categories_im919.txt").read_text().split()
    names = {w: w for w in wnids}
    mapping = next(iter(sorted(root.glob("**/LOC_synset_mapping.txt"))), None)
    if mapping:
        for line in mapping.read_text().splitlines():
            wnid, _, rest = line.partition(" ")
            if wnid in names:
                names[wnid] = rest.split(",")[0].strip()
    items = []
    for png in sorted((root / f"{split}-segmentation").glob("*/*.png")):
        image = next((p for p in sorted((root / split / png.parent.name).glob(png.stem + ".*"))), None)
        if image is None:
            continue
        ids = np.unique(_class_ids(png))
        for cid in ids[(ids > 0) & (ids <= len(wnids))]:
            items.append((image, _segmentation_mask(png, int(cid)), int(cid) - 1))
    return RegionTask("imagenet-s", [names[w] for w in wnids], items)


def _class_ids(png: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1]


def _segmentation_mask(png: Path, cid: int) -> MaskFn:
    return lambda: _class_ids(png) == cid


# ------------------------------------------------------------------------------ COCO
def _coco(annotation_file: Path):
    from pycocotools.coco import COCO

    return COCO(str(annotation_file))


def read_coco_instances(root: Path, split: str = "val2017") -> RegionTask:
    """COCO instance classification, PixCLIP's protocol (StuHude/PixCLIP `eval/COCO/mask_image_test.py`,
    `COCO_Masked_Test`): `annotations/instances_<split>.json` (polygon or RLE masks, boxes, categories)
    and `<split>/` images. Every annotation is an item, crowd ones included (the reference iterates
    `coco.anns`); each is cut as a square of 1.5 x max(w, h) around its box, padded white beyond the
    image (`box_crop`, `eval_tasks.square_box_crop`)."""
    coco = _coco(_find(root, f"annotations/instances_{split}.json", f"instances_{split}.json"))
    cats = sorted(coco.cats)
    items, boxes = [], []
    for ann in coco.dataset["annotations"]:
        info = coco.imgs[ann["image_id"]]
        items.append((_find(root, f"{split}/{info['file_name']}", f"images/{split}/{info['file_name']}"),
                      _ann_mask(coco, ann), cats.index(ann["category_id"])))
        boxes.append(tuple(float(v) for v in ann["bbox"]))
    return RegionTask(f"coco-instances-{split}", [coco.cats[c]["name"] for c in cats], items, box_crop=1.5, boxes=boxes)


def _ann_mask(coco, ann: dict) -> MaskFn:
    return lambda: coco.annToMask(ann).astype(bool)


# ------------------------------------------------------------------------------ RefCOCO/+/g
REFER_FILES = {"refcoco": "refs(unc).p", "refcoco+": "refs(unc).p", "refcocog": "refs(umd).p"}


def read_refcoco(root: Path, dataset: str = "refcoco", split: str = "val") -> ReferringTask:
    """RefCOCO / RefCOCO+ / RefCOCOg in the `refer` toolkit's layout: `<dataset>/refs(unc).p`
    (refcocog: `refs(umd).p`; a pickled list of refs with image_id, ann_id, split, sentences[].sent)
    and `<dataset>/instances.json` (COCO-style masks of COCO train2014), images in `train2014/` or
    `images/train2014/`. Candidates: every instance of the image; accuracy counts sentences whose
    best-matching candidate is the referred one (splits: val, testA, testB, test)."""
    with open(_find(root, f"{dataset}/{REFER_FILES[dataset]}"), "rb") as f:
        refs = pickle.load(f)
    coco = _coco(_find(root, f"{dataset}/instances.json"))
    by_image: dict[int, list[tuple[str, int]]] = {}
    for ref in refs:
        if ref["split"] == split:
            for s in ref["sentences"]:
                by_image.setdefault(ref["image_id"], []).append((s["sent"], ref["ann_id"]))
    images = []
    for image_id, sents in sorted(by_image.items()):
        anns = coco.imgToAnns[image_id]
        ids = [a["id"] for a in anns]
        name = coco.imgs[image_id]["file_name"]
        path = _find(root, f"train2014/{name}", f"images/train2014/{name}", f"images/{name}")
        images.append((path, [_ann_mask(coco, a) for a in anns], [(s, ids.index(a)) for s, a in sents]))
    return ReferringTask(f"{dataset}-{split}", images)


# ------------------------------------------------------------------------------ retrieval
def read_karpathy(root: Path, dataset: str = "flickr30k", split: str = "test") -> RetrievalTask:
    """Flickr30k / COCO retrieval on Karpathy's split: `dataset_<name>.json` ({"images": [{filename,
    filepath (COCO only), split, sentences: [{raw}]}]}); images in `flickr30k-images/` or `images/`
    (Flickr30k), `<filepath>/` (COCO: val2014/). 1k Flickr30k / 5k COCO test images, 5 captions each."""
    spec = json.loads(_find(root, f"dataset_{'coco' if dataset.startswith('coco') else dataset}.json").read_text())
    images, captions = [], []
    for im in spec["images"]:
        if im["split"] != split:
            continue
        sub = [im["filepath"]] if im.get("filepath") else ["flickr30k-images", "images", "."]
        images.append(_find(root, *[f"{d}/{im['filename']}" for d in sub]))
        captions.append([s["raw"] for s in im["sentences"]])
    return RetrievalTask(f"{dataset}-{split}", images, captions)


def read_urban1k(root: Path) -> RetrievalTask:
    """Urban1k (Long-CLIP): `image/<n>.jpg` and `caption/<n>.txt`, one long caption per image."""
    base = root / "Urban1k" if (root / "Urban1k").is_dir() else root
    images, captions = [], []
    for txt in sorted((base / "caption").glob("*.txt")):
        image = next(iter(sorted((base / "image").glob(txt.stem + ".*"))), None)
        if image is not None:
            images.append(image)
            captions.append([txt.read_text().strip()])
    return RetrievalTask("urban1k", images, captions)


def read_docci(root: Path, split: str = "test") -> RetrievalTask:
    """DOCCI: `docci_descriptions.jsonlines` (one JSON per line: example_id, split, image_file,
    description) and `images/<image_file>`; the `test` split (5k images) by default."""
    images, captions = [], []
    for line in _find(root, "docci_descriptions.jsonlines").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec["split"] == split:
                images.append(_find(root, f"images/{rec['image_file']}", rec["image_file"]))
                captions.append([rec["description"]])
    return RetrievalTask(f"docci-{split}", images, captions)


SHAREGPT4V_FILE = "share-captioner_coco_lcs_sam_1246k_1107.json"


def read_sharegpt4v(root: Path, n: int = 1000) -> RetrievalTask:
    """ShareGPT4V long-caption retrieval. Assumed (as Long-CLIP's eval does; not certain): the first
    `n` entries of `share-captioner_coco_lcs_sam_1246k_1107.json` (a list of {image: path relative to
    the bench dir, conversations: [..., {from: gpt, value: caption}]}); the caption is the first
    "gpt" turn."""
    spec = json.loads(_find(root, SHAREGPT4V_FILE, "**/" + SHAREGPT4V_FILE).read_text())
    images, captions = [], []
    for rec in spec[:n]:
        text = next(c["value"] for c in rec["conversations"] if c["from"] == "gpt")
        images.append(_find(root, rec["image"], f"data/{rec['image']}"))
        captions.append([text.strip()])
    return RetrievalTask("sharegpt4v", images, captions)


READERS: dict[str, Callable[[Path], RegionTask | ReferringTask | RetrievalTask]] = {
    "imagenet-s": read_imagenet_s,
    "coco-instances": read_coco_instances,
    "refcoco": lambda root: read_refcoco(root, "refcoco"),
    "refcoco+": lambda root: read_refcoco(root, "refcoco+"),
    "refcocog": lambda root: read_refcoco(root, "refcocog"),
    "flickr30k": lambda root: read_karpathy(root, "flickr30k"),
    "coco-retrieval": lambda root: read_karpathy(root, "coco"),
    "sharegpt4v": read_sharegpt4v,
    "urban1k": read_urban1k,
    "docci": read_docci,
}


# The evaluation protocol of each task, as `annotate eval --task` runs it (also in each result's JSON).
_REGION = ("top1/top5: the mean over classes of per-class accuracy (Alpha-CLIP eval/imagenet_s_zs_test/"
           "imagenet_s_zs_test.py, PixCLIP eval/COCO/eval_coco.py); top1_micro/top5_micro: over items; "
           "prompt 'a photo of a {}.'")
_RETRIEVAL = "whole image resized to size x size without crop (PixCLIP eval/*/load_*.py), all-ones mask; R@1/5/10 both ways"
PROTOCOLS: dict[str, str] = {
    "imagenet-s": f"{_REGION}; one item per (image, class in its mask); CLIP view (centre square, slid onto the region)",
    "coco-instances": f"{_REGION}; every annotation, crowd included; a square of 1.5 x max(w, h) around the box, "
                      "padded white, resized to size x size",
    "refcoco": "accuracy: the expression's best-matching ground-truth instance mask is the referred one (not ReCLIP's "
               "proposals); split val",
    **{name: _RETRIEVAL for name in ("flickr30k", "coco-retrieval", "sharegpt4v", "urban1k", "docci")},
}
PROTOCOLS["refcoco+"] = PROTOCOLS["refcocog"] = PROTOCOLS["refcoco"]


def protocol_help() -> str:
    """The `--task` help text: each task and its protocol."""
    return "; ".join(f"{name}: {text}" for name, text in PROTOCOLS.items())


def read_task(name: str, root: str | Path):
    if name not in READERS:
        raise ValueError(f"unknown task {name!r}; one of {sorted(READERS)}")
    return READERS[name](Path(root))
