"""Readers for the paper's evaluation benchmarks, each from its published layout on a local path.

A reader returns one of three task kinds (run by `eval_tasks.py`):
- `RegionTask`: classify (image, mask) pairs among class names (ImageNet-S, COCO instances);
- `ReferringTask`: pick, among an image's instance masks, the one an expression refers to (RefCOCO/+/g);
- `RetrievalTask`: whole-image <-> caption retrieval, several captions per image allowed (Flickr30k
  and COCO Karpathy test splits; ShareGPT4V, Urban1k, DOCCI long-text retrieval);
- `MaskRetrievalTask`: (image, mask) <-> text retrieval, one text per mask (Ref-SAV, PixCLIP Table 5);
- `WinogroundTask`: two images, two captions per example; text, image and group scores (Table 10);
- `ProposalReferringTask`: REC as ReCLIP / Alpha-CLIP run it: pick among detector proposals (each with a
  given SAM mask), right when the chosen box has IoU > 0.5 with the referred object's box.
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


@dataclass
class MaskRetrievalTask:
    name: str
    # per sample: (image path, mask loader, text); the sample's text is its positive
    items: list[tuple[Path, MaskFn, str]]
    ids: list[str] = field(default_factory=list)  # per sample, the list's own id (for reports, overlap)


@dataclass
class WinogroundTask:
    name: str
    # per example: (id, (image_0, image_1), (caption_0, caption_1)); caption_k belongs to image_k
    examples: list[tuple[str, tuple[Path, Path], tuple[str, str]]]


@dataclass
class ProposalReferringTask:
    name: str
    # per image: (image path, proposal boxes (x, y, w, h), one mask loader per proposal,
    #             [(expression, gold boxes (x, y, w, h) of the referred object)])
    images: list[tuple[Path, list[tuple[float, float, float, float]], list[MaskFn], list[tuple[str, list[tuple]]]]]
    masks: str = "sam"  # "sam": given per-proposal masks; "box": the proposal's rectangle (no mask file)


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


# ------------------------------------------------------------------------------ REC with proposals
REC_SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco+": ("val", "testA", "testB"), "refcocog": ("val", "test")}


def read_reclip(root: Path, dataset: str = "refcoco", split: str = "val") -> ProposalReferringTask:
    """REC on detector proposals with SAM masks, the protocol of ReCLIP (allenai/reclip `main.py`) that
    Alpha-CLIP's `eval/rec_zs_test` and PixCLIP's Table 6 RefCOCO column follow. Files, in ReCLIP's
    release layout (`reclip_data.tar.gz`) under the folder or its `reclip_data/`:
    - `<dataset>_<split>.jsonl`: one referred object per line: file_name (COCO's `COCO_train2014_<id>_<n>.jpg`,
      read as `COCO_train2014_<id>.jpg` as ReCLIP does), image_id, anns [{id, bbox (x, y, w, h)}], ann_id
      (one or a list: the referred object), sentences [{raw}];
    - `<dataset>_dets_dict.json`: the detector's proposals, {image_id: [[x, y, w, h, ...], ...]} (or a list of
      {image_id, box}); an image without any gets the whole image as its one proposal, as ReCLIP does;
    - SAM masks of those proposals, given (this project does not run SAM here): `<dataset>_sam_masks.json`,
      {image_id: [COCO RLE, ...]}, one per proposal in the detections' order. Without the file each proposal's
      mask is its box (`masks: "box"` in the result: not the reference protocol).
    Images in `train2014/`, `images/train2014/` or `data/train2014/`. Accuracy: an expression is right when the
    best-scoring proposal's box has IoU > 0.5 with a box of the referred object (ReCLIP's test). Splits:
    refcoco and refcoco+ val / testA / testB, refcocog val / test (the umd split)."""
    from annotate.data.masks import decode_rle

    if split not in REC_SPLITS.get(dataset, ()):
        raise ValueError(f"{dataset} has splits {REC_SPLITS.get(dataset)}, not {split!r}")
    lines = _find(root, f"reclip_data/{dataset}_{split}.jsonl", f"{dataset}_{split}.jsonl").read_text().splitlines()
    dets_file = _find(root, f"reclip_data/{dataset}_dets_dict.json", f"{dataset}_dets_dict.json")
    dets = json.loads(dets_file.read_text())
    if isinstance(dets, dict):
        proposals = {int(k): [_xywh(b) for b in v] for k, v in dets.items()}
    else:
        proposals = {}
        for d in dets:
            proposals.setdefault(int(d["image_id"]), []).append(_xywh(d["box"]))
    sam = None
    for name in (f"reclip_data/{dataset}_sam_masks.json", f"{dataset}_sam_masks.json"):
        if (root / name).exists():
            sam = {int(k): v for k, v in json.loads((root / name).read_text()).items()}
    by_image: dict[int, list] = {}
    for line in lines:
        if not line.strip():
            continue
        datum = json.loads(line)
        name = datum["file_name"]
        if "coco" in name.lower():
            name = "_".join(name.split("_")[:-1]) + ".jpg"
        wanted = datum["ann_id"] if isinstance(datum["ann_id"], list) else [datum["ann_id"]]
        gold = [_xywh(a["bbox"]) for a in datum["anns"] if a["id"] in wanted]
        if not gold:
            raise ValueError(f"{dataset}_{split}: ann_id {wanted} is not among the anns of {datum['file_name']}")
        entry = by_image.setdefault(int(datum["image_id"]), [name, []])
        entry[1].extend((s["raw"].lower(), gold) for s in datum["sentences"])  # ReCLIP lower-cases the text
    images = []
    for image_id, (name, sentences) in sorted(by_image.items()):
        path = _find(root, f"train2014/{name}", f"images/train2014/{name}", f"data/train2014/{name}", f"images/{name}")
        boxes = proposals.get(image_id) or []
        if sam is not None:
            rles = sam.get(image_id, [])
            if len(rles) != len(boxes):
                raise ValueError(f"image {image_id}: {len(rles)} SAM masks for {len(boxes)} proposals")
            masks = [_rle_mask(decode_rle, {"size": list(r["size"]), "counts": r["counts"]}) for r in rles]
        else:
            masks = [_box_mask(path, b) for b in boxes]
        if not boxes:  # ReCLIP: the whole image is the one proposal
            boxes, masks = [None], [_box_mask(path, None)]
        images.append((path, boxes, masks, sentences))
    return ProposalReferringTask(f"rec-{dataset}-{split}", images, masks="sam" if sam is not None else "box")


def _xywh(box) -> tuple[float, float, float, float]:
    b = box["box"] if isinstance(box, dict) else box
    if isinstance(b, dict):
        return float(b["x"]), float(b["y"]), float(b["w"]), float(b["h"])
    return float(b[0]), float(b[1]), float(b[2]), float(b[3])


def _box_mask(path: Path, box) -> MaskFn:
    """The rectangle of `box` (the whole image for None) at the image's size, read from its header."""

    def load() -> np.ndarray:
        from PIL import Image, ImageOps

        with Image.open(path) as im:
            w, h = ImageOps.exif_transpose(im).size
        mask = np.zeros((h, w), dtype=bool)
        if box is None:
            mask[:] = True
        else:
            x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
            mask[y0 : int(np.ceil(box[1] + box[3])), x0 : int(np.ceil(box[0] + box[2]))] = True
        return mask

    return load


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


