"""Training data from the pipeline's output: one sample per usable region, map-style for DataLoader.

Rows are read through `datasets` (a memory-mapped Arrow copy of OUT/data/*.parquet), so workers get
random access to images without holding the shards in memory. Masks are decoded from COCO RLE and
the crop view (I', M') is made here in the loader. Randomness (full-image / short-text draws) comes
from (seed, epoch, index) only, so a resumed run sees exactly the samples an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from annotate.config import TrainConfig
from annotate.data.images import decode_array
from annotate.data.masks import decode_rle
from annotate.data.records import is_trainable, is_trainable_part
from annotate.data.store import OutputStore
from annotate.pixclip.transforms import prepare_views
from annotate.train.frozen import load_benchmark
from annotate.train.parts import PartSample, no_parts, part_tensors
from annotate.train.text_cache import TextCache


def in_eval_split(image_key: str, fraction: float) -> bool:
    """Deterministic held-out split by image (a hash of its key, stable across runs and machines):
    splitting by region would train on the other regions of every evaluation image."""
    h = int.from_bytes(hashlib.sha1(image_key.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def choose_text(rng: np.random.Generator, ref: "RegionRef", cache: TextCache, cfg, full_prob: float | None = None) -> tuple[str, bool]:
    """(text, is_full): the whole image + its caption with probability `full_prob` (default
    cfg.full_image_ratio), else a short text (object caption or phrase) or the fine caption."""
    full_prob = cfg.full_image_ratio if full_prob is None else full_prob
    if rng.random() < full_prob and ref.image_caption and ref.image_caption in cache:
        return ref.image_caption, True
    if rng.random() < cfg.short_text_ratio:
        short = [t for t in ref.short if t in cache]
        if short:
            return short[int(rng.integers(len(short)))], False
    return ref.caption, False


def make_sample(image: np.ndarray, mask: np.ndarray, text: np.ndarray, full: bool, cfg: TrainConfig,
                short: np.ndarray | None = None, description: np.ndarray | None = None,
                negatives: list[np.ndarray] = (), parts: list[PartSample] | None = None) -> dict:
    """Tensors for one sample; a full-image sample uses the all-ones mask (and its crop is the image).

    With the short-text branch on, `short_text` is the region's summary (its own text when it has
    none, or when the sample is a full-image one). With the hard-negative branch on, `negative_text`
    (1+K, D) holds its description, then up to K negatives, and `negative_mask` which exist; a
    full-image sample has none (its text is the image caption, not the description). With the part
    branch on and `parts` given (training), the part tensors of `train/parts.py`; a full-image sample
    has none (its view is the image's, not the region's)."""
    region_mask = mask
    if full:
        mask = np.ones(image.shape[:2], dtype=bool)
    views = prepare_views(image, mask, cfg.image_size, cfg.crop_margin, raw=True)  # uint8; see to_model_input
    views["text"] = torch.from_numpy(np.asarray(text, dtype=np.float32))
    views["full"] = torch.tensor(full)
    if cfg.use_short:
        views["short_text"] = torch.from_numpy(np.asarray(text if full or short is None else short, dtype=np.float32))
    if cfg.use_hard_negatives:
        k = cfg.hard_negatives_k
        texts = np.zeros((1 + k, len(text)), dtype=np.float32)
        present = np.zeros(1 + k, dtype=bool)
        texts[0], present[0] = text if description is None else description, True
        for i, vector in enumerate([] if full else list(negatives)[:k]):
            texts[1 + i], present[1 + i] = vector, True
        views["negative_text"], views["negative_mask"] = torch.from_numpy(texts), torch.from_numpy(present)
    if cfg.use_parts and parts is not None:
        views.update(no_parts(len(text), cfg.image_size) if full or not parts
                     else part_tensors(parts, region_mask, len(text), cfg))
    return views


@dataclass(frozen=True)
class PartRef:
    """A trainable part (`is_trainable_part`) of a region, with those of its texts that are cached."""

    part_id: str
    rle: dict
    short: str = ""
    long: str = ""


@dataclass(frozen=True)
class RegionRef:
    row: int
    region_id: str
    image_key: str
    rle: dict
    caption: str = ""  # the fine caption
    short: tuple[str, ...] = ()  # object caption, phrase
    image_caption: str = ""
    summary: str = ""  # stage `summarize`, when run (the short-text branch)
    negatives: tuple[str, ...] = ()  # verified hard negatives (stage `negatives_visual`), when run
    parts: tuple[PartRef, ...] = ()  # trainable parts (the part stages), with the part branch on


def load_rows(data_dir: str | Path, cache_dir: str | None = None):
    """The pipeline output as a `datasets.Dataset`, images left encoded (decoded in the workers)."""
    import datasets

    files = OutputStore(data_dir).dataset_files()
    if not files:
        raise FileNotFoundError(f"{data_dir} holds no dataset files: is it the --output of a finished `annotate run`?")
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache_dir)
    return ds.cast_column("image", datasets.Image(decode=False))


class RegionDataset(Dataset):
    """Regions with status "ok", a fine caption, a mask and a cached text, in the requested split.

    Split: with a frozen benchmark in OUT/benchmarks (train/frozen.py), "eval" is exactly its listed
    regions and "train" every image it does not list; without one, by a hash of the image key.

    Regions whose `mask_source` is in cfg.skip_mask_sources (default: box fallbacks) are left out:
    a box is not the region's shape, and training on it teaches the mask branch the wrong thing.
    Full-image samples: per (epoch, image) at most one of the image's regions may become one (with
    probability full_image_ratio x its region count, so the overall share stays full_image_ratio);
    two would be identical positives in the same batch, since batches group an image's regions.
    """

    def __init__(self, data_dir: str | Path, cache: TextCache, cfg: TrainConfig, split: str = "train",
                 cache_dir: str | None = None):
        self.rows = load_rows(data_dir, cache_dir)
        self.images = self.rows.select_columns(["image"])  # per sample: read the image cell, not the regions
        self.cache, self.cfg, self.train = cache, cfg, split == "train"
        self.benchmark = load_benchmark(data_dir)  # a frozen split replaces the hash split both ways
        self.refs: list[RegionRef] = []
        skip = set(cfg.skip_mask_sources)
        frozen_eval = self.benchmark is not None and not self.train
        meta = self.rows.select_columns(["image_key", "caption", "regions", "image"])
        for i, row in enumerate(meta):
            if not row["image"] or self._held_out(row["image_key"]) == self.train:
                continue
            for r in row["regions"] or []:
                if frozen_eval:  # exactly the listed regions, whatever this run's skip_mask_sources
                    usable = r["region_id"] in self.benchmark.region_ids and is_trainable(r)
                else:
                    usable = is_trainable(r) and r.get("mask_source") not in skip
                if usable and r["fine_caption"] in cache:
                    short = tuple(t for t in (r.get("object_caption"), r.get("phrase")) if t)
                    summary = r.get("summary") if r.get("summary") in cache else ""  # schema 1.1 rows: none
                    negatives = tuple(n["text"] for n in r.get("negatives") or [] if n["text"] in cache)
                    self.refs.append(RegionRef(i, r["region_id"], row["image_key"], dict(r["mask"]),
                                               r["fine_caption"], short, row.get("caption") or "", summary, negatives,
                                               self._part_refs(r)))

        # each region's (position, count) among its image's regions in this split
        counts, seen = Counter(ref.row for ref in self.refs), Counter()
        self.siblings: list[tuple[int, int]] = []
        for ref in self.refs:
            self.siblings.append((seen[ref.row], counts[ref.row]))
            seen[ref.row] += 1

    def _part_refs(self, region: dict) -> tuple[PartRef, ...]:
        """The region's trainable parts with a cached text, when the part branch is on (else none)."""
        if not self.cfg.use_parts:
            return ()
        refs = []
        for part in region.get("parts") or []:
            if not is_trainable_part(part, self.cfg.parts_include_unverified):
                continue
            short, long = (t if t and t in self.cache else "" for t in (part.get("short_caption"), part.get("long_caption")))
            if short or long:
                refs.append(PartRef(part["part_id"], dict(part["mask"]), short, long))
        return tuple(refs)

    def _held_out(self, image_key: str) -> bool:
        """In the evaluation split: an image of the frozen benchmark when the output has one, else one
        whose key hashes into `eval_fraction`."""
        if self.benchmark is not None:
            return image_key in self.benchmark.images
        return in_eval_split(image_key, self.cfg.eval_fraction)

    def __len__(self) -> int:
        return len(self.refs)

    def full_prob(self, epoch: int, idx: int) -> float:
        """Probability that sample idx is drawn as the full-image sample: only for its image's one
        designated region of this epoch (seeded by (seed, epoch, image row))."""
        k, n = self.siblings[idx]
        chosen = int(np.random.default_rng([self.cfg.seed, epoch, self.refs[idx].row, 7]).integers(n))
        return min(1.0, self.cfg.full_image_ratio * n) if k == chosen else 0.0

    def text_id(self, idx: int) -> str:
        """The evaluated text itself: two regions with the same caption are one retrieval item."""
        return self.refs[idx].caption

    def group(self, idx: int) -> int:
        return self.refs[idx].row

    def __getitem__(self, key) -> dict:
        epoch, idx = key if isinstance(key, tuple) else (0, key)
        ref = self.refs[idx]
        image = decode_array(self.images[ref.row]["image"]["bytes"])
        mask = _decoded_mask(ref.rle, image.shape[:2])
        if self.train:
            rng = np.random.default_rng([self.cfg.seed, epoch, idx])
            text, full = choose_text(rng, ref, self.cache, self.cfg, self.full_prob(epoch, idx))
        else:
            text, full = ref.caption, False
        extra = {}
        if self.cfg.use_short and ref.summary:
            extra["short"] = self.cache.get(ref.summary)
        if self.cfg.use_hard_negatives:
            extra["description"] = self.cache.get(ref.caption)
            extra["negatives"] = [self.cache.get(t) for t in ref.negatives]
        if self.cfg.use_parts and self.train:
            extra["parts"] = [PartSample(_decoded_mask(p.rle, image.shape[:2]), self._vector(p.short), self._vector(p.long))
                              for p in ref.parts[: self.cfg.parts_per_region]]
        return make_sample(image, mask, self.cache.get(text), full, self.cfg, **extra)


    def _vector(self, text: str) -> np.ndarray | None:
        return self.cache.get(text) if text else None


