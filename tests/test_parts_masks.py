"""Part masks made in code (data/parts.py) on a drawn object: a red disc with a blue square inside.
SAM's, GrabCut's and the box's masks, the checks (containment, size, duplicates), ids, and the spans of
the description that mention a part. No model, no Ray."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from annotate.data.masks import decode_rle
from annotate.data.parts import (PartCandidate, PartMaskSettings, check_parts, parent_spans, part_mask,
                                 prompt_points, word_forms)

H, W = 120, 160
SQUARE = (70, 50, 21, 21)  # x, y, w, h of the blue square, inside the disc
SQUARE_BOX = [62.0, 42.0, 37.0, 37.0]  # the model's box around it, with a margin


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image RGB, the disc's mask, the square's mask)."""
    rng = np.random.default_rng(0)
    image = np.clip(200 + rng.integers(-10, 10, (H, W, 3)), 0, 255).astype(np.uint8)
    cv2.circle(image, (80, 60), 45, (220, 30, 30), -1)
    x, y, w, h = SQUARE
    cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), (30, 30, 220), -1)
    disc = np.zeros((H, W), np.uint8)
    cv2.circle(disc, (80, 60), 45, 1, -1)
    square = np.zeros((H, W), bool)
    square[y:y + h, x:x + w] = True
    return image, disc.astype(bool), square


def test_grabcut_finds_the_part_inside_the_object(scene):
    image, disc, square = scene
    mask, source = part_mask(disc, SQUARE_BOX, image)
    assert source == "grabcut"
    assert not (mask & ~disc).any()
    iou = (mask & square).sum() / (mask | square).sum()
    assert iou > 0.9, iou


def test_grabcut_never_leaves_the_object_even_when_the_box_does(scene):
    image, disc, _ = scene
    box = [100.0, 20.0, 50.0, 60.0]  # the disc's right edge and the grey outside
    mask, source = part_mask(disc, box, image)
    assert source in ("grabcut", "box")
    if source == "grabcut":
        assert not (mask & ~disc).any()


def test_box_fallback_without_image_or_for_a_small_box(scene):
    image, disc, _ = scene
    mask, source = part_mask(disc, SQUARE_BOX, None)
    assert source == "box" and mask.sum() == 37 * 37  # the box as proposed: check_parts clips it
    _, source = part_mask(disc, [80, 60, 4, 4], image)
    assert source == "box"
    _, source = part_mask(disc, SQUARE_BOX, image, PartMaskSettings(grabcut=False))
    assert source == "box"
    [part] = check_parts("s:k:0", [PartCandidate("edge", [110, 20, 40, 40], *part_mask(disc, [110, 20, 40, 40]))],
                         disc, PartMaskSettings(min_containment=0.1))
    stored = decode_rle(part.mask)
    assert part.mask_source == "box" and part.kept and not (stored & ~disc).any()
    assert part.area == int(stored.sum()) < 40 * 40 and 0.1 < part.containment < 1


def test_sam_mask_is_intersected_with_the_object(scene):
    _, disc, square = scene
    sam = square.copy()
    sam[50:71, 70:140] = True  # SAM spilled out of the disc on the right
    mask, source = part_mask(disc, SQUARE_BOX, None, sam_mask=sam)
    assert source == "sam" and (mask == sam).all()  # as SAM gave it: containment is measured on it
    [part] = check_parts("s:k:0", [PartCandidate("spill", SQUARE_BOX, mask, source)], disc,
                         PartMaskSettings(min_containment=0.5))
    stored = decode_rle(part.mask)
    assert part.kept and (stored == (sam & disc)).all()
    assert part.containment == pytest.approx((sam & disc).sum() / sam.sum(), abs=1e-4)


def test_prompt_points_lie_inside_box_and_object(scene):
    _, disc, _ = scene
    points = prompt_points(disc, SQUARE_BOX, 3)
    assert len(points) == 3 and all(disc[y, x] and 62 <= x < 99 and 42 <= y < 79 for x, y in points)
    assert prompt_points(disc, [0, 0, 5, 5]) == []  # the corner is outside the disc


