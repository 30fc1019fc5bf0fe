"""Lineage keys: a change reaches the stage it changes and the stages that read it, nothing else; and
what each stage declares it `reads` is what its code really uses, found by running the chain with one
earlier stage answering differently and watching what the stage then sends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from annotate.config import PipelineConfig, load_config
from annotate.data.masks import encode_rle
from annotate.data.records import ImageRecord, RegionRecord
from annotate.engines.base import ChatResult
from annotate.engines.result_cache import request_key
from annotate.stages.base import RegionContext
from annotate.stages.chain import STAGE_CLASSES, build_stage, chain_of
from annotate.stages.lineage import LineageKey, chain_lineage

from bench.harness import TINY_FIELDS

REPO = Path(__file__).resolve().parents[1]
CORE = ("object", "validate", "context", "merge")
AFTER_MERGE = ("summarize", "ground", "negatives", "negatives_text", "negatives_visual")


@pytest.fixture(scope="module")
def cfg() -> PipelineConfig:
    return load_config(TINY_FIELDS)


def identities(cfg: PipelineConfig, **override: str) -> dict[str, dict[str, Any]]:
    return {key: {"path": model.path, "revision": None, "weights": override.get(key, "digest-" + key)}
            for key, model in cfg.models.items()}


def variant(cfg: PipelineConfig, update: dict[str, Any]) -> PipelineConfig:
    """`cfg` with `update` merged into it, section by section."""
    def merge(base, extra):
        return {k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                for k, v in {**base, **extra}.items()} if isinstance(extra, dict) else extra
    return PipelineConfig.model_validate(merge(cfg.model_dump(), update))


def changes(before: dict[str, LineageKey], after: dict[str, LineageKey]) -> dict[str, list[str]]:
    """The stages whose key changed, with the parts that changed."""
    assert list(before) == list(after)
    return {name: before[name].changed(after[name]) for name in before if before[name] != after[name]}


def test_merge_prompt_text_changes_merge_and_its_readers_only(cfg, tmp_path):
    base = chain_lineage(cfg, identities(cfg))
    text = Path(cfg.stages["merge"].prompt).read_text()
    moved = tmp_path / "same.yaml"
    moved.write_text("# a comment changes nothing that is sent\n" + text)
    assert chain_lineage(variant(cfg, {"stages": {"merge": {"prompt": str(moved)}}}), identities(cfg)) == base
    edited = tmp_path / "merge.yaml"
    edited.write_text(text.replace("one to three sentences", "two to four sentences"))
    assert edited.read_text() != text
    after = chain_lineage(variant(cfg, {"stages": {"merge": {"prompt": str(edited)}}}), identities(cfg))
    assert changes(base, after) == {"merge": ["prompt"], **{name: ["inputs"] for name in AFTER_MERGE}}


def test_a_tile_cap_counts_only_for_a_model_that_tiles(cfg, tmp_path):
    """context.yaml's max_tiles reaches InternVL2 alone: under a model that does not tile (Griffon-G,
    or tiny's generic VLM) a changed cap is sent nothing and redoes nothing; under InternVL2 it redoes
    context and its readers, like any prompt change."""
    text = Path(cfg.stages["context"].prompt).read_text()
    assert "\nmax_tiles: 6\n" in text
    other_cap = tmp_path / "context.yaml"
    other_cap.write_text(text.replace("\nmax_tiles: 6\n", "\nmax_tiles: 2\n"))
    with_cap = {"stages": {"context": {"prompt": str(other_cap)}}}
    for family, redone in ((None, {}), ("griffon_gemma2", {}),
                           ("internvl2_hermes2", {"context": ["prompt"], "merge": ["inputs"],
                                                  **{name: ["inputs"] for name in AFTER_MERGE}})):
        of_family = variant(cfg, {"models": {"vlm": {"family": family}}})
        base = chain_lineage(of_family, identities(of_family))
        after = chain_lineage(variant(of_family, with_cap), identities(of_family))
        assert changes(base, after) == redone, family


def test_context_model_changes_context_merge_and_after(cfg):
    base = chain_lineage(cfg, identities(cfg))
    other = variant(cfg, {"models": {"vlm_b": cfg.models["vlm"].model_dump()}, "stages": {"context": {"model": "vlm_b"}}})
    after = chain_lineage(other, identities(other, vlm_b="other-weights"))
    assert changes(base, after) == {"context": ["model"], "merge": ["inputs"], **{n: ["inputs"] for n in AFTER_MERGE}}
    # The same weights under another key: nothing to recompute.
    assert chain_lineage(other, identities(other, vlm_b="digest-vlm")) == base


def test_new_weights_change_every_stage_of_that_model_and_their_readers(cfg):
    base = chain_lineage(cfg, identities(cfg))
    after = chain_lineage(cfg, identities(cfg, llm="fine-tuned"))
    changed = changes(base, after)
    assert "object" not in changed and changed["context"] == ["inputs"]  # context reads validate
    assert changed["validate"] == ["model"] and changed["negatives_visual"] == ["inputs"]  # the vlm, after llm stages
    assert all(changed[name] == ["inputs", "model"] for name in ("merge", "summarize", "ground", "negatives",
                                                                 "negatives_text"))


def test_a_data_setting_changes_every_stage(cfg):
    base = chain_lineage(cfg, identities(cfg))
    after = chain_lineage(variant(cfg, {"data": {"crops": {"max_side": 128}}}), identities(cfg))
    assert changes(base, after) == {name: ["data"] if not STAGE_CLASSES[name].reads else ["data", "inputs"]
                                    for name in chain_of(cfg)}


def test_sampling_changes_that_stage_and_downstream(cfg):
    base = chain_lineage(cfg, identities(cfg))
    after = chain_lineage(variant(cfg, {"stages": {"validate": {"sampling": {"max_tokens": 300}}}}), identities(cfg))
    assert changes(base, after) == {"validate": ["sampling"], "context": ["inputs"], "merge": ["inputs"],
                                    **{name: ["inputs"] for name in AFTER_MERGE}}


def test_params_count_as_validated_and_reach_the_readers(cfg):
    base = chain_lineage(cfg, identities(cfg))
    defaults = variant(cfg, {"stages": {"negatives": {"params": {"k": 2, "echo_words": 8}}}})
    assert chain_lineage(defaults, identities(cfg)) == base  # a default written out is the default
    after = chain_lineage(variant(cfg, {"stages": {"negatives": {"params": {"k": 3}}}}), identities(cfg))
    assert changes(base, after) == {"negatives": ["params"], "negatives_text": ["inputs"],
                                    "negatives_visual": ["inputs"]}
    retries = chain_lineage(variant(cfg, {"stages": {"summarize": {"retry_temperature": 0.9}}}), identities(cfg))
    assert changes(base, retries) == {"summarize": ["params"]}


def test_the_answer_digest_covers_weights_prompt_and_sampling_only(cfg):
    base = chain_lineage(cfg, identities(cfg))
    data = chain_lineage(variant(cfg, {"data": {"crops": {"max_side": 128}}}), identities(cfg))
    assert all(base[n].answer_digest == data[n].answer_digest for n in base)  # pixels are in the request
    weights = chain_lineage(cfg, identities(cfg, llm="fine-tuned"))
    assert [n for n in base if base[n].answer_digest != weights[n].answer_digest] == [
        n for n in base if cfg.stages[n].model == "llm"]


def test_keys_are_the_same_in_another_process(cfg):
    code = ("import json; from annotate.config import load_config; from annotate.stages.lineage import chain_lineage;"
            f"cfg = load_config({str(TINY_FIELDS)!r});"
            "ids = {k: {'path': m.path, 'revision': None, 'weights': 'digest-' + k} for k, m in cfg.models.items()};"
            "print(json.dumps({n: k.digest for n, k in chain_lineage(cfg, ids).items()}))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout) == {n: k.digest for n, k in chain_lineage(cfg, identities(cfg)).items()}


def test_production_pipeline_and_missing_identities():
    cfg = load_config(REPO / "pipelines" / "longgrit.yaml")
    keys = chain_lineage(cfg, identities(cfg))
    assert list(keys) == list(CORE) and len({k.parts["model"] for k in keys.values()}) == 4
    with pytest.raises(KeyError, match="no identity"):
        chain_lineage(cfg, {})


# ---------------------------------------------------------------- what each stage really reads
DESCRIPTION = "The object is a red ceramic mug with a chipped handle. It stands on a wooden table."
# Two valid answers per stage: A, the one the chain gets, and B, another one.
ANSWERS: dict[str, tuple[Any, Any]] = {
    "object": ("a red ceramic mug", "a blue glass vase"),
    "validate": ({"reason": "The caption describes the mug.", "consistent": True},
                 {"reason": "The caption names another object.", "consistent": False}),
    "context": ("It stands on a wooden table, left of a laptop.", "It lies on the floor by the door."),
    "merge": (DESCRIPTION, "A red mug with a chipped handle stands on a wooden table."),
    "summarize": ("A chipped red mug on a table.", "A red mug."),
    "ground": ({"phrases": [{"text": "red ceramic mug", "refers_to": "self"}]},
               {"phrases": [{"text": "wooden table", "refers_to": "R1"}]}),
    "negatives": ({"edits": [{"type": "colour", "text": DESCRIPTION.replace("red", "blue")}]},
                  {"edits": [{"type": "material", "text": DESCRIPTION.replace("ceramic", "glass")}]}),
    "negatives_text": ({"verdicts": [{"reason": "Blue contradicts red.", "holds": True}]},
                       {"verdicts": [{"reason": "Both can be true.", "holds": False}]}),
    "negatives_visual": ({"verdicts": [{"reason": "The mug is red.", "holds": False}]},
                         {"verdicts": [{"reason": "The mug is blue.", "holds": True}]}),
    "parts": ({"parts": [{"name": "handle", "visibility": "full", "reason": "curved", "box": "[100, 100, 600, 600]"}]},
              {"parts": [{"name": "rim", "visibility": "partial", "reason": "chipped", "box": "[300, 300, 900, 900]"}]}),
    "part_describe": ({"parts": [{"short": "a curved handle", "long": "A curved ceramic handle on the left."}]},
                      {"parts": [{"short": "a chipped rim", "long": "The rim of the mug, chipped at the front."}]}),
    "part_verify": ({"verdicts": [{"reason": "The cyan region is the handle.", "holds": True}]},
                    {"verdicts": [{"reason": "The cyan region shows the table.", "holds": False}]}),
}


def fresh_record() -> tuple[ImageRecord, Image.Image]:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:40, 10:40] = 1
    regions = [RegionRecord(region_id=f"s:img:{i}", region_index=i, phrase=phrase, bbox=[10, 10, 30, 30],
                            mask=encode_rle(mask), mask_source="given")
               for i, phrase in enumerate(["a red mug", "a wooden table"])]
    return (ImageRecord(image_key="img", shard="s", width=64, height=64, caption="a mug", regions=regions),
            Image.new("RGB", (64, 64), (200, 30, 30)))


def result(answer: Any) -> ChatResult:
    text = json.dumps(answer) if isinstance(answer, dict) else answer
    return ChatResult(request_id="r", text=text, finish_reason="stop", parsed=answer if isinstance(answer, dict) else None)


def run_until(cfg, stop: str, different: str | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Run the chain on one region up to `stop`, every stage answering A except `different` (B). Returns
    what `stop` then does (whether it takes the region, the key of its request, the field it writes
    from answer A) and each earlier stage's output."""
    record, image = fresh_record()
    region, outputs = record.regions[0], {}
    for name in chain_of(cfg):
        stage = build_stage(name, cfg.stages[name], "m", cfg.models[cfg.stages[name].model])
        if name == stop:
            if not stage.wants(region):
                return ("skipped",), outputs
            request = stage.build_request(RegionContext(record, region, image, cfg.data.crops))
            assert stage.apply(region, result(ANSWERS[name][0])) is None
            return (request_key("m", request), json.dumps(_dump(getattr(region, stage.writes)))), outputs
        if stage.wants(region) and not stage.without_model(region):
            stage.build_request(RegionContext(record, region, image, cfg.data.crops))  # ground keeps the ids
            assert stage.apply(region, result(ANSWERS[name][name == different])) is None
        outputs[name] = (json.dumps(_dump(getattr(region, stage.writes))), region.status)
    raise AssertionError(f"{stop} is not in the chain")


