"""Run a benchmark task (`benchmarks.py`) with a PixCLIP model: `annotate eval --task NAME --bench-dir PATH`.

Texts go through the same frozen encoder as the training cache (`encode_texts`: list of str -> array
of frozen features), then the model's adaptor. Images are embedded in batches on the model's device
and every ranking uses `chunked_topk`, so memory stays bounded on 5k-image / 25k-caption sets.

What each task reports, and the paper's column it matches (`benchmarks.PROTOCOLS` says how):
- region classification (imagenet-s, coco-instances): `top1`, `top5` over class prompts
  ("a photo of a {}."), the mean of per-class accuracies as the reference scripts compute them
  (Table 8's Top1/Top5); `top1_micro`, `top5_micro` over items;
- referring (refcoco, refcoco+, refcocog): `accuracy`, the share of expressions whose best-matching
  instance mask is the referred one;
- retrieval (flickr30k, coco-retrieval, sharegpt4v, urban1k, docci): `i2t_r1/5/10`, `t2i_r1/5/10`
  with the all-ones mask (whole image), as the I2T / T2I columns of the retrieval tables;
- mask-text retrieval (refsav): `m2t_r1/5/10`, `t2m_r1/5/10` (Table 5), on the sample list supplied;
- winoground: `text_score`, `image_score`, `group_score` (Table 10's T., I., G.);
- REC on proposals (rec-refcoco-val, rec-refcoco-testA, ...): `accuracy`, the share of expressions whose
  best-matching proposal (with its given SAM mask) has IoU > 0.5 with the referred box (ReCLIP's test).

`--audit-overlap TRAIN_OUT` (train/overlap.py) first reports the evaluation images that also appear in a
training output, by perceptual hash; `--exclude-overlap` evaluates without them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from annotate.pixclip.transforms import full_view, stretch_view
from annotate.train.benchmarks import (
    PROTOCOLS,
    MaskRetrievalTask,
    ProposalReferringTask,
    ReferringTask,
    RegionTask,
    RetrievalTask,
    WinogroundTask,
    list_digest,
    load_image,
    read_task,
)
from annotate.train.evaluate import chunked_topk, load_run, model_device, retrieval_metrics

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


def square_box_crop(image: np.ndarray, mask: np.ndarray, box_xywh, scale: float = 1.5,
                    pad: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """PixCLIP's COCO crop (StuHude/PixCLIP `eval/COCO/mask_image_test.py`, `masked_crop` and `crop`): the
    image padded by `pad` white pixels (mask 0) on every side, then a square of scale x max(w, h) centred
    on the box, with the reference's integer edges (clipped to the padded image, the far edge at size-1).
    The padding is not built: the window is read into a white canvas."""
    H, W = mask.shape
    w = int(box_xywh[2]) if int(box_xywh[2]) > 0 else 1
    h = int(box_xywh[3]) if int(box_xywh[3]) > 0 else 1
    r, half = max(h, w), (scale - 1.0) / 2
    tl_x = int(box_xywh[0] + pad) - (r - w) / 2
    tl_y = int(box_xywh[1] + pad) - (r - h) / 2

    def edges(tl: float, limit: int) -> tuple[int, int]:
        lo, hi = tl - half * r, tl + (1 + half) * r
        return (int(lo) if lo > 0 else 0), (int(hi) if hi < limit else limit - 1)

    (x0, x1), (y0, y1) = edges(tl_x, W + 2 * pad), edges(tl_y, H + 2 * pad)
    out_image = np.full((max(y1 - y0, 0), max(x1 - x0, 0), 3), 255, dtype=np.uint8)
    out_mask = np.zeros(out_image.shape[:2], dtype=bool)
    sx0, sx1, sy0, sy1 = max(x0, pad), min(x1, pad + W), max(y0, pad), min(y1, pad + H)
    if sx1 > sx0 and sy1 > sy0:
        out_image[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0 - pad : sy1 - pad, sx0 - pad : sx1 - pad]
        out_mask[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = mask[sy0 - pad : sy1 - pad, sx0 - pad : sx1 - pad]
    return out_image, out_mask


def class_mean_accuracy(top: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """The mean over the classes present of each class's top-k accuracy (the reference scripts' number:
    a class with 5 items weighs as much as one with 5,000)."""
    hit = (top[:, :k] == labels[:, None]).any(1).float()
    classes = labels.unique()
    return float(torch.stack([hit[labels == c].mean() for c in classes]).mean()) if len(classes) else 0.0


def run_region(model, task: RegionTask, encode_texts: TextFn, size: int, batch_size: int = 64) -> dict:
    text = _embed_texts(model, encode_texts, [task.template.format(c) for c in task.classes])
    tops, labels = [], []
    for i in range(0, len(task.items), batch_size):
        views = []
        for j, (path, mask_fn, label) in enumerate(task.items[i : i + batch_size], start=i):
            image, mask = load_image(path), mask_fn()
            if task.box_crop:
                views.append(stretch_view(*square_box_crop(image, mask, task.boxes[j], task.box_crop), size))
            else:
                views.append(full_view(image, mask, size))
            labels.append(label)
        tops.append(chunked_topk(_embed_views(model, views, batch_size), text, 5))
    top = torch.cat(tops).cpu()
    lab = torch.tensor(labels)
    return {"top1": class_mean_accuracy(top, lab, 1), "top5": class_mean_accuracy(top, lab, 5),
            "top1_micro": float((top[:, 0] == lab).float().mean()), "top5_micro": float((top == lab[:, None]).any(1).float().mean()),
            "n": len(lab), "classes": len(task.classes), "classes_present": int(lab.unique().numel())}


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
            views.append(stretch_view(image, np.ones(image.shape[:2], dtype=bool), size))
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


def box_iou(a, b) -> float:
    """IoU of two (x, y, w, h) boxes on continuous coordinates (ReCLIP's `Box` / `iou`)."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def run_proposal_referring(model, task: ProposalReferringTask, encode_texts: TextFn, size: int,
                           batch_size: int = 64) -> dict:
    """Each expression picks the proposal whose (image, mask) embedding is nearest its text; right when that
    proposal's box has IoU > 0.5 with a box of the referred object (strict, as ReCLIP)."""
    hits = total = 0
    for path, boxes, mask_fns, sentences in task.images:
        image = load_image(path)
        h, w = image.shape[:2]
        views = []
        for m in mask_fns:
            mask = m()
            if mask.shape != (h, w):
                raise ValueError(f"{path}: proposal mask {mask.shape} does not match the image {(h, w)}")
            views.append(full_view(image, mask, size))
        cands = _embed_views(model, views, batch_size)
        text = _embed_texts(model, encode_texts, [s for s, _ in sentences])
        best = (text @ cands.T).argmax(dim=1).cpu().tolist()
        for (_, gold), k in zip(sentences, best):
            box = boxes[k] if boxes[k] is not None else (0.0, 0.0, float(w), float(h))
            hits += any(box_iou(box, g) > 0.5 for g in gold)
            total += 1
    return {"accuracy": hits / max(total, 1), "n": total, "images": len(task.images), "masks": task.masks}


