"""CPU cost per training sample of the loader (`RegionDataset.__getitem__`) at the model's resolution.

    python -m bench.train_loader [--size 224] [--side 384] [--samples 400] [--profile] [--json OUT]

One process, one intra-op thread: the figure is CPU time per sample per core (a DataLoader with
N workers on N spare cores scales it by N). Data: `bench/train_data.py`'s pipeline output (3 real
photos as `side`-px JPEGs, real RLE masks), repeated so the samples are distinct rows; text cache
with random features (the cache read is a memmap row either way). Each sample is everything the
trainer's DataLoader asks of a worker: Arrow row, JPEG decode, RLE decode, the full view (CLIP's
resize + centre crop, image and mask together), the crop view, the text row.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build(work: Path, size: int, side: int, copies: int):
    from annotate.train.data import RegionDataset
    from annotate.train.synthetic import synthetic_config
    from annotate.train.text_cache import TextCache, iter_region_texts, write_text_cache
    from bench.train_data import write_pipeline_output

    data = write_pipeline_output(work / "out", side=side, copies=copies)
    write_text_cache(list(iter_region_texts(data)), lambda ts: np.zeros((len(ts), 64)), work / "cache")
    cfg = synthetic_config(image_size=size, eval_fraction=0.0)
    return RegionDataset(data, TextCache(work / "cache"), cfg, "train", cache_dir=str(work / "hf"))


def measure(dataset, samples: int, rounds: int = 5) -> dict:
    """Median (and best) over rounds of the mean CPU time per sample (ms), after a warm-up of 20 samples."""
    n = min(samples, len(dataset))
    for i in range(min(20, n)):
        dataset[(0, i)]
    per_round = []
    for r in range(rounds):
        t0 = time.process_time()
        for i in range(n):
            dataset[(r + 1, i)]
        per_round.append((time.process_time() - t0) / n * 1e3)
    ms = float(np.median(per_round))
    return {"ms_per_sample": round(ms, 3), "samples_per_s_per_core": round(1e3 / ms, 1),
            "best_ms": round(min(per_round), 3), "rounds_ms": [round(x, 3) for x in per_round], "samples": n}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="model input (px)")
    ap.add_argument("--side", type=int, default=384, help="long side of the stored JPEGs (GRIT: 384)")
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--profile", action="store_true", help="print the top of a cProfile of one pass")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        ds = build(Path(tmp), args.size, args.side, copies=max(1, args.samples // 9 + 1))
        res = {"size": args.size, "side": args.side, **measure(ds, args.samples)}
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(lambda: [ds[(9, i)] for i in range(min(args.samples, len(ds)))])
            pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
