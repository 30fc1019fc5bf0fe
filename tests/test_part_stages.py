"""The part stages (issue 29: parts, part_describe, part_verify) without Ray: each runs through
`run_stage` against a scripted engine on a synthetic record, so that the box a model writes on the crop
it saw is checked against the pixels it names, and every stored part mask against the region's mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from annotate.config import CropConfig, load_config
from annotate.data.masks import decode_rle, encode_rle
from annotate.data.records import ImageRecord, PartRecord, RegionRecord, Verdict
from annotate.engines.base import ChatResult
from annotate.stages.batch import run_stage
from annotate.stages.chain import build_stage, chain_of, check_stages, reset_for_retry
from annotate.stages.lineage import reset_for_lineage

from bench.harness import REPO

TINY_PARTS = REPO / "pipelines" / "tiny-parts.yaml"
DESCRIPTION = "A small bird with an orange beak and a striped left wing perches on a branch. Its beak is open."
# The object: rows 40-119, columns 50-169 of a 160 x 200 image. With no margin the crop is that box
# (120 x 80 px) and `max_side` 60 halves it: the model sees a 60 x 40 image.
OBJECT = (slice(40, 120), slice(50, 170))
CROPS = CropConfig(margin=0.0, min_side=16, max_side=60)


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY_PARTS)


def make_record(fine_caption: str = DESCRIPTION) -> tuple[ImageRecord, Image.Image]:
    mask = np.zeros((160, 200), np.uint8)
    mask[OBJECT] = 1
    region = RegionRecord(region_id="s:img:0", region_index=0, phrase="a small bird", bbox=[50, 40, 120, 80],
                          mask=encode_rle(mask), mask_source="given", object_caption="a bird",
                          fine_caption=fine_caption, status="ok")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (160, 200, 3), dtype=np.uint8)
    record = ImageRecord(image_key="img", shard="s", width=200, height=160, caption="a bird", regions=[region])
    return record, Image.fromarray(pixels, "RGB")


class Scripted:
    """Answers every request with the next scripted answer, and keeps the requests."""

    def __init__(self, *answers):
        self.answers, self.requests = list(answers), []

    def __call__(self, requests):
        self.requests.extend(requests)
        return [ChatResult(request_id=r.request_id, text=json.dumps(a), finish_reason="stop", parsed=a)
                for r, a in zip(requests, [self.answers.pop(0) for _ in requests])]


def images_of(request) -> list[Image.Image]:
    return [item["image"] for item in request.messages[-1]["content"] if item["type"] == "image"]


def run(cfg, name, record, image, engine, params=None, lineage=None):
    config = cfg.stages[name].model_copy(update={"params": {**cfg.stages[name].params, **(params or {})}})
    stage = build_stage(name, config, "scripted", cfg.models[config.model])
    stage.lineage = lineage  # what a run that keeps outputs sets (stages/lineage.py); None: doctor, benchmarks
    return run_stage(stage, [(record, image)], engine, CROPS, config.max_attempts)


def part(name, box, visibility="full"):
    return {"name": name, "visibility": visibility, "reason": "distinctive", "box": box}


NO_GRABCUT = {"k": 4, "masks": {"grabcut": False}}


def test_a_box_on_the_crop_the_model_saw_lands_on_the_image_pixels_it_names(cfg):
    record, image = make_record()
    # [80, 60, 40, 30] in image pixels is [15, 10, 20, 15] on the 60 x 40 image seen: on the 0-1000 grid
    # (the tiny model has no family) x 250-583, y 250-625.
    engine = Scripted({"parts": [part("beak", "[250, 250, 583, 625]")]})
    counts = run(cfg, "parts", record, image, engine, NO_GRABCUT)
    assert counts.done == 1 and images_of(engine.requests[0])[0].size == (60, 40)
    (beak,) = record.regions[0].parts
    assert beak.bbox == pytest.approx([80, 60, 40, 30], abs=0.2)
    expected = np.zeros((160, 200), bool)
    expected[60:90, 80:120] = True
    assert (decode_rle(beak.mask).astype(bool) == expected).all()
    assert beak.kept and beak.mask_source == "box" and beak.area == 40 * 30 and beak.containment == 1.0
    assert record.regions[0].status == "ok"


def test_parts_keep_rejects_with_reasons_and_every_mask_within_the_object(cfg):
    record, image = make_record()
    engine = Scripted({"parts": [
        part("left wing", "[100, 100, 600, 900]"),
        part("branch", "[0, 0, 1000, 1000]"),  # the whole crop, which is the whole object
        part("beak", "[250, 250, 583, 625]", "partial"),
        part("tail", "a box somewhere"),  # unreadable
        part("shadow", "[1500, 1500, 1900, 1900]"),  # outside the image
        part("beak tip", "[250, 250, 583, 625]"),  # a duplicate of the beak
    ]})
    run(cfg, "parts", record, image, engine, {"k": 6})  # GrabCut on
    region = record.regions[0]
    object_mask = decode_rle(region.mask).astype(bool)
    ids = [p.part_id for p in region.parts]
    assert len(ids) == len(set(ids)) == 6 and all(i.startswith("s:img:0:p") for i in ids)
    for p in region.parts:
        if p.mask is not None:
            mask = decode_rle(p.mask).astype(bool)
            assert not (mask & ~object_mask).any(), p.name
            assert p.area == int(mask.sum())
        for span in p.parent_spans:
            assert region.fine_caption[span.start:span.end] == span.text
        assert p.kept == (p.reject_reason is None)
    by_name = {p.name: p for p in region.parts}
    assert [s.text for s in by_name["beak"].parent_spans] == ["beak", "beak"]
    assert [s.text for s in by_name["left wing"].parent_spans] == ["left wing"]
    assert by_name["beak"].visibility == "partial"
    assert "could not be read" in by_name["tail"].reject_reason and by_name["tail"].mask is None
    assert "outside the image" in by_name["shadow"].reject_reason
    assert "duplicate of" in by_name["beak tip"].reject_reason
    assert sum(p.kept for p in region.parts) >= 2


def test_a_box_reaching_off_the_object_is_rejected_for_containment(cfg):
    record, image = make_record()
    # The crop is larger than the object when the margin is 50%: a box over the margin lies off it.
    crops = CROPS.model_copy(update={"margin": 0.5, "max_side": 1000})
    stage = build_stage("parts", cfg.stages["parts"].model_copy(update={"params": NO_GRABCUT}), "scripted",
                        cfg.models["vlm"])
    run_stage(stage, [(record, image)], Scripted({"parts": [part("perch", "[0, 0, 1000, 200]")]}), crops, 3)
    (perch,) = record.regions[0].parts
    assert not perch.kept and perch.reject_reason.startswith("containment")
    assert not (decode_rle(perch.mask).astype(bool) & ~decode_rle(record.regions[0].mask).astype(bool)).any()


def test_zero_parts_is_an_answer_and_later_part_stages_settle_without_a_model(cfg):
    record, image = make_record()
    run(cfg, "parts", record, image, Scripted({"parts": []}))
    assert record.regions[0].parts == [] and record.regions[0].status == "ok"
    for name in ("part_describe", "part_verify"):
        engine = Scripted()
        counts = run(cfg, name, record, image, engine)
        assert counts.done == 1 and engine.requests == [] and record.regions[0].status == "ok"


def test_a_region_settled_without_parts_is_not_taken_again_by_a_rerun(cfg):
    """The part stages share the `parts` field, so "already done" is read from the stage's provenance: a
    region with no parts to work on is taken once, and a rerun under the same lineage leaves it alone."""
    record, image = make_record()
    run(cfg, "parts", record, image, Scripted({"parts": []}), lineage="parts-key")
    for name in ("part_describe", "part_verify"):
        first = run(cfg, name, record, image, Scripted(), lineage=f"{name}-key")
        assert (first.regions_in, first.done) == (1, 1)
        assert record.regions[0].provenance.of(name).lineage == f"{name}-key"
        again = run(cfg, name, record, image, Scripted(), lineage=f"{name}-key")
        assert (again.regions_in, again.done) == (0, 0) and record.regions[0].status == "ok"
    # a lineage change of parts (its readers' keys hold its key, so theirs change too) clears the part
    # stages' provenance: they take the region once more
    keys = {"parts": "parts-key-2", "part_describe": "part_describe-key-2", "part_verify": "part_verify-key-2"}
    reset_for_lineage(record, keys)
    assert record.regions[0].parts is None
    assert all(record.regions[0].provenance.of(name).lineage is None for name in ("part_describe", "part_verify"))
    run(cfg, "parts", record, image, Scripted({"parts": []}), lineage=keys["parts"])
    assert run(cfg, "part_describe", record, image, Scripted(), lineage=keys["part_describe"]).regions_in == 1


def described_record(cfg) -> tuple[ImageRecord, Image.Image]:
    record, image = make_record()
    run(cfg, "parts", record, image, Scripted({"parts": [
        part("beak", "[250, 250, 583, 625]"), part("left wing", "[600, 100, 950, 900]"),
        part("tail", "??")]}), NO_GRABCUT)
    assert [p.kept for p in record.regions[0].parts] == [True, True, False]
    return record, image


def test_describe_sends_one_focal_crop_per_kept_part_and_retries_an_over_long_short_caption(cfg):
    record, image = described_record(cfg)
    too_long = " ".join(["extraordinarily"] * 80)
    good = {"parts": [{"short": "an orange beak", "long": "A short, pointed orange beak, slightly open."},
                      {"short": "a striped wing", "long": "The left wing, folded, with brown and white stripes."}]}
    engine = Scripted({"parts": [{"short": too_long, "long": "x"}, good["parts"][1]]}, good)
    counts = run(cfg, "part_describe", record, image, engine)
    assert counts.retried == 1 and counts.done == 1 and len(engine.requests) == 2
    assert len(images_of(engine.requests[0])) == 1 + 2  # the object crop, then one per kept part
    items = engine.requests[0].json_schema["properties"]["parts"]
    assert items["minItems"] == items["maxItems"] == 2  # guided decoding writes one per part shown
    text = engine.requests[0].messages[-1]["content"][-1]["text"]
    assert 'part 1, "beak"' in text and 'part 2, "left wing"' in text and "tail" not in text
    beak, wing, tail = record.regions[0].parts
    assert (beak.short_caption, wing.short_caption) == ("an orange beak", "a striped wing")
    assert tail.short_caption is None and record.regions[0].status == "ok"


def test_describe_refuses_a_count_mismatch_then_fails_the_region(cfg):
    record, image = described_record(cfg)
    one = {"parts": [{"short": "an orange beak", "long": "A pointed beak."}]}
    run(cfg, "part_describe", record, image, Scripted(*[one] * cfg.stages["part_describe"].max_attempts))
    region = record.regions[0]
    assert region.status == "failed" and "describes 1 parts, not the 2 shown" in region.error
    assert region.error.startswith("part_describe: parse")


def verified_record(cfg):
    record, image = described_record(cfg)
    run(cfg, "part_describe", record, image, Scripted({"parts": [
        {"short": "an orange beak", "long": "A pointed orange beak."},
        {"short": "a striped wing", "long": "A folded wing with stripes."}]}))
    engine = Scripted({"verdicts": [{"reason": "The cyan region is the beak.", "holds": True},
                                    {"reason": "The cyan region shows the tail.", "holds": False}]})
    counts = run(cfg, "part_verify", record, image, engine)
    return record, image, engine, counts


def test_verify_stores_one_verdict_per_described_part(cfg):
    record, _, engine, counts = verified_record(cfg)
    assert counts.done == 1 and len(images_of(engine.requests[0])) == 3
    items = engine.requests[0].json_schema["properties"]["verdicts"]
    assert items["minItems"] == items["maxItems"] == 2
    beak, wing, tail = record.regions[0].parts
    assert beak.verdict == Verdict(holds=True, reason="The cyan region is the beak.")
    assert wing.verdict.holds is False and tail.verdict is None


def test_each_part_stage_clears_only_what_it_made(cfg):
    from annotate.stages.part_describe import PartDescribeStage
    from annotate.stages.part_verify import PartVerifyStage
    from annotate.stages.parts import PartsStage

    record, *_ = verified_record(cfg)
    region = record.regions[0]
    PartVerifyStage.clear(region)
    assert all(p.verdict is None for p in region.parts) and region.parts[0].short_caption == "an orange beak"
    PartDescribeStage.clear(region)
    assert all(p.short_caption is None and p.long_caption is None for p in region.parts)
    assert region.parts[0].mask is not None and region.parts[0].kept
    PartsStage.clear(region)
    assert region.parts is None
    PartDescribeStage.clear(region)  # nothing left to clear: no error
    PartVerifyStage.clear(region)


def test_a_retry_of_part_verify_keeps_the_parts_and_their_captions(cfg):
    record, *_ = verified_record(cfg)
    region = record.regions[0]
    region.status, region.error = "failed", "part_verify: parse: bad answer"
    assert reset_for_retry(record) == 1
    assert region.status == "pending" and region.parts[0].short_caption == "an orange beak"
    assert all(p.verdict is None for p in region.parts)


def test_a_lineage_change_of_part_describe_clears_captions_and_verdicts_only(cfg):
    record, *_ = verified_record(cfg)
    region = record.regions[0]
    for stage in ("merge", "parts", "part_describe", "part_verify"):
        region.provenance.of(stage).lineage = "old"
    keys = {"merge": "old", "parts": "old", "part_describe": "new", "part_verify": "new"}
    assert reset_for_lineage(record, keys) == {"part_describe": 1, "part_verify": 1}
    assert region.parts[0].kept and region.parts[0].mask is not None and region.status == "ok"
    assert all(p.short_caption is None and p.verdict is None for p in region.parts)


def test_the_tiny_parts_pipeline_loads_and_the_image_limit_is_checked(cfg):
    check_stages(cfg)
    assert chain_of(cfg)[-3:] == ("parts", "part_describe", "part_verify")
    assert cfg.stages["parts"].params["k"] == 2
    bad = cfg.model_copy(deep=True)
    bad.models["vlm"].vllm.limit_mm_per_prompt = {"image": 2}
    with pytest.raises(ValueError, match=r"part_describe sends up to 3 images .*vllm\.limit_mm_per_prompt\.image\): raise that limit to 3"):
        check_stages(bad)
    bad.stages["parts"].params = {"k": 1}
    check_stages(bad)  # 1 + 1 images fit
    del bad.stages["part_verify"]
    with pytest.raises(ValueError, match="go together"):
        check_stages(bad)


def test_a_focal_crop_shows_the_object_in_red_and_the_part_in_cyan_around_the_part():
    from annotate.data.crops import PART_COLOR, focal_crop

    image = Image.new("RGB", (200, 160), (128, 128, 128))
    object_mask = np.zeros((160, 200), bool)
    object_mask[OBJECT] = True
    part_mask = np.zeros_like(object_mask)
    part_mask[60:90, 80:120] = True
    crop = np.asarray(focal_crop(image, object_mask, part_mask, [80, 60, 40, 30],
                                 CropConfig(margin=1.0, highlight_width=1, max_side=1000)))
    # the part's box (x 80-119, y 60-89) with its own size of context on each side: x 40-159, y 30-119
    assert crop.shape[:2] == (90, 120)
    assert tuple(crop[70 - 30, 50 - 40]) == (255, 0, 0)  # the object's left edge, in red
    assert tuple(crop[70 - 30, 80 - 40]) == PART_COLOR  # the part's left edge, in cyan
    assert tuple(crop[70 - 30, 100 - 40]) == (128, 128, 128)  # inside the part: the image itself


def test_a_region_that_fails_before_apply_leaves_nothing_behind_in_the_stage(cfg):
    """The parts stage keeps each request's image until `apply`; a region that fails instead must not keep
    it for the worker's life (a chain worker runs one stage object over a whole run)."""
    record, image = make_record()
    config = cfg.stages["parts"]
    stage = build_stage("parts", config, "scripted", cfg.models[config.model])

    def refusing(requests):
        return [ChatResult(request_id=r.request_id, text="", finish_reason="error", error="HTTP 400: bad input",
                           error_kind="invalid_input") for r in requests]

    counts = run_stage(stage, [(record, image)], refusing, CROPS, config.max_attempts)
    assert counts.failed == 1 and record.regions[0].status == "failed"
    assert stage._seen == {}


def test_the_token_budget_counts_a_part_stage_with_k_parts_and_their_focal_crops(cfg):
    """The load-time budget (stages/budget.py) renders each stage's worst case: for the part stages, the
    prompt's own image and one focal crop per part, up to the parts stage's k (2 in tiny-parts)."""
    from annotate.stages.budget import worst_case_request

    for name in ("part_describe", "part_verify"):
        request = worst_case_request(cfg, name, 256, 192)
        assert len(images_of(request)) == 1 + 2, name
        assert request.json_schema["properties"]["parts" if name == "part_describe" else "verdicts"]["maxItems"] == 2