# ------------------------------------------------------------------------------ Winoground
WINOGROUND_FILES = ("examples.jsonl", "data/examples.jsonl", "metadata.jsonl", "data/metadata.jsonl")


def read_winoground(root: Path) -> WinogroundTask:
    """Winoground (Thrush et al. 2022; PixCLIP Table 10), the dataset's original release
    (`facebook/winoground`: `data/examples.jsonl` and `data/images.zip`, unzipped): `examples.jsonl`, one
    JSON per line with id, caption_0, caption_1, image_0, image_1 (plus tag, secondary_tag,
    num_main_preds, collapsed_tag, not used), the images named `<image_k>.png` in `images/` (400 examples,
    800 images). Also found under `data/`, and as `metadata.jsonl` (a later layout of the same file).
    caption_k describes image_k."""
    spec = _find(root, *WINOGROUND_FILES)
    base = spec.parent
    examples = []
    for line in spec.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        paths = tuple(_image_named(root, base, str(rec[f"image_{k}"])) for k in (0, 1))
        examples.append((str(rec["id"]), paths, (str(rec["caption_0"]), str(rec["caption_1"]))))
    return WinogroundTask("winoground", examples)


def _image_named(root: Path, base: Path, name: str) -> Path:
    """`images/<name>.png` next to the examples file or under the root; a name that already has an
    extension is used as it is."""
    names = [name] if Path(name).suffix else [f"{name}.png", f"{name}.jpg"]
    return _find(root, *[f"{d}/{n}" for d in (str(base.relative_to(root)) + "/images", "images", "data/images", ".")
                         for n in names])


# ------------------------------------------------------------------------------ Ref-SAV
REFSAV_FILE = "refsav_1000.jsonl"