def _decoded_mask(rle: dict, shape: tuple[int, int]) -> np.ndarray:
    """A region's or part's mask at the image's resolution (defensive: RLE made at another one)."""
    mask = decode_rle(rle)
    if mask.shape != shape:
        from PIL import Image

        mask = np.asarray(Image.fromarray(mask).resize(shape[::-1], Image.NEAREST))
    return mask


class EpochSampler(Sampler):
    """Seeded per-epoch permutation, sharded by rank, that can start mid-epoch (for --resume).

    With `groups` (one id per sample, e.g. its image), groups are shuffled and their samples kept
    together, so a batch holds several regions of the same image: negatives that only the mask can
    tell apart. Yields (epoch, index) so the dataset can seed its own draws from them.

    Under DDP every rank must run the same number of steps, or the ranks' collectives stop matching
    (gloo: "collective mismatch"; NCCL: a hang). Groups of real data are uneven (1 to dozens of
    regions per image), so groups are dealt greedily to the least-loaded rank and every rank's epoch
    is cut to `epoch_length`, a bound every rank reaches in every epoch: greedy dealing keeps
    max - min load <= the largest group g, hence min >= (n - (world - 1) * g) / world. It depends on
    (n, g, world) only, so all ranks agree without communicating, and it is the same every epoch.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, groups=None):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.members: list[list[int]] = []
        if groups is not None:
            by_group: dict = {}
            for i, g in enumerate(groups):
                by_group.setdefault(g, []).append(i)
            self.members = list(by_group.values())
        largest = max((len(m) for m in self.members), default=1)
        self.epoch_length = max(n - (world_size - 1) * largest, 0) // world_size
        self.epoch, self.start = 0, 0
        self._cache: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def shard(self, epoch: int, rank: int) -> list[int]:
        """Rank `rank`'s samples of `epoch`, cut to `epoch_length`."""
        units = self.members or [[i] for i in range(self.n)]
        order = list(range(len(units)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(units), generator=g).tolist()
        if self.world_size == 1:
            return [i for u in order for i in units[u]][: self.epoch_length]
        loads = [(0, r) for r in range(self.world_size)]  # a heap of (samples so far, rank)
        mine: list[int] = []
        for u in order:
            load, r = heapq.heappop(loads)
            if r == rank:
                mine.extend(units[u])
            heapq.heappush(loads, (load + len(units[u]), r))
        return mine[: self.epoch_length]

    def _indices(self) -> list[int]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.shard(self.epoch, self.rank))
        return self._cache[1]

    def __iter__(self):
        return iter([(self.epoch, i) for i in self._indices()[self.start :]])

    def __len__(self) -> int:
        return max(self.epoch_length - self.start, 0)
