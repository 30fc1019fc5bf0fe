"""Run a benchmark task (`benchmarks.py`) with a PixCLIP model: `annotate eval --task NAME --bench-dir PATH`.

Texts go through the same frozen encoder as the training cache (`encode_texts`: list of str -> array
of frozen features), then the model's adaptor. Images are embedded in batches on the model's device
and every ranking uses `chunked_topk`, so memory stays bounded on 5k-image / 25k-caption sets.

What each task reports, and the paper's column it matches:
- region classification (imagenet-s, coco-instances): `top1`, `top5` over class prompts
  ("a photo of a {}."), as Table 8's Top1/Top5;
- referring (refcoco, refcoco+, refcocog): `accuracy`, the share of expressions whose best-matching
  instance mask is the referred one;
- retrieval (flickr30k, coco-retrieval, sharegpt4v, urban1k, docci): `i2t_r1/5/10`, `t2i_r1/5/10`
  with the all-ones mask (whole image), as the I2T / T2I columns of the retrieval tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from annotate.pixclip.transforms import full_view, mask_box
from annotate.train.benchmarks import ReferringTask, RegionTask, RetrievalTask, load_image, read_task
from annotate.train.evaluate import chunked_topk, load_run, model_device

TextFn = Callable[[list[str]], np.ndarray]


@torch.no_grad()
def _embed_views(model, views: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> torch.Tensor:
    dev, out = model_device(model), []
    for i in range(0, len(views), batch_size):
        chunk = views[i : i + batch_size]
        out.append(model.encode_image(torch.stack([v[0] for v in chunk]).to(dev), torch.stack([v[1] for v in chunk]).to(dev)))
    return torch.cat(out) if out else torch.zeros(0, 1)


@torch.no_grad()
def _embed_texts(model, encode_texts: TextFn, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    dev, out = model_device(model), []
    for i in range(0, len(texts), batch_size):
        feats = np.asarray(encode_texts(texts[i : i + batch_size]), dtype=np.float32)
        out.append(model.encode_text(torch.from_numpy(feats).to(dev)))
    return torch.cat(out)


def box_crop(image: np.ndarray, mask: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask cut to `scale` x the mask's box around its centre (clipped to the image)."""
    x0, y0, x1, y1 = mask_box(mask)
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
    h, w = mask.shape
    a, b = int(max(0, np.floor(cx - hw))), int(min(w, np.ceil(cx + hw)))
    c, d = int(max(0, np.floor(cy - hh))), int(min(h, np.ceil(cy + hh)))
    return image[c:d, a:b], mask[c:d, a:b]


def run_region(model, task: RegionTask, encode_texts: TextFn, size: int, batch_size: int = 64) -> dict:
    text = _embed_texts(model, encode_texts, [task.template.format(c) for c in task.classes])
    tops, labels = [], []
    for i in range(0, len(task.items), batch_size):
        views = []
        for path, mask_fn, label in task.items[i : i + batch_size]:
            image, mask = load_image(path), mask_fn()
            if task.box_crop:
                image, mask = box_crop(image, mask, task.box_crop)
            views.append(full_view(image, mask, size))
            labels.append(label)
        tops.append(chunked_topk(_embed_views(model, views, batch_size), text, 5))
    top = torch.cat(tops).cpu()
    lab = torch.tensor(labels)
    return {"top1": float((top[:, 0] == lab).float().mean()), "top5": float((top == lab[:, None]).any(1).float().mean()),
            "n": len(lab), "classes": len(task.classes)}


def run_referring(model, task: ReferringTask, encode_texts: TextFn, size: int, batch_size: int = 64) -> dict:
    hits = total = 0
    for path, mask_fns, sentences in task.images:
        image = load_image(path)
        cands = _embed_views(model, [full_view(image, m(), size) for m in mask_fns], batch_size)
        text = _embed_texts(model, encode_texts, [s for s, _ in sentences])
        best = (text @ cands.T).argmax(dim=1).cpu()
        hits += int((best == torch.tensor([t for _, t in sentences])).sum())
        total += len(sentences)
    return {"accuracy": hits / max(total, 1), "n": total, "images": len(task.images)}


def run_retrieval(model, task: RetrievalTask, encode_texts: TextFn, size: int, batch_size: int = 64,
                  ks=(1, 5, 10)) -> dict:
    embs = []
    for i in range(0, len(task.images), batch_size):
        views = []
        for path in task.images[i : i + batch_size]:
            image = load_image(path)
            views.append(full_view(image, np.ones(image.shape[:2], dtype=bool), size))
        embs.append(_embed_views(model, views, batch_size))
    img = torch.cat(embs)
    texts = [t for caps in task.captions for t in caps]
    owner = torch.tensor([i for i, caps in enumerate(task.captions) for _ in caps], device=img.device)
    txt = _embed_texts(model, encode_texts, texts)
    kmax = max(ks)
    i2t = owner[chunked_topk(img, txt, kmax)]  # (I, k) owners of the retrieved captions
    t2i = chunked_topk(txt, img, kmax)  # (T, k) retrieved images
    own = torch.arange(len(task.images), device=img.device)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t[:, :k] == own[:, None]).any(1).float().mean())
        out[f"t2i_r{k}"] = float((t2i[:, :k] == owner[:, None]).any(1).float().mean())
    return {**out, "images": len(task.images), "texts": len(texts)}


def run_task(model, task, encode_texts: TextFn, size: int, batch_size: int = 64) -> dict:
    runner = {RegionTask: run_region, ReferringTask: run_referring, RetrievalTask: run_retrieval}[type(task)]
    return {"task": task.name, **runner(model, task, encode_texts, size, batch_size)}


def text_encoder_for(cfg, meta: dict) -> TextFn:
    """The frozen encoder the run's text cache came from (the synthetic runs' bag of words)."""
    if meta.get("synthetic"):
        from annotate.train.synthetic import BagOfWordsEncoder

        return BagOfWordsEncoder(seed=cfg.seed)
    from annotate.train.text_cache import make_text_encoder

    return make_text_encoder(cfg)


def evaluate_task(checkpoint: str | Path, task: str, bench_dir: str | Path, output: str | Path | None = None) -> dict:
    """`annotate eval --task NAME --bench-dir PATH`: one benchmark (benchmarks.READERS), JSON out
    (default RUN/eval-NAME.json)."""
    model, cfg, meta = load_run(checkpoint)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    res = run_task(model, read_task(task, bench_dir), text_encoder_for(cfg, meta), cfg.image_size)
    out = Path(output) if output else Path(checkpoint) / f"eval-{task}.json"
    if out.parent.exists():
        out.write_text(json.dumps(res, indent=2))
    return res
