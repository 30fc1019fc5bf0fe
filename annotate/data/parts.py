"""Part masks inside a region's object mask, made in code (issue 29): no model is called here.

A part named with a box (stage `parts`) gets its mask from SAM's answer when there is one, else from
GrabCut inside the object (pixels outside the object's mask are certain background), else from the box
clipped to the object. `check_parts` then keeps a part only when it lies in the object (containment),
is big enough, and is not a duplicate of a kept part of the same object; every stored mask is clipped
to the object's mask, so it always lies within the region's mask. `parent_spans` finds the words of the
region's description that mention a part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np
from pydantic import BaseModel, Field

from annotate.config import MaskConfig
from annotate.data.masks import MaskError, box_bounds, box_mask, encode_rle, grabcut_mask
from annotate.data.records import PartRecord, TextSpan

SOURCES = ("sam", "grabcut", "box")


class PartMaskSettings(BaseModel):
    """How part masks are made and checked: the `masks` of the `parts` stage's params (stages/parts.py
    `PartsParams`), so they count in its lineage key and in the config's `record_settings`."""

    min_containment: float = Field(0.8, ge=0, le=1, description="area(part and object) / area(part), before clipping")
    min_area_px: int = Field(16, ge=0, description="a stored part mask has at least this many pixels ...")
    min_area_fraction: float = Field(0.002, ge=0, le=1, description="... and this fraction of the object's")
    max_duplicate_iou: float = Field(0.7, ge=0, le=1, description="mask IoU with a kept part at or above: duplicate")
    sam_points: int = Field(1, ge=0, le=8, description=(
        "with a segment model: positive points inside the part's box and the object sent beside the box (0: the box alone)"))
    sam_min_fraction: float = Field(0.05, ge=0, le=1, description=(
        "a SAM part mask (inside its box) under this fraction of box and object is refused: GrabCut's or the box is used"))
    grabcut: bool = True
    grabcut_iterations: int = Field(3, ge=1)
    grabcut_max_side: int = Field(256, ge=32, description="GrabCut runs at this resolution")
    grabcut_min_side: int = Field(8, ge=2, description="a smaller box (px) is not worth GrabCut: its box is used")
    grabcut_min_fraction: float = Field(
        0.05, ge=0, le=1, description="GrabCut's mask below this fraction of box and object: the box is used")

    def grabcut_config(self) -> MaskConfig:
        return MaskConfig(source="grabcut", grabcut_iterations=self.grabcut_iterations,
                          grabcut_max_side=self.grabcut_max_side, grabcut_context=0.25)


@dataclass
class PartCandidate:
    """A part as the model named it, with its mask as made (`part_mask`), before any check or clipping."""

    name: str
    bbox: list[float]  # [x, y, w, h] in pixels of the displayed image
    mask: np.ndarray  # bool H x W: SAM's own mask, GrabCut's (inside the object) or the box
    source: str  # sam | grabcut | box
    visibility: str = "full"
    reason: str | None = None


