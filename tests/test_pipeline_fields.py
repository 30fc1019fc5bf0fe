"""End-to-end: the optional stages after merge (summarize, ground, negatives and its two checks) and
the quality record, run by `run_pipeline` through the session's Serve deployments of the tiny models
(pipelines/tiny-fields.yaml extends tiny.yaml: same models, so nothing new is deployed).

Random weights answer noise, so the test checks the plumbing and that every field written is
consistent: offsets slice the description, a negative differs from it in exactly its span, token
counts hold. Noise proposals never pass the one-span check, so the proposal step reads a scripted
answer (bench.harness.ScriptedNegatives, after a real model call); and the text check, after its real
call, passes every candidate (ScriptedContradiction), so the VLM check judges them on the real engine."""

from __future__ import annotations

from collections import Counter

import datasets
import pyarrow.parquet as pq
import pytest

from annotate.config import load_config
from annotate.data.store import OutputStore
from annotate.gallery import write_gallery
from annotate.stages.chain import chain_of
from annotate.stages.summarize import clip_token_count

from bench.harness import SAMPLE_SHARDS, TINY_FIELDS, input_region_ids

pytestmark = pytest.mark.slow
ADDED = ("summarize", "ground", "negatives", "negatives_text", "negatives_visual")


@pytest.fixture(scope="module")
def fields_run(ray_session, tiny_run_all, tmp_path_factory):
    """One shard through the whole chain with every optional stage (after the session's first run, so
    the models are up)."""
    from annotate.executor.runner import run_pipeline

    cfg = load_config(TINY_FIELDS, {"stages": {"negatives": {"stage_class": "bench.harness:ScriptedNegatives"},
                                               "negatives_text": {"stage_class": "bench.harness:ScriptedContradiction"}}})
    assert chain_of(cfg)[-5:] == ADDED
    out = tmp_path_factory.mktemp("run-fields")
    summary = run_pipeline(cfg, SAMPLE_SHARDS, out, [0], stage="all")
    return out, summary


def _regions(out):
    return [r for f in OutputStore(out).dataset_files()
            for rs in pq.read_table(f, columns=["regions"]).column("regions").to_pylist() for r in rs]


def test_every_region_once_and_the_added_fields_are_consistent(fields_run):
    out, summary = fields_run
    assert not summary.models_deployed  # the session's deployments served this pipeline too
    regions = _regions(out)
    assert Counter(r["region_id"] for r in regions) == input_region_ids(SAMPLE_SHARDS, [0])
    statuses = Counter(r["status"] for r in regions)
    assert statuses["ok"] > 0, statuses
    judged = visual = 0
    for r in regions:
        assert r["status"] in ("ok", "rejected", "failed") and (r["status"] == "ok") == (r["error"] is None), r
        text = r["fine_caption"]
        if r["status"] == "ok":  # every optional stage finished it
            assert text and r["summary"] and r["phrases"] is not None and r["negatives"] is not None, r
        if r["summary"] is not None:
            assert r["summary_tokens"] == clip_token_count(r["summary"]) <= 77
            assert [text[s["start"]:s["end"]] for s in r["sentences"]] == [s["text"] for s in r["sentences"]]
            assert " ".join(s["text"] for s in r["sentences"]).split() == text.split()  # they cover it all
        for p in r["phrases"] or []:
            assert text[p["start"]:p["end"]] == p["text"] and (p["target"] == "region") == bool(p["region_id"])
        candidates = r["negative_candidates"] or []
        for c in candidates:
            assert c["text"] == text[:c["start"]] + c["replacement"] + text[c["end"]:] != text
        if r["negative_text_verdicts"] is not None:
            assert len(r["negative_text_verdicts"]) == len(candidates)
            judged += bool(candidates)
            if candidates:
                prov = r["provenance"]["negatives_text"]
                assert prov["model"] and prov["completion_tokens"] > 0
        for n in r["negatives"] or []:
            assert n in [{**c} for c in candidates] and n["contradiction"]["holds"] and n["visual"]["holds"]
        if any((c["contradiction"] or {}).get("holds") for c in candidates) and r["negatives"] is not None:
            assert r["provenance"]["negatives_visual"]["completion_tokens"] > 0  # the VLM judged them
            assert all(c["visual"] is not None for c in candidates)
            visual += 1
        if r["status"] == "ok":
            q = r["quality"]
            assert q["words"] == len(text.split()) and set(q["flags"]) <= {"too_short", "too_long", "repetition", "markup"}
            assert (q["nouns"] == 0) == (q["unsupported_noun_share"] is None)
    assert judged > 0 and visual > 0  # candidates went through both checks on the real engines


def test_near_duplicates_side_file_covers_every_described_region(fields_run):
    out, _ = fields_run
    store = OutputStore(out)
    clusters = store.near_duplicates()
    described = {r["region_id"] for r in _regions(out) if r["fine_caption"]}
    assert set(clusters) == described
    for rid, (cid, size) in clusters.items():
        assert cid in clusters and clusters[cid][0] == cid and cid <= rid and size >= 1


def test_the_dataset_loads_the_card_describes_and_the_gallery_shows_the_fields(fields_run, tmp_path):
    out, _ = fields_run
    ds = datasets.load_dataset(str(out), split="train")
    region = next(r for row in ds for r in row["regions"] if r["status"] == "ok")
    assert isinstance(region["summary"], str) and isinstance(region["sentences"], list)
    card = (out / "README.md").read_text()
    for field in ("summary", "sentences", "phrases", "negatives", "quality"):
        assert f"| `{field}` |" in card
    gallery = write_gallery(out, tmp_path / "gallery")
    page = gallery.pages[0].path.read_text()
    for row in ("<dt>summary</dt>", "<dt>sentences</dt>", "<dt>phrases</dt>", "<dt>hard negatives</dt>",
                "<dt>quality</dt>", "<dt>near duplicates</dt>"):
        assert row in page