def _dump(value: Any) -> Any:
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


@pytest.mark.parametrize("name", list(STAGE_CLASSES))
def test_a_stage_reads_what_it_declares(name):
    """A stage changes what it does when a stage it `reads` answers otherwise; when another earlier stage
    does, only through the output of a stage it reads. (tiny-parts.yaml: every stage of the chain.)"""
    cfg = load_config(REPO / "pipelines" / "tiny-parts.yaml")
    chain = chain_of(cfg)
    reads = STAGE_CLASSES[name].reads
    assert set(reads) <= set(chain[:chain.index(name)])
    baseline, base_outputs = run_until(cfg, name, None)
    assert baseline[0] != "skipped"
    for earlier in chain[:chain.index(name)]:
        behaviour, outputs = run_until(cfg, name, earlier)
        if earlier in reads:
            assert behaviour != baseline, f"{name} declares it reads {earlier} but ignores its answer"
        elif behaviour != baseline:
            moved = [r for r in reads if outputs[r] != base_outputs[r]]
            assert moved, f"{name} depends on {earlier}, which it does not read, other than through what it reads"


def test_an_unset_revision_leaves_the_config_fingerprint_as_before_and_a_set_one_changes_it():
    """`revision` came after outputs were made: unset, it is not part of the record settings, so their
    manifest lines stay current; declared, it changes what the model writes and so the fingerprint."""
    from annotate.config import load_config
    from annotate.data.store import config_fingerprint

    cfg = load_config(REPO / "pipelines" / "tiny.yaml")
    assert all("revision" not in model for model in cfg.record_settings()["models"].values())
    model = next(iter(cfg.models))
    revised = cfg.model_copy(update={"models": {**cfg.models, model: cfg.models[model].model_copy(
        update={"revision": "ft-2026-12"})}})
    assert config_fingerprint(revised) != config_fingerprint(cfg)