def part_mask(object_mask: np.ndarray, box_xywh, image: np.ndarray | None = None,
              settings: PartMaskSettings | None = None, sam_mask: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """The part's mask before clipping, and its source: SAM's mask as given; else GrabCut seeded by the
    box with everything outside the object as certain background (needs `image`, RGB, and a box of at
    least `grabcut_min_side`); else the box. `check_parts` measures and clips it."""
    settings = settings or PartMaskSettings()
    object_mask = np.asarray(object_mask, bool)
    h, w = object_mask.shape
    if sam_mask is not None:
        return np.asarray(sam_mask, bool), "sam"
    box = box_mask(box_xywh, h, w)
    x0, y0, x1, y1 = box_bounds(box_xywh, h, w)
    if settings.grabcut and image is not None and min(x1 - x0, y1 - y0) >= settings.grabcut_min_side:
        try:
            mask = grabcut_mask(image, box_xywh, settings.grabcut_config(), background=~object_mask)
        except (MaskError, cv2.error):
            mask = None
        if mask is not None and mask.sum() >= settings.grabcut_min_fraction * max(int((box & object_mask).sum()), 1):
            return mask, "grabcut"
    return box, "box"


def sam_part_mask(sam_mask: np.ndarray, object_mask: np.ndarray, box_xywh,
                  settings: PartMaskSettings | None = None) -> np.ndarray | None:
    """SAM's answer for a part, inside its box prompt (a box prompt's part lies in its box), or None when
    it covers under `sam_min_fraction` of box and object: then `part_mask` makes one without it."""
    settings = settings or PartMaskSettings()
    object_mask = np.asarray(object_mask, bool)
    box = box_mask(box_xywh, *object_mask.shape)
    mask = np.asarray(sam_mask, bool) & box
    wanted = max(int((box & object_mask).sum()), 1)
    return mask if mask.any() and mask.sum() >= settings.sam_min_fraction * wanted else None


def prompt_points(object_mask: np.ndarray, box_xywh, count: int = 1) -> list[tuple[int, int]]:
    """Up to `count` (x, y) points inside both the box and the object, deepest inside first (distance
    transform): SAM's positive points for a part, next to its box prompt."""
    object_mask = np.asarray(object_mask, bool)
    inside = (box_mask(box_xywh, *object_mask.shape) & object_mask).astype(np.uint8)
    if not inside.any():
        return []
    depth = cv2.distanceTransform(np.pad(inside, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    order = np.argsort(-depth, axis=None, kind="stable")[:count]
    return [(int(i % depth.shape[1]), int(i // depth.shape[1])) for i in order if depth.flat[i] > 0]


def containment(candidate: np.ndarray, object_mask: np.ndarray) -> float:
    """area(candidate and object) / area(candidate); 0 for an empty candidate."""
    area = int(candidate.sum())
    return float((candidate & object_mask).sum() / area) if area else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 0.0


def check_parts(region_id: str, candidates: list[PartCandidate], object_mask: np.ndarray,
                settings: PartMaskSettings | None = None, fine_caption: str | None = None) -> list[PartRecord]:
    """One `PartRecord` per candidate, in the model's order, `part_id` `region_id:pI` by that order.

    Containment is measured before clipping, on what the part was proposed as: SAM's own mask, or the
    model's box for grabcut and box masks (GrabCut's mask is inside the object by construction). The
    stored mask is the candidate clipped to the object; its pixels are `area`, at least `min_area_px`
    and `min_area_fraction` of the object. Duplicates (mask IoU >= `max_duplicate_iou`): the larger mask
    is kept (the more complete part; on a tie the earlier), whatever the order the model listed them in.
    Rejected parts keep their mask and measures, with `reject_reason`."""
    settings = settings or PartMaskSettings()
    object_mask = np.asarray(object_mask, bool)
    h, w = object_mask.shape
    min_area = max(settings.min_area_px, settings.min_area_fraction * int(object_mask.sum()))
    clipped, measures, reasons = [], [], []
    for part in candidates:
        proposed = part.mask if part.source == "sam" else box_mask(part.bbox, h, w)
        stored = np.asarray(part.mask, bool) & object_mask
        measures.append(round(containment(np.asarray(proposed, bool), object_mask), 4))
        clipped.append(stored)
        if not object_mask.any():
            reasons.append("the object has no mask")
        elif measures[-1] < settings.min_containment:
            reasons.append(f"containment {measures[-1]:.2f} < {settings.min_containment:.2f}: not inside the object")
        elif stored.sum() < min_area:
            reasons.append(f"area {int(stored.sum())} px < {min_area:g} px: too small")
        else:
            reasons.append(None)
    ids = [f"{region_id}:p{i}" for i in range(len(candidates))]
    kept: list[int] = []
    for i in sorted((i for i, r in enumerate(reasons) if r is None), key=lambda i: (-int(clipped[i].sum()), i)):
        twin = next((k for k in kept if mask_iou(clipped[i], clipped[k]) >= settings.max_duplicate_iou), None)
        if twin is None:
            kept.append(i)
        else:
            reasons[i] = f"duplicate of {ids[twin]} (mask IoU {mask_iou(clipped[i], clipped[twin]):.2f} " \
                         f">= {settings.max_duplicate_iou:.2f})"
    return [PartRecord(part_id=ids[i], name=part.name, visibility=part.visibility, reason=part.reason,
                       bbox=[float(v) for v in part.bbox], mask=encode_rle(clipped[i]), mask_source=part.source,
                       containment=measures[i], area=int(clipped[i].sum()), kept=reasons[i] is None,
                       reject_reason=reasons[i],
                       parent_spans=parent_spans(fine_caption, part.name) if fine_caption is not None else None)
            for i, part in enumerate(candidates)]


def word_forms(word: str) -> set[str]:
    """The word with simple English plural and singular endings (s, es, ies), lowercased."""
    word = word.lower()
    forms = {word, word + "s", word + "es"}
    if word.endswith("y"):
        forms.add(word[:-1] + "ies")
    if len(word) > 3:
        if word.endswith("ies"):
            forms.add(word[:-3] + "y")
        elif word.endswith("es"):
            forms |= {word[:-2], word[:-1]}
        elif word.endswith("s") and not word.endswith("ss"):
            forms.add(word[:-1])
    return forms


def parent_spans(fine_caption: str | None, part_name: str) -> list[TextSpan]:
    """The spans of `fine_caption` that mention the part: whole-word, case-insensitive matches of its
    name or of its head noun (the name's last word), each in the forms of `word_forms` ("left wing"
    finds "left wing", "wings", "Wing"). The longest match wins where two start at the same place;
    spans never overlap and `fine_caption[start:end] == text`."""
    words = re.findall(r"\w[\w'-]*", part_name or "")
    if not fine_caption or not words:
        return []
    *lead, head = words
    names = {r"\s+".join([*map(re.escape, lead), re.escape(form)]) for form in word_forms(head)}
    names |= {re.escape(form) for form in word_forms(head)}
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(sorted(names, key=len, reverse=True)) + r")(?!\w)", re.IGNORECASE)
    return [TextSpan(start=m.start(), end=m.end(), text=m.group()) for m in pattern.finditer(fine_caption)]
