"""The optional segment stage: a real transformers SamModel (the tiny random one) turns boxes into
masks; its operator keeps rows intact; in a run it sits before `object`."""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa
import pytest

from annotate.config import DataConfig, MaskConfig, SegmentConfig
from annotate.data.masks import box_mask, decode_rle
from annotate.data.prepare import prepare_shard
from annotate.data.shards import find_shards
from bench.harness import SAMPLE_SHARDS

ACCEPT_ANY = SegmentConfig(path="tiny:sam", min_mask_frac=0.0)


@pytest.fixture(scope="module")
def sam_engine():
    from annotate.engines.sam_engine import SamEngine

    return SamEngine("tiny:sam", device="cpu")


@pytest.fixture
def box_items():
    ref = find_shards(SAMPLE_SHARDS, [0])[0]
    return [(p.record, p.image) for p in prepare_shard(ref, DataConfig(masks=MaskConfig(source="box")))]


def in_process(engine):
    """The engine's `segment` as the coroutine `segment_records` awaits (the Serve deployment's shape)."""
    async def segment(image, boxes):
        return engine.segment(image, boxes)
    return segment


def test_sam_masks_replace_box_masks_inside_their_boxes(sam_engine, box_items):
    from annotate.stages.segment import segment_records

    counts = asyncio.run(segment_records(in_process(sam_engine), box_items, ACCEPT_ANY))
    assert counts.regions_in > 0 and counts.regions_in == counts.replaced + counts.kept
    assert counts.replaced > 0
    for record, _ in box_items:
        for region in record.regions:
            if region.mask_source != "sam":
                continue
            mask = decode_rle(region.mask).astype(bool)
            assert mask.shape == (record.height, record.width) and mask.any()
            assert not (mask & ~box_mask(region.bbox, record.height, record.width)).any()


def test_implausible_sam_masks_are_refused(sam_engine, box_items):
    from annotate.stages.segment import segment_records

    strict = SegmentConfig(path="tiny:sam", min_mask_frac=1.0)  # only a mask filling the whole box would do
    before = [(r.mask, r.mask_source) for rec, _ in box_items for r in rec.regions]
    counts = asyncio.run(segment_records(in_process(sam_engine), box_items, strict))
    assert counts.replaced == 0 and counts.kept == counts.regions_in > 0
    assert [(r.mask, r.mask_source) for rec, _ in box_items for r in rec.regions] == before


@pytest.mark.slow
def test_segment_operator_keeps_every_row(ray_session, box_items):
    """The Ray Data operator against the SAM model served as a plain Serve deployment."""
    from annotate.config import RunConfig
    from annotate.executor.shard_io import record_to_row, row_to_record
    from annotate.executor.workers import SegmentWorker
    from annotate.serving.apps import SEGMENT_MODEL, ensure_apps, replica_info

    apps = ensure_apps({SEGMENT_MODEL: ACCEPT_ANY}, RunConfig())
    assert [r["class"] for r in replica_info(apps)] == ["ServeReplica:" + apps[SEGMENT_MODEL].app_name + ":" + apps[SEGMENT_MODEL].deployment_name]
    worker = SegmentWorker(ACCEPT_ANY, apps[SEGMENT_MODEL], DataConfig())
    batch = pa.Table.from_pylist([record_to_row(record, len(box_items)) for record, _ in box_items])
    out = asyncio.run(worker(batch)).to_pylist()
    assert [r["image_key"] for r in out] == [r.image_key for r, _ in box_items]
    regions = [region for row in out for region in row_to_record(row).regions]
    assert len(regions) == sum(len(r.regions) for r, _ in box_items)
    assert any(region.mask_source == "sam" for region in regions)
    assert np.all([region.region_id for region in regions])


@pytest.mark.slow
def test_run_with_segment_stage_before_object(ray_session, tiny_config, tmp_path):
    from annotate.executor.runner import run_pipeline
    from annotate.data.store import iter_stored_records

    cfg = tiny_config.model_copy(deep=True)
    cfg.data.masks.source = "box"
    cfg.segment = ACCEPT_ANY
    run_pipeline(cfg, SAMPLE_SHARDS, tmp_path, [0], stage="object")
    regions = [r for rec in iter_stored_records(tmp_path / "stages" / "object" / "00000.parquet") for r in rec.regions]
    assert any(r.mask_source == "sam" for r in regions)
    assert all(r.object_caption for r in regions if r.status == "pending")