def _described(**provenance_keys) -> "RegionRecord":
    from annotate.data.records import RegionRecord, Validation

    region = RegionRecord(region_id="s:k:0", region_index=0, phrase="a dog", bbox=[0, 0, 2, 2], status="ok",
                          object_caption="a brown dog", validation=Validation(consistent=True, reason="fits"),
                          context_caption="on grass", fine_caption="a brown dog on grass", summary="a dog")
    for stage, key in provenance_keys.items():
        region.provenance.of(stage).lineage = key
        region.provenance.of(stage).attempts = 1
    return region


def test_reset_for_lineage_clears_only_the_fields_whose_key_changed():
    from annotate.data.records import ImageRecord, RegionRecord
    from annotate.stages.lineage import reset_for_lineage

    keys = {"object": "o", "validate": "v", "context": "c", "merge": "m2", "summarize": "s2"}
    merge_changed = _described(object="o", validate="v", context="c", merge="m1", summarize="s1")
    only_summary = _described(object="o", validate="v", context="c", merge="m2", summarize="s1")
    unchanged = _described(object="o", validate="v", context="c", merge="m2", summarize="s2")
    rejected = RegionRecord(region_id="s:k:1", region_index=1, phrase="a cat", bbox=[0, 0, 2, 2], status="rejected",
                            error="validate: inconsistent", object_caption="a cat")
    rejected.provenance.of("object").lineage, rejected.provenance.of("validate").lineage = "o", "v"
    data_failed = RegionRecord(region_id="s:k:2", region_index=2, phrase="x", bbox=[0, 0, 2, 2], status="failed",
                               error="mask: mask is empty")
    record = ImageRecord(image_key="k", shard="s", width=4, height=4, caption="",
                         regions=[merge_changed, only_summary, unchanged, rejected, data_failed])

    assert reset_for_lineage(record, keys) == {"merge": 1, "summarize": 2}
    assert merge_changed.status == "pending" and merge_changed.fine_caption is None and merge_changed.summary is None
    assert merge_changed.context_caption == "on grass" and merge_changed.provenance.of("context").lineage == "c"
    assert merge_changed.provenance.of("merge").lineage is None and merge_changed.provenance.of("merge").attempts == 0
    assert only_summary.status == "ok" and only_summary.fine_caption and only_summary.summary is None
    assert unchanged.summary == "a dog" and unchanged.status == "ok"
    assert (rejected.status, rejected.error) == ("rejected", "validate: inconsistent")
    assert (data_failed.status, data_failed.error) == ("failed", "mask: mask is empty")
    # a stage the chain no longer runs: its field goes (only `unchanged` still has one), nothing else
    assert reset_for_lineage(record, {k: v for k, v in keys.items() if k != "summarize"}) == {"summarize": 1}
    assert unchanged.summary is None and unchanged.status == "ok" and unchanged.fine_caption