def test_checks_reject_with_reasons_and_ids_are_unique(scene):
    image, disc, square = scene
    candidates = [
        PartCandidate("blue square", SQUARE_BOX, *part_mask(disc, SQUARE_BOX, image), visibility="full", reason="blue"),
        PartCandidate("outside", [0, 0, 30, 30], *part_mask(disc, [0, 0, 30, 30])),  # not in the disc
        PartCandidate("speck", [80, 60, 3, 3], *part_mask(disc, [80, 60, 3, 3])),  # 9 px < 16
        PartCandidate("blue patch", [70, 50, 21, 21], square.copy(), "sam", visibility="partial"),  # the same square
        PartCandidate("left half", [35, 15, 45, 90], *part_mask(disc, [35, 15, 45, 90])),
    ]
    parts = check_parts("00000:k:3", candidates, disc, fine_caption="A red disc with a Blue square; squares.")
    assert [p.part_id for p in parts] == [f"00000:k:3:p{i}" for i in range(5)]
    assert len({p.part_id for p in parts}) == len(parts)
    by_name = {p.name: p for p in parts}
    assert by_name["outside"].reject_reason.startswith("containment 0.00 < 0.80")
    assert "too small" in by_name["speck"].reject_reason and by_name["speck"].area == 9
    # a box over the disc's left half: its corners stick out, so the box (what is measured for grabcut and box
    # masks) lies 77% in the object, below the 80% asked
    assert not by_name["left half"].kept and by_name["left half"].reject_reason.startswith("containment 0.77 < 0.80")
    # the duplicate pair: GrabCut found the whole square, as large as SAM's; on a tie the earlier is kept
    winner, loser = by_name["blue square"], by_name["blue patch"]
    assert winner.kept and winner.mask_source == "grabcut" and winner.area >= loser.area
    assert not loser.kept and loser.reject_reason.startswith("duplicate of 00000:k:3:p0 (mask IoU")
    assert by_name["blue patch"].visibility == "partial" and by_name["blue square"].reason == "blue"
    assert [s.text for s in by_name["blue square"].parent_spans] == ["Blue square", "squares"]
    for p in parts:  # rejected parts keep their measures too
        assert p.mask is not None and p.area == int(decode_rle(p.mask).sum()) and p.containment is not None


def test_duplicates_keep_the_larger_whatever_the_order(scene):
    _, disc, square = scene
    bigger = square.copy()
    bigger[49, 70:91] = True
    for order in ([square, bigger], [bigger, square]):
        parts = check_parts("r", [PartCandidate(f"p{i}", [70, 49, 21, 22], m, "sam") for i, m in enumerate(order)], disc)
        kept = [p for p in parts if p.kept]
        assert len(kept) == 1 and kept[0].area == int(bigger.sum())
    same = check_parts("r", [PartCandidate(f"p{i}", [70, 50, 21, 21], square, "sam") for i in range(2)], disc)
    assert [p.kept for p in same] == [True, False]  # a tie: the earlier


def test_minimum_area_as_a_fraction_of_the_object(scene):
    _, disc, square = scene
    [part] = check_parts("r", [PartCandidate("square", SQUARE_BOX, square, "sam")], disc,
                         PartMaskSettings(min_area_px=0, min_area_fraction=0.1))
    assert not part.kept and "too small" in part.reject_reason


def test_an_object_without_pixels_keeps_no_part(scene):
    _, _, square = scene
    [part] = check_parts("r", [PartCandidate("x", SQUARE_BOX, square, "sam")], np.zeros((H, W), bool))
    assert not part.kept and part.reject_reason == "the object has no mask" and part.area == 0


def test_every_stored_part_mask_lies_within_the_region_mask(scene):
    """Whatever the source and whatever the check decided, no stored pixel is outside the object."""
    image, disc, square = scene
    rng = np.random.default_rng(1)
    candidates = []
    for i in range(12):
        x, y = rng.integers(0, W - 10), rng.integers(0, H - 10)
        box = [float(x), float(y), float(rng.integers(4, W - x)), float(rng.integers(4, H - y))]
        sam = box_of(box) if i % 3 == 0 else None
        candidates.append(PartCandidate(f"part {i}", box, *part_mask(disc, box, image if i % 3 == 1 else None,
                                                                     sam_mask=sam)))
    candidates.append(PartCandidate("square", SQUARE_BOX, *part_mask(disc, SQUARE_BOX, image)))
    parts = check_parts("r", candidates, disc, PartMaskSettings(min_containment=0.0))
    assert {p.mask_source for p in parts} == {"sam", "grabcut", "box"}
    for part in parts:
        stored = decode_rle(part.mask)
        assert stored.shape == disc.shape and not (stored & ~disc).any(), part.part_id


def box_of(box) -> np.ndarray:
    from annotate.data.masks import box_mask

    return box_mask(box, H, W)


def test_parent_spans_slice_the_caption_and_find_plural_forms():
    caption = "A sparrow: its Left wing is brown, both wings spread; a wingspan. Berries in its beak, one berry."
    for name, expected in [("left wing", ["Left wing", "wings"]), ("berry", ["Berries", "berry"]),
                           ("beaks", ["beak"]), ("tail", []), ("", [])]:
        spans = parent_spans(caption, name)
        assert [s.text for s in spans] == expected, name
        assert all(caption[s.start:s.end] == s.text for s in spans)
    assert parent_spans(None, "wing") == []
    assert {"box", "boxes", "boxs"} <= word_forms("box") and "glass" in word_forms("glasses")
    spans = parent_spans("front  wheel and rear wheel", "front wheel")
    assert [s.text for s in spans] == ["front  wheel", "wheel"]
