"""Issue 28, end to end on the sample shards: a rerun after one change recomputes only the fields whose
lineage changed (stages/lineage.py), through real vLLM engines on Serve. Each test starts from a copy of
the session's whole-chain run (`tiny_run_all`), whose regions carry each stage's lineage key.

- A new merge prompt text: no object, validate or context call; merge asked again for every region it
  had taken; every other field as the first run left it.
- The context stage on another model: context and merge made again, object and validate kept.
- That model's folder changed under the same path: the run refuses while the old deployment runs, and
  once it is stopped, the stage is made again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from annotate.config import load_config
from annotate.data.store import OutputStore, iter_stored_records
from fixtures_pipeline import merge_prompt_changed
from bench.harness import SAMPLE_SHARDS, TINY

pytestmark = pytest.mark.slow

KEPT_BY_OBJECT = ("object_caption", "mask", "mask_source")


def _copy(tiny_run_all, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(tiny_run_all[0], out)
    return out


def _regions(out: Path) -> dict[str, dict]:
    store = OutputStore(out)
    return {region.region_id: region.model_dump(by_alias=True)
            for shard in ("00000", "00001")
            for record in iter_stored_records(store.output_path("final", shard)) for region in record.regions}


def _took(regions: dict[str, dict], stage: str) -> set[str]:
    return {rid for rid, r in regions.items() if r["provenance"][stage]["lineage"] is not None}


def _calls(summary, stage: str) -> int:
    return summary.model_calls.get(stage, {}).get("model_calls", 0)


def test_a_new_merge_prompt_asks_only_merge_again(ray_session, tiny_run_all, tmp_path):
    from annotate.executor.runner import run_pipeline

    out = _copy(tiny_run_all, tmp_path)
    before = _regions(out)
    merged = _took(before, "merge")
    assert merged and _took(before, "object")  # the first run recorded its keys
    cfg = merge_prompt_changed(tmp_path)

    summary = run_pipeline(cfg, SAMPLE_SHARDS, out, [0, 1], stage="all")
    assert sorted(summary.shards_written) == ["00000", "00001"]
    assert [_calls(summary, s) for s in ("object", "validate", "context")] == [0, 0, 0]
    assert _calls(summary, "merge") >= len(merged)
    assert summary.lineage["merge"] == {"kept": 0, "recomputed": len(merged), "changed": ["prompt"]}
    assert summary.lineage["object"]["recomputed"] == 0 and summary.lineage["object"]["kept"] == len(_took(before, "object"))

    after = _regions(out)
    assert after.keys() == before.keys()
    for rid, region in after.items():
        old = before[rid]
        for field in (*KEPT_BY_OBJECT, "validation", "context_caption"):
            assert region[field] == old[field], (rid, field)
        for stage in ("object", "validate", "context"):
            assert region["provenance"][stage] == old["provenance"][stage], (rid, stage)
        if rid in merged:  # taken again under the new key
            assert region["provenance"]["merge"]["lineage"] != old["provenance"]["merge"]["lineage"]
        else:  # rejected or failed before merge: untouched
            assert (region["status"], region["error"]) == (old["status"], old["error"])

    again = run_pipeline(cfg, SAMPLE_SHARDS, out, [0, 1], stage="all")  # the same config: nothing to do
    assert sorted(again.shards_skipped) == ["00000", "00001"] and not again.lineage


def test_another_context_model_and_then_its_folder_replaced(ray_session, tiny_run_all, tmp_path):
    from annotate.executor.runner import run_pipeline
    from annotate.engines.model_path import resolve_model_path
    from annotate.serving.apps import stop_apps

    out = _copy(tiny_run_all, tmp_path)
    before = _regions(out)
    folder = tmp_path / "vlm-copy"
    shutil.copytree(resolve_model_path("tiny:vlm"), folder)
    base = load_config(TINY)
    other = base.models["vlm"].model_dump(mode="json") | {"path": str(folder)}
    overrides = {"models": {"vlm_b": other}, "stages": {"context": {"model": "vlm_b"}}}
    cfg = load_config(TINY, overrides)
    try:
        summary = run_pipeline(cfg, SAMPLE_SHARDS, out, [0, 1], stage="all")
        assert [_calls(summary, s) for s in ("object", "validate")] == [0, 0]
        assert _calls(summary, "context") >= len(_took(before, "context")) > 0
        assert summary.lineage["context"]["changed"] == ["model"]
        assert summary.lineage["merge"]["changed"] == ["inputs"]
        assert summary.lineage["validate"]["recomputed"] == 0
        after = _regions(out)
        for rid, region in after.items():
            for field in (*KEPT_BY_OBJECT, "validation"):
                assert region[field] == before[rid][field], (rid, field)
            if rid in _took(before, "context"):
                assert region["provenance"]["context"]["lineage"] != before[rid]["provenance"]["context"]["lineage"]

        # The same path, other contents: detected, and not served by the deployment that holds the old ones.
        config_json = folder / "config.json"
        config_json.write_text(config_json.read_text() + "\n")
        with pytest.raises(RuntimeError, match="changed under the same path"):
            run_pipeline(cfg, SAMPLE_SHARDS, out, [0, 1], stage="all")
        assert stop_apps({"vlm_b": cfg.models["vlm_b"]})
        replaced = run_pipeline(cfg, SAMPLE_SHARDS, out, [0, 1], stage="all")
        assert "vlm_b" in replaced.models_deployed
        assert [_calls(replaced, s) for s in ("object", "validate")] == [0, 0]
        assert _calls(replaced, "context") > 0 and replaced.lineage["context"]["changed"] == ["model"]
        assert replaced.lineage["object"]["recomputed"] == 0
    finally:
        stop_apps({"vlm_b": cfg.models["vlm_b"]})  # the session's memory: one extra engine at most
