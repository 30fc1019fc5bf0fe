"""End-to-end: `run_pipeline` on the sample shards through real vLLM engines in Ray actors, output read
back with `datasets`. Also: stage-by-stage equals `--stage all`, resume skips finished shards,
`--retry-failed` redoes only failed regions."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from annotate.data.store import config_fingerprint, OutputStore

from annotate.stages.chain import RETRYABLE_PREFIXES
from fixtures_pipeline import merge_prompt_changed
from bench.harness import SAMPLE_SHARDS, input_region_ids, output_regions

pytestmark = pytest.mark.slow

STATUSES = {"ok", "rejected", "failed"}


def test_run_all_gives_every_region_once_with_captions(tiny_run_all):
    out, summary = tiny_run_all
    assert sorted(summary.shards_written) == ["00000", "00001"]
    expected = input_region_ids(SAMPLE_SHARDS, [0, 1])
    assert sum(expected.values()) > 10

    ds = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    seen = Counter(r["region_id"] for row in ds for r in row["regions"])
    assert seen == expected  # every input region exactly once
    statuses = Counter()
    for row in ds:
        assert isinstance(row["image"], Image.Image)
        assert row["image"].size == (row["width"], row["height"])
        for region in row["regions"]:
            statuses[region["status"]] += 1
            assert region["status"] in STATUSES, region
            if region["status"] != "ok":
                assert region["error"], region
                continue
            for field in ("object_caption", "context_caption", "fine_caption"):
                assert region[field] and region[field].strip(), (field, region)
            assert region["validation"]["consistent"] is True
            decoded = mask_utils.decode({"size": region["mask"]["size"], "counts": region["mask"]["counts"].encode()})
            assert decoded.shape == (row["height"], row["width"]) and decoded.any()
            for stage in ("object", "validate", "context", "merge"):
                prov = region["provenance"][stage]
                assert prov["model"] and prov["prompt_version"].startswith(stage), (stage, prov)
                assert prov["completion_tokens"] > 0
    assert statuses["ok"] > 0, statuses

    # The dataset card makes the folder itself loadable.
    ds_card = datasets.load_dataset(str(out), split="train")
    assert ds_card.num_rows == ds.num_rows


def test_rejected_regions_keep_their_reason_and_skip_later_stages(tiny_run_all):
    out, _ = tiny_run_all
    for region in output_regions(out):
        if region["status"] == "rejected" and region["validation"] is not None:
            assert region["validation"]["consistent"] is False
            assert region["error"].startswith("validate: inconsistent")
            assert region["context_caption"] is None and region["fine_caption"] is None
            assert region["provenance"]["context"]["model"] is None


def test_manifest_has_counts_checksum_and_config(tiny_run_all, tiny_config):
    out, summary = tiny_run_all
    layout = OutputStore(out)
    finished = layout.finished("final", config_fingerprint(tiny_config))
    assert set(finished) == {"00000", "00001"}
    for shard, entry in finished.items():
        assert entry["regions"] == entry["ok"] + entry["rejected"] + entry["failed"]
        assert entry["sha256"] and entry["config"] == config_fingerprint(tiny_config)
        assert entry == {**entry, **summary.shards_written[shard]}


def test_token_budgets_are_counted_by_the_models_at_load_time(tiny_run_all):
    out, summary = tiny_run_all
    budgets = {b["stage"]: b for b in summary.token_budgets}
    assert set(budgets) == {"object", "validate", "context", "merge"}
    for budget in budgets.values():
        assert 0 < budget["prompt_tokens"] and budget["prompt_tokens"] + budget["max_tokens"] <= budget["max_model_len"] == 2048
    # images: the object prompt sends the crop and its mask, merge sends none
    assert budgets["object"]["worst_image"] and not budgets["merge"]["worst_image"]
    # the merge prompt holds both earlier captions at their longest: it grows with their max_tokens
    assert budgets["merge"]["prompt_tokens"] > budgets["object"]["max_tokens"] + budgets["context"]["max_tokens"]
    record = json.loads(max((out / "runs").glob("*.json")).read_text())
    assert record["token_budgets"] == summary.token_budgets


@pytest.mark.parametrize("overrides, message", [
    ({"stages": {"merge": {"sampling": {"max_tokens": 2040}}}}, r"merge \(llm\).*does not fit"),
    ({"stages": {"object": {"sampling": {"stop_token_ids": ["<no-such-token>"]}}}}, "<no-such-token>"),
])
def test_a_stage_that_cannot_fit_stops_the_run_before_any_shard(tiny_run_all, tmp_path, overrides, message):
    """Sampling settings leave the deployments as they are (same app names): the running models count."""
    from annotate.config import load_config
    from annotate.executor.runner import run_pipeline
    from annotate.stages.budget import BudgetError
    from bench.harness import TINY

    with pytest.raises(BudgetError, match=message):
        run_pipeline(load_config(TINY, overrides), SAMPLE_SHARDS, tmp_path, [0], stage="all")
    assert not list(tmp_path.glob("data/*.parquet")) and not (tmp_path / "stages" / "prepare").exists()


def test_rerun_skips_finished_shards(tiny_run_all, tiny_config):
    from annotate.executor.runner import run_pipeline

    out, _ = tiny_run_all
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")}
    summary = run_pipeline(tiny_config, SAMPLE_SHARDS, out, [0, 1], stage="all")
    assert summary.shards_written == {} and sorted(summary.shards_skipped) == ["00000", "00001"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")} == before


def test_stage_by_stage_equals_all(tiny_run_all, tiny_config, tmp_path):
    from annotate.executor.runner import run_pipeline

    out_all, _ = tiny_run_all
    for stage in ("object", "validate", "context", "merge"):
        run_pipeline(tiny_config, SAMPLE_SHARDS, tmp_path, [0, 1], stage=stage)
        assert sorted(p.stem for p in (tmp_path / ("data" if stage == "merge" else f"stages/{stage}")).glob("*.parquet")) == ["00000", "00001"]
    by_stage = {r["region_id"]: (r["status"], r["error"]) for r in output_regions(tmp_path)}
    chained = {r["region_id"]: (r["status"], r["error"]) for r in output_regions(out_all)}
    assert by_stage == chained

    # A new merge prompt: the stages before merge are done by lineage, and merge reads their output.
    changed = merge_prompt_changed(tmp_path)
    assert run_pipeline(changed, SAMPLE_SHARDS, tmp_path, [0, 1], stage="context").shards_skipped == ["00000", "00001"]
    summary = run_pipeline(changed, SAMPLE_SHARDS, tmp_path, [0, 1], stage="merge")
    assert sorted(summary.shards_written) == ["00000", "00001"] and set(summary.model_calls) == {"merge"}


def test_a_later_stage_without_its_input_says_what_to_run(tiny_config, tmp_path):
    from annotate.executor.runner import run_pipeline

    with pytest.raises(RuntimeError, match="--stage object"):
        run_pipeline(tiny_config, SAMPLE_SHARDS, tmp_path, [0], stage="validate")


def test_retry_failed_redoes_only_failed_regions(ray_session, tiny_run_all, tiny_config, tmp_path):
    """Fail two regions as a model stage would have, then `--retry-failed` must finish exactly those."""
    import shutil

    from annotate.executor.runner import run_pipeline
    from annotate.data.writer import ShardWriter
    from annotate.data.store import iter_stored_records

    out_all, _ = tiny_run_all
    shutil.copytree(out_all, tmp_path / "out")
    out = tmp_path / "out"
    layout = OutputStore(out)
    path = layout.output_path("final", "00000")
    records = list(iter_stored_records(path))
    victims = []
    for record in records:
        for region in record.regions:
            if region.status == "ok" and len(victims) < 2:
                region.status, region.error = "failed", "merge: length: cut by max_tokens (test)"
                region.fine_caption = None
                victims.append(region.region_id)
    assert len(victims) == 2
    writer = ShardWriter(path, expected_rows=len(records))
    for record in records:
        writer.add(record)
    stats = writer.commit()  # as a run would have written it: with its manifest line (checksums are checked)
    layout.record({"output": "final", "shard": "00000", "config": config_fingerprint(tiny_config),
                            "sha256": stats.sha256, **stats.summary()})
    # The random-weight models may have failed some regions for real (e.g. an answer cut by
    # max_tokens): those are retried too, so the shards holding them are redone and they may change.
    def model_failed(region) -> bool:
        return region.status == "failed" and (region.error or "").startswith(RETRYABLE_PREFIXES)

    stored = {s: [r for rec in iter_stored_records(layout.output_path("final", s)) for r in rec.regions]
              for s in ("00000", "00001")}
    redone = {s for s, regions in stored.items() if any(model_failed(r) for r in regions)}
    assert "00000" in redone
    untouched = {r.region_id: r.model_dump() for s, regions in stored.items() for r in regions if not model_failed(r)}

    summary = run_pipeline(tiny_config, SAMPLE_SHARDS, out, [0, 1], stage="all", retry_failed=True)
    assert set(summary.shards_written) == redone and set(summary.shards_skipped) == {"00000", "00001"} - redone
    after = {r.region_id: r for s in ("00000", "00001")
             for rec in iter_stored_records(layout.output_path("final", s)) for r in rec.regions}
    assert set(after) == set(untouched) | {r.region_id for regions in stored.values() for r in regions if model_failed(r)}
    for region_id in victims:
        assert after[region_id].status == "ok" and after[region_id].fine_caption
    for region_id, dumped in untouched.items():
        assert after[region_id].model_dump() == dumped


def test_masks_decode_to_image_size(tiny_run_all):
    out, _ = tiny_run_all
    table = pq.read_table(sorted((out / "data").glob("*.parquet")), columns=["width", "height", "regions"])
    for width, height, regions in zip(*(table.column(c).to_pylist() for c in ("width", "height", "regions"))):
        for region in regions:
            if region["mask"] is None:
                assert region["status"] == "failed"
                continue
            m = mask_utils.decode({"size": region["mask"]["size"], "counts": region["mask"]["counts"].encode()})
            assert m.shape == (height, width) and m.dtype == np.uint8
