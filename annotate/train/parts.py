"""The part branch's data: a region's trainable parts as tensors of one sample, and the collation that
flattens them across the batch.

A sample (one region) carries its P parts, P from 0 to `parts_per_region`: `part_mask` (P, 1, S, S)
uint8 in the region's own view (so they line up with the sample's `image`), `part_text` (P, 2, D) the
short and long texts' features, `part_text_mask` (P, 2) which exist. The default collation cannot
stack a varying P, so `collate_parts` concatenates the parts of the whole batch and adds `part_index`
(P_total,), each part's sample in the batch: the model encodes each part on that sample's image, in
the same forward as the regions. Flattened rather than padded, so no pass runs on a padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import default_collate

from annotate.pixclip.transforms import masks_in_view

PART_KEYS = ("part_mask", "part_text", "part_text_mask")


@dataclass(frozen=True)
class PartSample:
    """One part of a region, decoded: its full-image mask and its texts' features (None: no such text)."""

    mask: np.ndarray
    short: np.ndarray | None
    long: np.ndarray | None


def part_tensors(parts: list[PartSample], region_mask: np.ndarray, dim: int, cfg) -> dict[str, torch.Tensor]:
    """The part tensors of one sample: at most `cfg.parts_per_region` parts, in the region's view; a
    part that the view cuts away entirely (or that has no text) is left out."""
    parts = [p for p in parts if p.short is not None or p.long is not None][: cfg.parts_per_region]
    masks = masks_in_view([p.mask for p in parts], region_mask, cfg.image_size)
    seen = (masks.flatten(1) > 0).any(dim=1)
    texts = np.zeros((len(parts), 2, dim), dtype=np.float32)
    present = np.zeros((len(parts), 2), dtype=bool)
    for i, part in enumerate(parts):
        for j, vector in enumerate((part.short, part.long)):
            if vector is not None:
                texts[i, j], present[i, j] = vector, True
    return {"part_mask": masks[seen], "part_text": torch.from_numpy(texts)[seen],
            "part_text_mask": torch.from_numpy(present)[seen]}


def no_parts(dim: int, size: int) -> dict[str, torch.Tensor]:
    """The part tensors of a sample without parts (a full-image sample, or a region with none)."""
    return {"part_mask": torch.zeros((0, 1, size, size), dtype=torch.uint8),
            "part_text": torch.zeros((0, 2, dim)), "part_text_mask": torch.zeros((0, 2), dtype=torch.bool)}


def collate_parts(samples: list[dict]) -> dict[str, torch.Tensor]:
    """`default_collate`, with the samples' parts concatenated and `part_index` added (see module doc).
    Samples without part tensors (the branch off) collate exactly as before."""
    if not samples or "part_mask" not in samples[0]:
        return default_collate(samples)
    samples = [dict(s) for s in samples]  # the dataset's own dicts are left as they were
    parts = [{k: s.pop(k) for k in PART_KEYS} for s in samples]
    batch = default_collate(samples)
    for key in PART_KEYS:
        batch[key] = torch.cat([p[key] for p in parts])
    counts = torch.tensor([p["part_mask"].shape[0] for p in parts])
    batch["part_index"] = torch.repeat_interleave(torch.arange(len(samples)), counts)
    return batch


def part_arguments(batch: dict) -> dict[str, torch.Tensor]:
    """The part keyword arguments of `PixCLIP.branch_features` from a batch on the device (none when
    the batch has no part tensors); the uint8 masks become [0, 1] floats, as `to_model_input` does."""
    if "part_mask" not in batch:
        return {}
    return {"part_mask": batch["part_mask"].float() / 255.0, "part_index": batch["part_index"],
            "part_text": batch["part_text"], "part_text_mask": batch["part_text_mask"]}