def test_a_stage_records_its_key_in_the_provenance_of_each_region_it_takes():
    from annotate.engines.base import ChatResult
    from annotate.stages.batch import run_stage
    from annotate.stages.chain import build_stage

    cfg = load_config(TINY_FIELDS)
    stage = build_stage("merge", cfg.stages["merge"], "m", cfg.models[cfg.stages["merge"].model])
    stage.lineage = "key-1"
    region = _described()
    region.status, region.fine_caption = "pending", None
    from annotate.data.records import ImageRecord

    record = ImageRecord(image_key="k", shard="s", width=4, height=4, caption="", regions=[region])
    answer = "A brown dog stands on green grass in a sunny park."
    counts = run_stage(stage, [(record, None)], lambda reqs: [ChatResult(r.request_id, answer, "stop") for r in reqs],
                       cfg.data.crops, max_attempts=2)
    assert counts.done == 1 and region.fine_caption
    assert region.provenance.of("merge").lineage == "key-1" and region.provenance.of("merge").attempts == 1


def test_replaced_sam_weights_change_every_stage_and_a_pipeline_without_sam_keeps_its_keys(cfg):
    """SAM's masks are the regions' (before object) and the parts': its identity is in every key's `data`."""
    base = chain_lineage(cfg, identities(cfg))
    assert chain_lineage(cfg, identities(cfg), None) == base
    with_sam = variant(cfg, {"segment": {"path": "tiny:sam"}})
    sam = chain_lineage(with_sam, identities(with_sam), {"path": "tiny:sam", "revision": None, "weights": "a"})
    replaced = chain_lineage(with_sam, identities(with_sam), {"path": "tiny:sam", "revision": None, "weights": "b"})
    changed = changes(sam, replaced)
    assert set(changed) == set(sam) and all(parts[0] == "data" for parts in changed.values()), changed
