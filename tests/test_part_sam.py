"""Part masks from the run's segment model (issue 29, build item 2): with `segment:` configured, the
`parts` stage asks SAM once per image for all its parts, each box with points inside the object, and
keeps SAM's mask inside the box when it is plausible; else GrabCut's or the box's, as without SAM.

Exact behaviour is checked against a scripted `segment` call (it records what it is asked and answers
masks chosen by the test: random SAM weights answer noise); the real tiny transformers SamModel then
runs the same path in process, box and points together, as its Serve deployment does."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from annotate.config import load_config
from annotate.data.masks import box_mask, decode_rle, encode_rle
from annotate.data.records import ImageRecord, RegionRecord
from annotate.engines.base import ChatResult
from annotate.stages.batch import run_stage_async
from annotate.stages.chain import STAGE_CLASSES, build_stage

from tests.test_part_stages import CROPS, OBJECT, TINY_PARTS, Scripted, make_record, part

BEAK = "[250, 250, 583, 625]"  # [80, 60, 40, 30] in image pixels (tests/test_part_stages.py)
WING = "[100, 100, 600, 900]"


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY_PARTS)


class ScriptedSam:
    """`segment(image, boxes, points)` answering, per box, a mask made by `answer(box)`; keeps the calls."""

    def __init__(self, answer=None, error: Exception | None = None):
        self.calls, self.answer, self.error = [], answer, error

    async def __call__(self, image, boxes, points=None):
        self.calls.append((image.size, boxes, points))
        if self.error is not None:
            raise self.error
        return [(self.answer(box), 0.9) for box in boxes]


def left_half(box):
    """A mask filling the left half of the box, and a strip outside it (SAM's answer is clipped to its box)."""
    mask = np.zeros((160, 200), bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask[y0:y1, x0:(x0 + x1) // 2] = True
    mask[0:5, :] = True
    return mask


def run_parts(cfg, items, engine, segment, params=None):
    config = cfg.stages["parts"].model_copy(update={"params": {"k": 4, **(params or {})}})
    stage = build_stage("parts", config, "scripted", cfg.models[config.model])
    stage.segment = segment

    async def chat_one(request):
        return engine([request])[0]

    return stage, asyncio.run(run_stage_async(stage, items, chat_one, CROPS, config.max_attempts))


def two_regions():
    """One image, two regions over the same object: one SAM call must serve both."""
    record, image = make_record()
    second = record.regions[0].model_copy(deep=True, update={"region_id": "s:img:1", "region_index": 1})
    record.regions.append(second)
    return record, image


def test_sam_is_asked_once_per_image_with_box_and_points_inside_the_object(cfg):
    record, image = two_regions()
    sam = ScriptedSam(left_half)
    engine = Scripted({"parts": [part("beak", BEAK), part("left wing", WING)]}, {"parts": [part("beak", BEAK)]})
    stage, counts = run_parts(cfg, [(record, image)], engine, sam, {"masks": {"sam_points": 2}})
    assert counts.done == 2 and len(sam.calls) == 1
    size, boxes, points = sam.calls[0]
    assert size == (200, 160) and len(boxes) == len(points) == 3
    assert boxes[0] == pytest.approx([80, 60, 120, 90], abs=0.2)  # x0, y0, x1, y1 in image pixels
    object_mask = decode_rle(record.regions[0].mask).astype(bool)
    for (x0, y0, x1, y1), box_points in zip(boxes, points):
        assert len(box_points) == 2
        for x, y in box_points:
            assert x0 <= x < x1 and y0 <= y < y1 and object_mask[y, x]
    for region in record.regions:
        assert region.status == "ok" and region.parts
        for p in region.parts:
            mask = decode_rle(p.mask).astype(bool)
            assert p.mask_source == "sam" and not (mask & ~object_mask).any()
            # SAM's left half of the box, clipped to the box: its strip above the object is gone
            assert p.area == int((left_half([p.bbox[0], p.bbox[1], p.bbox[0] + p.bbox[2], p.bbox[1] + p.bbox[3]])
                                  & box_mask(p.bbox, 160, 200) & object_mask).sum())
    assert not stage._read and not stage._seen  # nothing kept for the worker's life


def test_a_failed_sam_call_leaves_the_parts_to_their_boxes_and_loses_no_region(cfg):
    record, image = two_regions()
    sam = ScriptedSam(error=RuntimeError("replica died"))
    engine = Scripted({"parts": [part("beak", BEAK)]}, {"parts": [part("beak", BEAK)]})
    _, counts = run_parts(cfg, [(record, image)], engine, sam, {"masks": {"grabcut": False}})
    assert counts.done == 2 and counts.failed == 0 and len(sam.calls) == 1
    for region in record.regions:
        (beak,) = region.parts
        assert beak.kept and beak.mask_source == "box" and beak.area == 40 * 30


def test_an_implausible_sam_mask_is_refused_for_that_part_only(cfg):
    record, image = make_record()

    def tiny_for_the_beak(box):  # a single pixel for the beak's box, a plausible half for the wing's
        if box[2] - box[0] < 45:
            mask = np.zeros((160, 200), bool)
            mask[int(box[1]), int(box[0])] = True
            return mask
        return left_half(box)

    engine = Scripted({"parts": [part("beak", BEAK), part("left wing", WING)]})
    run_parts(cfg, [(record, image)], engine, ScriptedSam(tiny_for_the_beak), {"masks": {"grabcut": False}})
    by_name = {p.name: p for p in record.regions[0].parts}
    assert by_name["beak"].mask_source == "box" and by_name["left wing"].mask_source == "sam"


def test_a_box_that_misses_the_object_is_not_sent_to_sam_and_is_rejected(cfg):
    record, image = make_record()
    region = record.regions[0]
    mask = np.zeros((160, 200), np.uint8)
    mask[OBJECT] = 1
    mask[55:100, 75:145] = 0  # a ring: the beak's box lies in its hole
    region.mask = encode_rle(mask)
    sam = ScriptedSam(left_half)
    engine = Scripted({"parts": [part("beak", BEAK), part("rim", "[0, 0, 1000, 1000]")]})
    run_parts(cfg, [(record, image)], engine, sam, {"masks": {"grabcut": False}})
    (_, boxes, _), = sam.calls
    assert boxes == [pytest.approx([50, 40, 170, 120], abs=0.2)]  # only the rim's box meets the object
    by_name = {p.name: p for p in region.parts}
    assert not by_name["beak"].kept and by_name["beak"].reject_reason.startswith("containment")
    assert by_name["rim"].mask_source == "sam"


def test_the_tiny_sam_model_answers_box_and_points_and_every_stored_mask_lies_in_the_object(cfg):
    from annotate.engines.sam_engine import SamEngine

    engine = SamEngine("tiny:sam", device="cpu")

    async def segment(image, boxes, points=None):
        return engine.segment(image, boxes, points)

    record, image = two_regions()
    scripted = Scripted({"parts": [part("beak", BEAK), part("left wing", WING)]}, {"parts": [part("beak", BEAK)]})
    run_parts(cfg, [(record, image)], scripted, segment, {"masks": {"sam_min_fraction": 0.0}})
    object_mask = decode_rle(record.regions[0].mask).astype(bool)
    parts = [p for region in record.regions for p in region.parts]
    assert len(parts) == 3 and any(p.mask_source == "sam" for p in parts)
    for p in parts:
        assert not (decode_rle(p.mask).astype(bool) & ~object_mask).any()


def test_the_stages_that_use_the_segment_model_are_the_ones_it_is_deployed_for():
    from annotate.serving.apps import SEGMENT_MODEL, SEGMENT_STAGES, needed_models

    assert set(SEGMENT_STAGES) == {"object"} | {name for name, cls in STAGE_CLASSES.items() if cls.uses_segment}
    cfg = load_config(TINY_PARTS, {"segment": {"path": "tiny:sam"}})
    assert SEGMENT_MODEL in needed_models(cfg, ("parts",))
    assert SEGMENT_MODEL not in needed_models(cfg, ("part_describe",))
    assert SEGMENT_MODEL not in needed_models(load_config(TINY_PARTS), ("parts",))


def test_a_stage_without_sam_makes_its_masks_in_apply(cfg):
    record, image = make_record()
    stage, _ = run_parts(cfg, [(record, image)], Scripted({"parts": [part("beak", BEAK)]}), None,
                         {"masks": {"grabcut": False}})
    assert record.regions[0].parts[0].mask_source == "box" and not stage._read
