"""PixCLIP evaluation: mask<->text retrieval (R@1/5/10) and zero-shot region classification.

Retrieval treats identical texts as one item (see `retrieval_metrics`) and ranks in chunks on the
model's device (`chunked_topk`). Held-out data: the regions of a frozen benchmark when the output has
one (`annotate eval --make-benchmark`, train/frozen.py), else those of images whose key hashes into
`eval_fraction` (see data.in_eval_split), or a freshly generated synthetic set (seed 2). Images are
embedded `batch_size` at a time (`--batch-size`), zero-shot samples decoded one batch at a time.

Zero-shot JSON format (paths relative to the JSON file):
  {"classes": ["cat", "dog"], "template": "a photo of a {}.",
   "samples": [{"image": "img/1.jpg", "mask": {"size": [h, w], "counts": "<COCO RLE>"}, "label": "cat"}]}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from annotate.config import TrainConfig
from annotate.pixclip.build import build_pixclip
from annotate.pixclip.model import PixCLIP
from annotate.data.masks import decode_rle
from annotate.pixclip.transforms import prepare_views, to_model_input

SYNTHETIC_EVAL_IMAGES = 100


def load_run(path: str | Path) -> tuple[PixCLIP, TrainConfig, dict]:
    """A trained model from a RUN folder (latest checkpoint) or from one checkpoint folder in it."""
    from annotate.train.trainer import RUN_FILE, latest_checkpoint

    path = Path(path)
    run = path if (path / RUN_FILE).exists() else path.parent.parent
    meta = json.loads((run / RUN_FILE).read_text())
    # Runs recorded before open_clip towers existed used a timm ViT.
    cfg = TrainConfig(**{"vision_source": "timm", **meta["config"]})
    ckpt = path if (path / "model.safetensors").exists() else latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint under {run}")
    model = build_pixclip(cfg.model_copy(update={"vision_checkpoint": None, "adaptor_checkpoint": None}), meta["text_dim"])
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    return model.eval(), cfg, meta


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_pairs(model: PixCLIP, dataset, batch_size: int = 64, mask_fill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (mask-conditioned image, text) embeddings on the model's device; `mask_fill`
    replaces every mask (0: zeroed)."""
    dev = model_device(model)
    imgs, txts = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        image, mask = to_model_input(batch["image"].to(dev), batch["mask"].to(dev))
        mask = mask if mask_fill is None else torch.full_like(mask, mask_fill)
        imgs.append(model.encode_image(image, mask))
        txts.append(model.encode_text(batch["text"].to(dev)))
    return torch.cat(imgs), torch.cat(txts)