def read_refsav(root: Path) -> MaskRetrievalTask:
    """Ref-SAV mask-text retrieval (PixCLIP Table 5: M2T and T2M R@1/5/10 on 1,000 mask-text samples).

    Ref-SAV (Sa2VA, Yuan et al. 2025) is a video referring-segmentation set (masklets with long
    descriptions); the paper says it "extracted 1,000 mask-text samples" from it and does not publish
    which, nor the frame of each masklet. So this reader takes a list the user supplies, in a fixed
    local layout: `refsav_1000.jsonl`, one JSON per line with `image` (a frame file, relative to the
    folder or to `images/`), `mask` (COCO RLE {size: [h, w], counts}: that frame's mask of the object;
    compressed or uncompressed counts) and `text` (the object's description), optionally `id` (default:
    the line number). Scores on another list are not the paper's numbers; the result records the
    list's sha256 (`list_sha256`) so two runs can be checked to use the same one."""
    from annotate.data.masks import decode_rle  # the project's one RLE decoder

    spec = _find(root, REFSAV_FILE)
    items, ids = [], []
    for n, line in enumerate(spec.read_text().splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        missing = [k for k in ("image", "mask", "text") if k not in rec]
        if missing:
            raise ValueError(f"{spec}:{n + 1}: missing {missing} (each line: image, mask (COCO RLE), text)")
        rle = {"size": list(rec["mask"]["size"]), "counts": rec["mask"]["counts"]}
        items.append((_find(root, rec["image"], f"images/{rec['image']}"), _rle_mask(decode_rle, rle), str(rec["text"])))
        ids.append(str(rec.get("id", n)))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{spec}: ids are not unique")
    return MaskRetrievalTask("refsav", items, ids)


def _rle_mask(decode, rle: dict) -> MaskFn:
    return lambda: decode(rle)


def list_digest(root: Path, name: str) -> str | None:
    """sha256 of a task's sample list when the list is user-supplied (Ref-SAV), else None."""
    import hashlib

    if name != "refsav":
        return None
    return hashlib.sha256(_find(Path(root), REFSAV_FILE).read_bytes()).hexdigest()


READERS: dict[str, Callable[[Path], RegionTask | ReferringTask | RetrievalTask | MaskRetrievalTask | WinogroundTask
                             | ProposalReferringTask]] = {
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
    "refsav": read_refsav,
    "winoground": read_winoground,
    **{f"rec-{d}-{sp}": (lambda root, d=d, sp=sp: read_reclip(root, d, sp))
       for d, splits in REC_SPLITS.items() for sp in splits},
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
               "proposals: rec-refcoco-<split> runs those); split val",
    **{name: _RETRIEVAL for name in ("flickr30k", "coco-retrieval", "sharegpt4v", "urban1k", "docci")},
}
PROTOCOLS["refcoco+"] = PROTOCOLS["refcocog"] = PROTOCOLS["refcoco"]
for _name in READERS:
    if _name.startswith("rec-"):
        PROTOCOLS[_name] = (
            "ReCLIP's REC (allenai/reclip main.py, as Alpha-CLIP eval/rec_zs_test runs it): the best of the detector "
            "proposals (<dataset>_dets_dict.json; none: the whole image) with their given SAM masks "
            "(<dataset>_sam_masks.json; absent: box masks, not the reference), right when its box has IoU > 0.5 "
            "with the referred box; ReCLIP's isolated proposal scoring ('baseline'), not its 'parse' relation "
            "heuristics nor the blur view; view: the whole image with the mask, CLIP view slid onto the region")
PROTOCOLS["refsav"] = (
    "Table 5: m2t_r1/5/10 and t2m_r1/5/10 over the samples of a user-supplied refsav_1000.jsonl (frame, COCO RLE "
    "mask, text); the paper's 1,000-sample list is not published, so scores are on the list given (its sha256 is "
    "recorded), not necessarily the paper's; whole frame and mask resized to size x size without crop (the other "
    "PixCLIP eval loaders' resize; PixCLIP's Ref-SAV script is not published); identical texts are one item")
PROTOCOLS["winoground"] = (
    "Table 10: text score (s(c0,i0)>s(c1,i0) and s(c1,i1)>s(c0,i1)), image score (s(c0,i0)>s(c0,i1) and "
    "s(c1,i1)>s(c1,i0)), group score (both), strict '>' as Winoground's code, s the cosine of PixCLIP's "
    "embeddings; whole image resized to size x size, all-ones mask; the original release's examples.jsonl + "
    "images/<name>.png")


def protocol_help() -> str:
    """The `--task` help text: each task and its protocol."""
    return "; ".join(f"{name}: {text}" for name, text in PROTOCOLS.items())


def read_task(name: str, root: str | Path):
    if name not in READERS:
        raise ValueError(f"unknown task {name!r}; one of {sorted(READERS)}")
    return READERS[name](Path(root))
