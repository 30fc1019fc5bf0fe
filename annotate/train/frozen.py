"""A frozen LongGRIT-N evaluation split of a pipeline output: `annotate eval --make-benchmark OUT --n N`.

Protocol (the paper's LongGRIT-2000 style, written down here and in BENCHMARKS 14):
- eligible regions: those PixCLIP trains on (`records.is_trainable`: status "ok", a fine caption, a
  mask) whose `mask_source` is not in the trainer's default `skip_mask_sources` (box fallbacks);
- chosen by image: the images holding eligible regions are sorted by key and shuffled by
  `numpy.random.default_rng(seed)`; images are taken in that order with all their eligible regions
  (in stored order) until N regions are reached; the last image may be cut to make exactly N;
- recorded by region id (and the chosen images' keys) in OUT/benchmarks/longgrit-N.json
  (`OutputStore.benchmarks_dir`), so the split never moves when the data, the hash or the code does;
- one frozen benchmark per output. While it exists, `annotate eval --data OUT` scores exactly its
  regions (gallery = those N, with identical texts one item as always) and `annotate train --data
  OUT` never trains on its images (every region of a chosen image is left out, the cut ones too);
  the hash split (`eval_fraction`) is then not used at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from annotate.data.records import is_trainable
from annotate.data.store import OutputStore, json_bytes, read_columns, write_json_atomic

PREFIX = "longgrit-"
# A copy, on purpose, of TrainConfig.skip_mask_sources' default: the frozen split must not move when that
# default does. tests/test_mend_frozen_skip.py checks they agree today, so a change to either is a choice.
DEFAULT_SKIP = ("box", "none")


@dataclass(frozen=True)
class FrozenBenchmark:
    name: str
    path: Path
    region_ids: frozenset[str]
    images: frozenset[str]
    digest: str  # sha256 of the file: what a training run records as the benchmark it left out

    @property
    def n(self) -> int:
        return len(self.region_ids)


def benchmark_files(data_dir: str | Path) -> list[Path]:
    folder = OutputStore(data_dir).benchmarks_dir
    return sorted(folder.glob(f"{PREFIX}*.json")) if folder.is_dir() else []


def load_benchmark(data_dir: str | Path) -> FrozenBenchmark | None:
    """The output's frozen benchmark, or None when it has none."""
    files = benchmark_files(data_dir)
    if not files:
        return None
    if len(files) > 1:
        raise ValueError(f"{OutputStore(data_dir).benchmarks_dir} holds several frozen benchmarks "
                         f"({', '.join(f.name for f in files)}); keep one")
    raw = files[0].read_bytes()
    spec = json.loads(raw)
    return FrozenBenchmark(spec["name"], files[0], frozenset(spec["region_ids"]), frozenset(spec["images"]),
                           hashlib.sha256(raw).hexdigest())


def eligible_regions(data_dir: str | Path, skip_mask_sources=DEFAULT_SKIP) -> dict[str, list[str]]:
    """image_key -> its eligible region ids in stored order (images without any left out). Reads the
    key and region columns only, one dataset file at a time."""
    store, skip = OutputStore(data_dir), set(skip_mask_sources)
    files = store.dataset_files()
    if not files:
        raise FileNotFoundError(f"{data_dir} holds no dataset files: is it the --output of a finished `annotate run`?")
    by_image: dict[str, list[str]] = {}
    for path in files:
        for row in read_columns(path, ["image_key", "regions"]):
            ids = [r["region_id"] for r in row["regions"] or [] if is_trainable(r) and r.get("mask_source") not in skip]
            if ids:
                by_image.setdefault(row["image_key"], []).extend(ids)
    return by_image


def choose(by_image: dict[str, list[str]], n: int, seed: int) -> tuple[list[str], list[str]]:
    """(image keys, region ids): whole images in a seeded order until n regions, the last one cut."""
    keys = sorted(by_image)
    order = np.random.default_rng(seed).permutation(len(keys))
    images, regions = [], []
    for k in order:
        if len(regions) >= n:
            break
        images.append(keys[k])
        regions.extend(by_image[keys[k]][: n - len(regions)])
    return images, regions


def make_benchmark(data_dir: str | Path, n: int = 2000, seed: int = 0) -> dict:
    """Write OUT/benchmarks/longgrit-N.json (atomically); the same (data, n, seed) gives the same file.
    Refuses when the output has too few eligible regions, or another benchmark is already frozen."""
    if n < 1:
        raise ValueError("--n must be at least 1")
    by_image = eligible_regions(data_dir)
    total = sum(len(v) for v in by_image.values())
    if total < n:
        raise ValueError(f"{data_dir} has {total} eligible regions, fewer than --n {n}")
    images, regions = choose(by_image, n, seed)
    name = f"{PREFIX}{n}"
    spec = {
        "name": name, "n": n, "seed": seed, "skip_mask_sources": list(DEFAULT_SKIP),
        "eligible_images": len(by_image), "eligible_regions": total,
        "files": [p.name for p in OutputStore(data_dir).dataset_files()],
        "images": images, "region_ids": regions,
    }
    path = OutputStore(data_dir).benchmarks_dir / f"{name}.json"
    others = [f for f in benchmark_files(data_dir) if f != path]
    if others:
        raise ValueError(f"{others[0]} is already frozen for this output (one benchmark per output: the trainer "
                         "leaves its images out); remove it first, and retrain, to freeze another")
    if path.exists() and path.read_bytes() != json_bytes(spec):
        raise ValueError(f"{path} exists and differs (other data or --seed); remove it first, and retrain, to re-freeze")
    write_json_atomic(path, spec)
    return {"benchmark": str(path), "regions": len(regions), "images": len(images),
            "eligible_regions": total, "eligible_images": len(by_image), "seed": seed}