@torch.no_grad()
def chunked_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Indices (Q, k) of the k most similar gallery rows for every query, by dot product.

    Computed on the tensors' device in chunk x chunk blocks of the similarity, merging a running
    top-k, so memory is bounded by the chunk whatever Q and G are (75k regions as one N x N float
    matrix would be 22 GB).
    """
    k = min(k, gallery.shape[0])
    out = []
    for q0 in range(0, queries.shape[0], chunk):
        q = queries[q0 : q0 + chunk]
        best_v = torch.full((q.shape[0], 0), float("-inf"), device=q.device, dtype=q.dtype)
        best_i = torch.zeros((q.shape[0], 0), device=q.device, dtype=torch.long)
        for g0 in range(0, gallery.shape[0], chunk):
            sim = q @ gallery[g0 : g0 + chunk].T
            v, i = sim.topk(min(k, sim.shape[1]), dim=1)
            best_v, pos = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + v.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + g0], 1).gather(1, pos)
        out.append(best_i)
    return torch.cat(out)


def retrieval_metrics(
    img: torch.Tensor, txt: torch.Tensor, ids: list[str], ks=(1, 5, 10), chunk: int = 4096
) -> dict[str, float]:
    """M2T and T2M recall@k for pairs (img[i], txt[i]) whose text identity is ids[i].

    Identical texts are one item: the text gallery holds each distinct text once (its first
    embedding), M2T asks whether a mask's own text is in its top k, and each distinct text is one
    T2M query, hit when any of its masks is in the top k (multi-positive, like COCO's 5 captions).
    """
    codes = {t: i for i, t in enumerate(dict.fromkeys(ids))}
    lab = torch.tensor([codes[t] for t in ids], device=img.device)
    firsts: dict[str, int] = {}
    for i, t in enumerate(ids):
        firsts.setdefault(t, i)
    first = torch.tensor(list(firsts.values()), device=img.device)
    texts = txt[first]
    kmax = max(ks)
    m2t = chunked_topk(img, texts, kmax, chunk)  # (N, k) distinct-text codes
    t2m = lab[chunked_topk(texts, img, kmax, chunk)]  # (U, k) codes of the retrieved masks
    own = torch.arange(len(codes), device=img.device)
    out = {}
    for k in ks:
        out[f"m2t_r{k}"] = float((m2t[:, :k] == lab[:, None]).any(dim=1).float().mean())
        out[f"t2m_r{k}"] = float((t2m[:, :k] == own[:, None]).any(dim=1).float().mean())
    out["n_texts"] = len(codes)
    return out


def chance_r1(ids: list[str]) -> float:
    """Expected M2T R@1 of a random ranking: one distinct text in the gallery is right."""
    return 1.0 / len(set(ids))


@torch.no_grad()
def zero_shot(model: PixCLIP, items: Sequence[tuple[np.ndarray, np.ndarray, str]], classes: list[str], class_feats: np.ndarray,
              image_size: int, batch_size: int = 64) -> dict[str, float]:
    """Top-1/top-5 accuracy of classifying (image, mask) pairs by their nearest class-text embedding.

    `items` is read one batch at a time (a `ZeroShotSamples` decodes on access), so at most
    `batch_size` decoded images and their views are held, as `--task` does; scores do not depend on it."""
    dev = model_device(model)
    text = model.encode_text(torch.from_numpy(np.asarray(class_feats, dtype=np.float32)).to(dev))
    tops, labels = [], []
    for start in range(0, len(items), batch_size):
        tops.append(_classify_batch(model, items, range(start, min(start + batch_size, len(items))), text, image_size,
                                    labels, classes))
    top = torch.cat(tops) if tops else torch.zeros((0, 5), dtype=torch.long, device=dev)
    lab = torch.tensor(labels, dtype=torch.long, device=top.device)
    return {
        "zs_top1": float((top[:, 0] == lab).float().mean()) if len(lab) else 0.0,
        "zs_top5": float((top == lab[:, None]).any(dim=1).float().mean()) if len(lab) else 0.0,
        "zs_classes": len(classes),
        "zs_n": len(lab),
    }


def _classify_batch(model, items, indices, text, image_size, labels: list, classes: list[str]) -> torch.Tensor:
    """(B, k<=5) nearest classes of items[indices]; the batch's images die when this returns."""
    views = []
    for j in indices:
        image, mask, label = items[j]
        views.append(prepare_views(image, mask, image_size))
        labels.append(classes.index(label))
    dev = model_device(model)
    emb = model.encode_image(torch.stack([v["image"] for v in views]).to(dev), torch.stack([v["mask"] for v in views]).to(dev))
    return chunked_topk(emb, text, 5)


class ZeroShotSamples(Sequence):
    """The samples of a zero-shot JSON; an item (image, mask, label) is decoded when read."""

    def __init__(self, root: Path, samples: list[dict]):
        self.root, self.samples = root, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        s = self.samples[i]
        with Image.open(self.root / s["image"]) as im:
            return np.asarray(im.convert("RGB")), decode_rle(s["mask"]), s["label"]


def load_zero_shot_json(path: str | Path) -> tuple[ZeroShotSamples, list[str], str]:
    """(samples, decoded lazily; classes; template). A label not among the classes is refused here."""
    path = Path(path)
    spec = json.loads(path.read_text())
    classes = list(spec["classes"])
    unknown = sorted({s["label"] for s in spec["samples"]} - set(classes))
    if unknown:
        raise ValueError(f"{path}: labels not in `classes`: {unknown[:5]}")
    return ZeroShotSamples(path.parent, list(spec["samples"])), classes, spec.get("template", "{}")


def _synthetic_eval(model: PixCLIP, cfg: TrainConfig, batch_size: int = 64) -> dict:
    from annotate.train.synthetic import COLORS, SHAPES, BagOfWordsEncoder, SyntheticDataset

    ds = SyntheticDataset(cfg, SYNTHETIC_EVAL_IMAGES, seed=2, train=False)
    ids = [ds.text_id(i) for i in range(len(ds))]
    regions, texts = embed_pairs(model, ds)
    res = retrieval_metrics(regions, texts, ids)
    # Mask-blind baselines: every mask zeroed (the requested one), and every mask all-ones (the
    # whole-image mode the model was trained on, a fairer blind reference).
    for fill, tag in ((0.0, "mask_zeroed"), (1.0, "mask_ones")):
        blind = retrieval_metrics(*embed_pairs(model, ds, mask_fill=fill), ids)
        res.update({f"{k}_{tag}": v for k, v in blind.items() if k.endswith("r1") or tag == "mask_zeroed"})
    res["chance_r1"] = chance_r1(ids)
    # Full-image retrieval (image with all-ones mask vs whole-image caption): Table 6's right half.
    enc = BagOfWordsEncoder(seed=cfg.seed)
    whole = ds.whole_images()
    views = [prepare_views(img, np.ones(img.shape[:2], bool), cfg.image_size) for img, _ in whole]
    dev = model_device(model)
    with torch.no_grad():
        wi = model.encode_image(torch.stack([v["image"] for v in views]).to(dev), torch.stack([v["mask"] for v in views]).to(dev))
        wt = model.encode_text(torch.from_numpy(enc([c for _, c in whole])).to(dev))
    full = retrieval_metrics(wi, wt, [c for _, c in whole])
    res.update({"i2t_r1": full["m2t_r1"], "t2i_r1": full["t2m_r1"]})
    classes = [f"{c} {s}" for c in COLORS for s in SHAPES]
    items = [(img, r["mask"], r["short"][2:]) for img, regs in ds.scenes for r in regs]
    res.update(zero_shot(model, items, classes, enc([f"a {c}" for c in classes]), cfg.image_size, batch_size))
    res["n_regions"] = len(ds)
    res.update(_short_and_negative_scores(model, ds, regions, BagOfWordsEncoder(seed=cfg.seed)))
    res.update(_part_scores(model, ds, enc, cfg.image_size, batch_size))
    return res


@torch.no_grad()
def _part_scores(model: PixCLIP, ds, enc, image_size: int, batch_size: int) -> dict:
    """What the part branch is for: each part's mask on its image -> its short text, retrieved among all
    parts' texts (`part_m2t_r1`; a shape's two halves differ only in the half's name)."""
    from annotate.pixclip.transforms import full_view

    dev = model_device(model)
    parts = [(img, p) for img, scene in ds.scenes for r in scene for p in r["parts"]]
    embs = []
    for i in range(0, len(parts), batch_size):
        views = [full_view(img, p["mask"], image_size) for img, p in parts[i : i + batch_size]]
        embs.append(model.encode_image(torch.stack([v[0] for v in views]).to(dev), torch.stack([v[1] for v in views]).to(dev)))
    short = [p["short"] for _, p in parts]
    texts = model.encode_text(torch.from_numpy(enc(short)).to(dev))
    return {"part_m2t_r1": retrieval_metrics(torch.cat(embs), texts, short)["m2t_r1"]}


@torch.no_grad()
def _short_and_negative_scores(model: PixCLIP, ds, regions: torch.Tensor, enc) -> dict:
    """What the short-text and hard-negative branches are for: region -> short text retrieval
    (`short_m2t_r1`), and picking a region's own description over its K hard negatives: all of them at
    once (`hn_acc`) and per edit type, one negative at a time (`hn_<type>`)."""
    dev = model_device(model)
    regs = [r for _, scene in ds.scenes for r in scene]
    short = model.encode_text(torch.from_numpy(enc([r["short"] for r in regs])).to(dev))
    out = {"short_m2t_r1": retrieval_metrics(regions, short, [r["short"] for r in regs])["m2t_r1"]}
    wins, pairs = [], {}
    for emb, r in zip(regions, regs):
        texts = model.encode_text(torch.from_numpy(enc([r["fine"]] + [t for _, t in r["negatives"]])).to(dev))
        scores = texts @ emb
        wins.append(bool(scores[0] > scores[1:].max()))
        for (kind, _), score in zip(r["negatives"], scores[1:]):
            pairs.setdefault(kind, []).append(bool(scores[0] > score))
    out["hn_acc"] = float(np.mean(wins))
    out.update({f"hn_{kind}": float(np.mean(v)) for kind, v in sorted(pairs.items())})
    return out


def evaluate(
    checkpoint: str | Path,
    data_dir: str | Path | None = None,
    synthetic: bool = False,
    zero_shot_json: str | Path | None = None,
    output: str | Path | None = None,
    batch_size: int = 64,
) -> dict:
    """`annotate eval`: metrics as a dict, also written to OUTPUT (default RUN/eval.json).

    On pipeline output with a frozen benchmark (OUT/benchmarks/longgrit-N.json, train/frozen.py) the
    gallery is exactly its N regions (an error if any is missing), `benchmark` names it and
    `benchmark_excluded_from_training` says whether the run recorded leaving that very file's images out."""
    model, cfg, meta = load_run(checkpoint)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    if synthetic or (data_dir is None and meta.get("synthetic")):
        res = _synthetic_eval(model, cfg, batch_size)
    else:
        from annotate.train.data import RegionDataset
        from annotate.train.text_cache import TextCache

        ds = RegionDataset(data_dir or meta["data_dir"], TextCache(meta["text_cache"]), cfg, split="eval")
        frozen = ds.benchmark
        if frozen is not None and len(ds) != frozen.n:
            found = {r.region_id for r in ds.refs}
            missing = sorted(frozen.region_ids - found)
            raise ValueError(f"{frozen.path} lists {frozen.n} regions; {len(missing)} are not in the data as trainable "
                             f"regions with a cached text (e.g. {missing[:3]}): re-run embed-text, or re-freeze")
        ids = [ds.text_id(i) for i in range(len(ds))]
        res = retrieval_metrics(*embed_pairs(model, ds, batch_size), ids) if len(ds) else {}
        res.update({"chance_r1": chance_r1(ids) if ids else 0.0, "n_regions": len(ds)})
        if frozen is not None:
            clean = (meta.get("benchmark") or {}).get("sha256") == frozen.digest
            res.update({"benchmark": frozen.name, "benchmark_excluded_from_training": clean})
            if not clean:
                print(f"warning: the run did not record leaving {frozen.path.name}'s images out of training "
                      "(trained before it was frozen, or on other data); its scores may be contaminated", file=sys.stderr)
        else:
            res["split"] = f"image-key hash, eval_fraction {cfg.eval_fraction}"
    if zero_shot_json:
        from annotate.train.text_cache import make_text_encoder

        items, classes, template = load_zero_shot_json(zero_shot_json)
        encoder = make_text_encoder(cfg)
        res.update(zero_shot(model, items, classes, encoder([template.format(c) for c in classes]), cfg.image_size,
                             batch_size))
    out = Path(output) if output else Path(checkpoint) / "eval.json"
    if out.parent.exists():
        out.write_text(json.dumps(res, indent=2))
    return res


def print_table(results: dict, title: str = "PixCLIP eval") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in results.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console(stderr=True).print(table)