def _whole(image: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return stretch_view(image, np.ones(image.shape[:2], dtype=bool), size)


def run_mask_retrieval(model, task: MaskRetrievalTask, encode_texts: TextFn, size: int, batch_size: int = 64,
                       ks=(1, 5, 10)) -> dict:
    """(image, mask) <-> text recall@k, each sample's own text its positive (`evaluate.retrieval_metrics`:
    identical texts are one item, a text query hit by any of its masks). Views: the whole frame and its
    mask resized to size x size."""
    embs = []
    for i in range(0, len(task.items), batch_size):
        views = []
        for path, mask_fn, _ in task.items[i : i + batch_size]:
            image, mask = load_image(path), mask_fn()
            if mask.shape != image.shape[:2]:
                raise ValueError(f"{path}: mask {mask.shape} does not match the image {image.shape[:2]}")
            views.append(stretch_view(image, mask, size))
        embs.append(_embed_views(model, views, batch_size))
    texts = [t for _, _, t in task.items]
    if not texts:
        return {"n": 0}
    res = retrieval_metrics(torch.cat(embs), _embed_texts(model, encode_texts, texts), texts, ks)
    return {**res, "n": len(texts)}


def winoground_scores(s: torch.Tensor) -> dict:
    """`s` (N, 2, 2): s[n, c, i] the similarity of caption c and image i of example n. Winoground's
    definitions (facebook/winoground; Thrush et al. 2022), strict '>':
    text: s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1); image: s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0);
    group: both."""
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    group = text & image
    n = max(int(s.shape[0]), 1)
    return {"text_score": float(text.sum()) / n, "image_score": float(image.sum()) / n,
            "group_score": float(group.sum()) / n, "n": int(s.shape[0])}


def run_winoground(model, task: WinogroundTask, encode_texts: TextFn, size: int, batch_size: int = 64) -> dict:
    """Both images of each example whole (all-ones mask), both captions; scores by `winoground_scores`."""
    sims = []
    per = max(batch_size // 2, 1)  # examples per batch: two images each
    for i in range(0, len(task.examples), per):
        chunk = task.examples[i : i + per]
        views = [_whole(load_image(p), size) for _, paths, _ in chunk for p in paths]
        img = _embed_views(model, views, batch_size).view(len(chunk), 2, -1)
        txt = _embed_texts(model, encode_texts, [c for _, _, caps in chunk for c in caps]).view(len(chunk), 2, -1)
        sims.append(torch.einsum("nce,nie->nci", txt.float(), img.float()).cpu())
    s = torch.cat(sims) if sims else torch.zeros(0, 2, 2)
    return winoground_scores(s)


def run_task(model, task, encode_texts: TextFn, size: int, batch_size: int = 64) -> dict:
    runner = {RegionTask: run_region, ReferringTask: run_referring, RetrievalTask: run_retrieval,
              MaskRetrievalTask: run_mask_retrieval, WinogroundTask: run_winoground,
              ProposalReferringTask: run_proposal_referring}[type(task)]
    return {"task": task.name, **runner(model, task, encode_texts, size, batch_size)}


def audit_and_exclude(bench, train_out: str | Path, bench_dir: str | Path | None = None, exclude: bool = False,
                      threshold: int | None = None):
    """(task, report): the overlap audit of `bench` against training output `train_out` (train/overlap.py)
    and, with `exclude`, the task without the overlapping images; the report says how many evaluated
    units (items, images or examples) there were before and after."""
    from annotate.train.overlap import DEFAULT_THRESHOLD, audit_task, exclude_images, task_size

    audit = audit_task(bench, train_out, DEFAULT_THRESHOLD if threshold is None else threshold, bench_dir)
    audit["units_before"] = task_size(bench)
    if exclude:
        bench = exclude_images(bench, {m["eval_image"] for m in audit["matches"]})
    audit["excluded"] = bool(exclude)
    audit["units_evaluated"] = task_size(bench)
    return bench, audit


def text_encoder_for(cfg, meta: dict) -> TextFn:
    """The frozen encoder the run's text cache came from (the synthetic runs' bag of words)."""
    if meta.get("synthetic"):
        from annotate.train.synthetic import BagOfWordsEncoder

        return BagOfWordsEncoder(seed=cfg.seed)
    from annotate.train.text_cache import make_text_encoder

    return make_text_encoder(cfg)


def evaluate_task(checkpoint: str | Path, task: str, bench_dir: str | Path, output: str | Path | None = None,
                  batch_size: int = 64, audit_overlap: str | Path | None = None, exclude_overlap: bool = False,
                  overlap_threshold: int | None = None) -> dict:
    """`annotate eval --task NAME --bench-dir PATH`: one benchmark (benchmarks.READERS), JSON out
    (default RUN/eval-NAME.json). With `audit_overlap` (a training output), the evaluation images also
    found in it by perceptual hash are reported under `overlap` (train/overlap.py) and, with
    `exclude_overlap`, left out of the evaluated set."""
    if exclude_overlap and not audit_overlap:
        raise ValueError("--exclude-overlap needs --audit-overlap TRAIN_OUT (the training output to compare with)")
    model, cfg, meta = load_run(checkpoint)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    bench = read_task(task, bench_dir)
    audit = None
    if audit_overlap:
        bench, audit = audit_and_exclude(bench, audit_overlap, bench_dir, exclude_overlap, overlap_threshold)
    res = run_task(model, bench, text_encoder_for(cfg, meta), cfg.image_size, batch_size)
    res["protocol"] = PROTOCOLS[task]
    digest = list_digest(Path(bench_dir), task)
    if digest:
        res["list_sha256"] = digest
    if audit is not None:
        res["overlap"] = audit
    out = Path(output) if output else Path(checkpoint) / f"eval-{task}.json"
    if out.parent.exists():
        out.write_text(json.dumps(res, indent=2))
    return res
