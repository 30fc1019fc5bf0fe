"""End-to-end: the part stages of issue 29 (parts, part_describe, part_verify) after the whole chain,
run by `run_pipeline` on the sample shards through the session's Serve deployments of the tiny models
(pipelines/tiny-parts.yaml extends tiny-fields.yaml: same models, so nothing new is deployed), then
exported as COCO and read back with pycocotools.

Random weights write no usable part boxes or descriptions, so `parts` and `part_describe` call the real
VLM (the object crop; the object crop and one focal crop per part), then read scripted answers
(bench.harness.ScriptedParts: two boxes inside the object on the image the model saw, through the stage's
own mapping, masks and checks; ScriptedPartDescriptions). `part_verify` runs as it is on the real engine,
its verdicts counted out by guided decoding (one per part)."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest
from pycocotools.coco import COCO

from annotate.config import load_config
from annotate.data.masks import decode_rle
from annotate.data.records import ImageRecord
from annotate.data.store import OutputStore, iter_stored_records
from annotate.export import PART_CATEGORY, export_coco
from annotate.stages.chain import chain_of

from bench.harness import SAMPLE_SHARDS, TINY_PARTS, input_region_ids

pytestmark = pytest.mark.slow
PART_STAGES = ("parts", "part_describe", "part_verify")


@pytest.fixture(scope="module")
def parts_run(ray_session, tiny_run_all, tmp_path_factory):
    """Both sample shards through the whole chain with every optional stage and the part stages (after the
    session's first run, so the models are up)."""
    from annotate.executor.runner import run_pipeline

    cfg = load_config(TINY_PARTS, {"stages": {
        "negatives": {"stage_class": "bench.harness:ScriptedNegatives"},
        "negatives_text": {"stage_class": "bench.harness:ScriptedContradiction"},
        "parts": {"stage_class": "bench.harness:ScriptedParts"},
        "part_describe": {"stage_class": "bench.harness:ScriptedPartDescriptions"}}})
    assert chain_of(cfg)[-3:] == PART_STAGES
    out = tmp_path_factory.mktemp("run-parts")
    summary = run_pipeline(cfg, SAMPLE_SHARDS, out, [0, 1], stage="all")
    return out, summary


def _records(out) -> list[ImageRecord]:
    return [record for f in OutputStore(out).dataset_files() for record in iter_stored_records(f, 64)]


def test_every_part_lies_in_its_region_with_unique_ids_and_spans_that_slice_the_description(parts_run):
    out, summary = parts_run
    assert not summary.models_deployed  # the session's deployments served this pipeline too
    regions = [region for record in _records(out) for region in record.regions]
    assert Counter(r.region_id for r in regions) == input_region_ids(SAMPLE_SHARDS, [0, 1])
    part_ids = [p.part_id for r in regions for p in r.parts or []]
    assert len(part_ids) == len(set(part_ids))
    kept = described = verified = 0
    for region in regions:
        assert region.status in ("ok", "rejected", "failed") and (region.status == "ok") == (region.error is None)
        if region.status == "ok":  # every part stage finished it
            assert region.parts is not None and region.provenance.of("parts").lineage
        if not region.parts:
            continue
        object_mask = decode_rle(region.mask).astype(bool)
        for part in region.parts:
            assert part.part_id.startswith(region.region_id + ":p")
            if part.mask is not None:  # containment, checked on every stored part mask
                mask = decode_rle(part.mask).astype(bool)
                assert mask.shape == object_mask.shape and not (mask & ~object_mask).any(), part.part_id
                assert part.area == int(mask.sum())
            for span in part.parent_spans or []:
                assert region.fine_caption[span.start:span.end] == span.text
            assert part.kept == (part.reject_reason is None)
            kept += part.kept
            if part.kept and region.status == "ok":
                assert part.short_caption and part.long_caption and part.verdict is not None, part
                described += 1
                verified += part.verdict.reason is not None
    assert kept > 0 and described > 0 and verified > 0, (kept, described, verified)
    assert summary.model_calls["part_verify"]["model_calls"] > 0, summary.model_calls  # verdicts from the real engine


def test_the_part_stages_record_their_provenance_and_the_dataset_loads_parts(parts_run):
    out, _ = parts_run
    regions = [r for record in _records(out) for r in record.regions if r.status == "ok" and r.parts]
    assert regions
    for stage in PART_STAGES:
        prov = regions[0].provenance.of(stage)
        assert prov.lineage and (prov.model or stage != "parts")
    ds = datasets.load_dataset(str(out), split="train")
    loaded = [p for row in ds for r in row["regions"] for p in r["parts"] or []]
    assert len(loaded) == sum(len(r.parts or []) for record in _records(out) for r in record.regions)
    assert all(isinstance(p["part_id"], str) and p["mask_source"] in (None, "grabcut", "box") for p in loaded)


def test_the_coco_export_loads_in_pycocotools_with_parts_linked_to_their_objects(parts_run, tmp_path):
    out, _ = parts_run
    summary = export_coco(out, tmp_path / "coco")
    assert summary.parts > 0 and summary.objects > 0
    coco = COCO(str(summary.annotations))
    objects = {a["id"]: a for a in coco.dataset["annotations"] if a["category_id"] != PART_CATEGORY}
    parts = coco.loadAnns(coco.getAnnIds(catIds=[PART_CATEGORY]))
    assert len(parts) == summary.parts
    for part in parts:
        parent = objects[part["obj_ann_id"]]
        assert parent["image_id"] == part["image_id"]
        inside = coco.annToMask(part).astype(bool)
        assert inside.any() and not (inside & ~coco.annToMask(parent).astype(bool)).any()
    assert np.isfinite([p["area"] for p in parts]).all()


@pytest.fixture(scope="module")
def sam_parts_run(ray_session, tiny_run_all, tmp_path_factory):
    """The core chain and the part stages on shard 0 with a segment model configured: the chain worker
    gives `parts` the SAM deployment's call (the same tiny SAM as tests/test_segment.py, so it is
    deployed once per session), and part masks are SAM's where it answers."""
    from annotate.config import SegmentConfig
    from annotate.executor.runner import run_pipeline

    cfg = load_config(TINY_PARTS, {"stages": {
        "parts": {"stage_class": "bench.harness:ScriptedParts", "params": {"masks": {"sam_min_fraction": 0.0}}},
        "part_describe": {"stage_class": "bench.harness:ScriptedPartDescriptions"}}})
    for name in ("summarize", "ground", "negatives", "negatives_text", "negatives_visual"):
        cfg.stages.pop(name)
    cfg.segment = SegmentConfig(path="tiny:sam", min_mask_frac=0.0)
    out = tmp_path_factory.mktemp("run-parts-sam")
    return out, run_pipeline(cfg, SAMPLE_SHARDS, out, [0], stage="all")


def test_with_a_segment_model_part_masks_are_sams_and_lie_in_their_regions(sam_parts_run):
    from annotate.serving.apps import SEGMENT_MODEL

    out, summary = sam_parts_run
    assert any(r["model"] == SEGMENT_MODEL for r in summary.replicas), summary.replicas
    regions = [region for record in _records(out) for region in record.regions]
    assert Counter(r.region_id for r in regions) == input_region_ids(SAMPLE_SHARDS, [0])
    parts = [(region, part) for region in regions for part in region.parts or []]
    assert any(part.mask_source == "sam" for _, part in parts), Counter(p.mask_source for _, p in parts)
    for region, part in parts:
        if part.mask is not None:
            mask = decode_rle(part.mask).astype(bool)
            assert not (mask & ~decode_rle(region.mask).astype(bool)).any(), part.part_id
