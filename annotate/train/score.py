"""`annotate score`: a PixCLIP checkpoint's region-text score (cosine of the mask-conditioned image
embedding and the description's) for every described region of a pipeline output, the score a
dataset user filters on (as DAM filters by a region CLIP score).

A checkpoint exists only after training, usually on an earlier dataset, so the scores are a side
file (OUT/quality/region_text_scores.parquet, keyed by region id), never a rewrite of committed
shard files; its metadata names the checkpoint and the data files it covers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from annotate.data.store import OutputStore
from annotate.data.images import decode_array
from annotate.data.masks import decode_rle
from annotate.data.records import is_trainable
from annotate.pixclip.transforms import prepare_views
from annotate.train.data import load_rows
from annotate.train.evaluate import load_run, model_device
from annotate.train.text_cache import TextCache


@torch.no_grad()
def _scores(model, cfg, batch: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[float]:
    views = [prepare_views(image, mask, cfg.image_size, cfg.crop_margin) for image, mask, _ in batch]
    dev = model_device(model)
    emb = model.encode_image(torch.stack([v["image"] for v in views]).to(dev), torch.stack([v["mask"] for v in views]).to(dev))
    txt = model.encode_text(torch.from_numpy(np.stack([t for _, _, t in batch])).to(dev))
    return (emb * txt).sum(-1).tolist()


def score_output(output: str | Path, checkpoint: str | Path, text_cache: str | Path | None = None,
                 batch_size: int = 64) -> dict:
    """Score every region with a description, a mask and its description in the text cache (`annotate
    embed-text` of this output; default: the checkpoint's own); write the side file; return counts."""
    store = OutputStore(Path(output))
    model, cfg, meta = load_run(checkpoint)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    cache_path = text_cache or meta.get("text_cache")
    if not cache_path:
        raise FileNotFoundError("no text cache: run `annotate embed-text` on this output and pass --text-cache")
    cache = TextCache(cache_path)
    if cache.dim != meta["text_dim"]:
        raise ValueError(f"the text cache has {cache.dim}-d features, the checkpoint takes {meta['text_dim']}-d")
    ids, scores, pending, not_cached = [], [], [], 0
    rows = load_rows(store.root).select_columns(["image", "regions"])
    for row in rows:
        regions = [r for r in row["regions"] or [] if is_trainable(r)]
        if not row["image"] or not regions:
            continue
        image = decode_array(row["image"]["bytes"])
        for r in regions:
            if r["fine_caption"] not in cache:
                not_cached += 1
                continue
            pending.append((r["region_id"], (image, decode_rle(r["mask"]).astype(bool), cache.get(r["fine_caption"]))))
            if len(pending) == batch_size:
                ids += [i for i, _ in pending]
                scores += _scores(model, cfg, [item for _, item in pending])
                pending = []
    if pending:
        ids += [i for i, _ in pending]
        scores += _scores(model, cfg, [item for _, item in pending])
    table = pa.table({"region_id": ids, "score": pa.array(scores, pa.float32())})
    target = store.write_side_file(store.region_text_scores_path, table, checkpoint=str(Path(checkpoint).resolve()))
    return {"scored": len(ids), "description_not_in_text_cache": not_cached, "file": str(target)}
