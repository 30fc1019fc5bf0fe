"""The optional stages after merge (summarize, ground, negatives and its two checks) and the quality
record, without Ray: each stage runs through `run_stage` against a scripted engine that answers as
told. A fake engine is used because random-weight models give noise verdicts; the real engines run
these stages in tests/test_pipeline_fields.py."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from annotate.config import CropConfig, QualityConfig, load_config
from annotate.data.masks import encode_rle
from annotate.data.records import ImageRecord, RegionRecord, arrow_schema, image_record_to_row, row_to_image_record
from annotate.data.store import OutputStore, iter_stored_records
from annotate.engines.base import ChatResult
from annotate.stages.batch import run_stage
from annotate.stages.chain import build_stage, chain_of, check_stages, finalize_record
from annotate.stages.negatives import single_span_edit
from annotate.stages.summarize import clip_token_count, split_sentences

from bench.harness import TINY_FIELDS

import numpy as np

DESCRIPTION = ("The object is a red ceramic mug with a chipped handle. It stands on a wooden table, "
               "left of a laptop.")


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY_FIELDS)


def make_record() -> tuple[ImageRecord, Image.Image]:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:40, 10:40] = 1
    regions = [RegionRecord(region_id=f"s:img:{i}", region_index=i, phrase=p, bbox=[10, 10, 30, 30],
                            mask=encode_rle(mask), mask_source="given", object_caption="a red mug",
                            fine_caption=DESCRIPTION if i == 0 else None, status="ok" if i == 0 else "rejected")
               for i, p in enumerate(["a red mug", "a wooden table", "a laptop"])]
    record = ImageRecord(image_key="img", shard="s", width=64, height=64, caption="a mug", regions=regions)
    return record, Image.new("RGB", (64, 64), (200, 30, 30))


class Scripted:
    """An engine that answers every request with the next scripted answer (text, or JSON when a dict)."""

    def __init__(self, *answers):
        self.answers, self.requests = list(answers), []

    def __call__(self, requests):
        self.requests.extend(requests)
        out = []
        for request in requests:
            answer = self.answers.pop(0)
            text = json.dumps(answer) if isinstance(answer, dict) else answer
            out.append(ChatResult(request_id=request.request_id, text=text, finish_reason="stop",
                                  parsed=answer if isinstance(answer, dict) else None, completion_tokens=3))
        return out


def run(cfg, name, record, image, engine):
    """Stage `name` over the record's regions; only the first is described, so only it is worked on."""
    stage = build_stage(name, cfg.stages[name], "scripted")
    return run_stage(stage, [(record, image)], engine, CropConfig(max_side=64), cfg.stages[name].max_attempts)


def test_summary_counts_clip_tokens_and_sentences_slice_the_description(cfg):
    record, image = make_record()
    engine = Scripted(*(["A chipped red ceramic mug on a wooden table."] * 3))
    run(cfg, "summarize", record, image, engine)
    region = record.regions[0]
    assert region.summary == "A chipped red ceramic mug on a wooden table."
    assert region.summary_tokens == clip_token_count(region.summary) <= 77
    assert [s.text for s in region.sentences] == ["The object is a red ceramic mug with a chipped handle.",
                                                   "It stands on a wooden table, left of a laptop."]
    for s in region.sentences:
        assert region.fine_caption[s.start:s.end] == s.text
    assert region.status == "ok" and region.provenance.summarize.model == "scripted"


def test_a_summary_over_77_clip_tokens_is_asked_again_then_fails_the_region(cfg):
    record, image = make_record()
    long = " ".join(["extraordinarily"] * 80)
    attempts = cfg.stages["summarize"].max_attempts
    engine = Scripted(*([long] * (3 * attempts)))
    run(cfg, "summarize", record, image, engine)
    region = record.regions[0]
    assert region.summary is None and region.status == "failed"
    assert "CLIP tokens, over the limit of 77" in region.error and region.error.startswith("summarize: parse")


def test_sentence_split_keeps_abbreviations_and_exact_offsets():
    text = "A mug, e.g. a cup.  It is red!  \"Old\" paint. 3 chips remain"
    spans = split_sentences(text)
    assert [s.text for s in spans] == ["A mug, e.g. a cup.", "It is red!", "\"Old\" paint.", "3 chips remain"]
    assert all(text[s.start:s.end] == s.text for s in spans)
    assert split_sentences("") == []


def test_ground_ties_phrases_to_the_region_other_regions_or_nothing(cfg):
    record, image = make_record()
    engine = Scripted({"phrases": [
        {"text": "a red ceramic mug", "refers_to": "self"},
        {"text": "a chipped handle", "refers_to": "none"},
        {"text": "a wooden table", "refers_to": "R1"},
        {"text": "a laptop", "refers_to": "R9"},  # no such region: ungrounded, not a wrong link
        {"text": "a blue vase", "refers_to": "self"},  # not in the description: dropped
    ]}, "{}", "{}")
    run(cfg, "ground", record, image, engine)
    phrases = record.regions[0].phrases
    assert [(p.text, p.target, p.region_id) for p in phrases] == [
        ("a red ceramic mug", "self", None), ("a chipped handle", "none", None),
        ("a wooden table", "region", "s:img:1"), ("a laptop", "none", None)]
    for p in phrases:
        assert DESCRIPTION[p.start:p.end] == p.text
    prompt = engine.requests[0].messages[-1]["content"][-1]["text"]
    assert 'R1: "a wooden table"' in prompt and 'R2: "a laptop"' in prompt and "R0:" not in prompt


@pytest.mark.parametrize("edited, expected", [
    ("The object is a blue ceramic mug.", (16, 19, "blue")),
    ("The object is a mug.", (16, 28, "")),
    ("The object is a small red ceramic mug.", (16, 16, "small ")),
    ("The thing is a blue ceramic mug.", None),  # two spans
    ("The object is a red ceramic mug.", None),  # no change
    ("The object is a big old chipped dull green glass ceramic mug.", None),  # six words: over max_span_words
])
def test_single_span_edit(edited, expected):
    original = "The object is a red ceramic mug."
    assert single_span_edit(original, edited, 5) == expected
    if expected:
        start, end, replacement = expected
        assert original[:start] + replacement + original[end:] == edited


def test_negatives_are_kept_only_when_both_checks_judge_them_false(cfg):
    record, image = make_record()
    d = DESCRIPTION
    proposals = Scripted({"edits": [
        {"type": "colour", "text": d.replace("red", "green")},
        {"type": "material", "text": d.replace("ceramic", "glass")},
        {"type": "relation", "text": d.replace("left", "right")},
        {"type": "colour", "text": d.replace("red", "green")},  # the same edit again
        {"type": "count", "text": d.replace("The object", "Two objects").replace("red", "blue")},  # two spans
        {"type": "mood", "text": d.replace("red", "sad")},  # not an edit type
    ]})
    run(cfg, "negatives", record, image, proposals)
    region = record.regions[0]
    assert [c.replacement for c in region.negative_candidates] == ["green", "glass"]  # k = 2 in tiny-fields
    for c in region.negative_candidates:
        assert c.text == d[:c.start] + c.replacement + d[c.end:] and d[c.start:c.end] != c.replacement

    text_check = Scripted({"verdicts": [{"holds": True, "reason": "green is not red"},
                                        {"holds": False, "reason": "compatible"}]})
    run(cfg, "negatives_text", record, image, text_check)
    assert [v.holds for v in region.negative_text_verdicts] == [True, False]

    visual = Scripted({"verdicts": [{"holds": False, "reason": "the mug is red"}]})
    run(cfg, "negatives_visual", record, image, visual)
    prompt = visual.requests[0].messages[-1]["content"][-1]["text"]
    assert "green" in prompt and "glass" not in prompt  # only what the text model passed goes to the VLM
    assert len(visual.requests[0].messages[-1]["content"]) == 3  # two images, then the text
    [kept] = region.negatives
    assert kept.replacement == "green" and kept.contradiction.holds and kept.visual.holds
    assert kept.visual.reason == "the mug is red" and region.status == "ok"


def test_a_verdict_true_of_the_image_or_missing_drops_the_negative(cfg):
    record, image = make_record()
    run(cfg, "negatives", record, image, Scripted({"edits": [
        {"type": "colour", "text": DESCRIPTION.replace("red", "green")},
        {"type": "size", "text": DESCRIPTION.replace("mug", "tiny mug")}]}))
    run(cfg, "negatives_text", record, image, Scripted({"verdicts": [{"holds": True, "reason": "a"}]}))
    region = record.regions[0]
    assert [v.holds for v in region.negative_text_verdicts] == [True, False]  # the missing one is not verified
    assert region.negative_text_verdicts[1].reason == "no verdict given"
    run(cfg, "negatives_visual", record, image, Scripted({"verdicts": [{"holds": True, "reason": "it is green"}]}))
    assert region.negatives == [] and region.negative_candidates[0].visual.holds is False


def test_without_candidates_the_checks_settle_without_calling_a_model(cfg):
    record, image = make_record()
    run(cfg, "negatives", record, image, Scripted({"edits": [{"type": "colour", "text": "Something else entirely."}]}))
    region = record.regions[0]
    assert region.negative_candidates == []

    def no_model(requests):
        raise AssertionError(f"{len(requests)} request(s) sent with nothing to check")

    for name in ("negatives_text", "negatives_visual"):
        counts = run(cfg, name, record, image, lambda requests: no_model(requests) if requests else [])
        assert counts.done == 1
    assert region.negative_text_verdicts == [] and region.negatives == [] and region.status == "ok"


def test_check_stages_wants_the_negative_stages_together_and_valid_params(cfg):
    check_stages(cfg, chain_of(cfg))
    without_visual = cfg.model_copy(deep=True)
    del without_visual.stages["negatives_visual"]
    with pytest.raises(ValueError, match="go together"):
        check_stages(without_visual)
    bad = cfg.model_copy(deep=True)
    bad.stages["negatives"].params = {"k": 0}
    with pytest.raises(ValueError, match="stage negatives: bad params"):
        check_stages(bad)
    bad.stages["negatives"].params = {"kk": 3}
    with pytest.raises(ValueError, match="bad params"):
        check_stages(bad)


def test_quality_record_is_written_when_configured():
    record, _ = make_record()
    record.regions[0].phrases = []
    finalize_record(record)
    assert record.regions[0].quality is None
    finalize_record(record, QualityConfig(min_words=30))
    quality = record.regions[0].quality
    assert quality.words == len(DESCRIPTION.split()) and "too_short" in quality.flags
    assert quality.nouns == 0 and quality.unsupported_noun_share is None


def test_files_of_schema_1_1_still_load(tmp_path):
    record, _ = make_record()
    row = image_record_to_row(record)
    old_region_fields = ("region_id", "region_index", "phrase", "bbox", "score", "mask", "mask_source",
                         "object_caption", "validation", "context_caption", "fine_caption", "status", "error")
    region_type = arrow_schema().field("regions").type.value_type
    old_region = pa.struct([region_type.field(n) for n in old_region_fields]
                           + [pa.field("provenance", pa.struct([region_type.field("provenance").type.field(s)
                                                                for s in ("object", "validate", "context", "merge")]))])
    schema = pa.schema([f if f.name != "regions" else pa.field("regions", pa.list_(old_region)) for f in arrow_schema()])
    row["regions"] = [{k: v for k, v in r.items() if k in old_region_fields} | {"provenance": {
        s: r["provenance"][s] for s in ("object", "validate", "context", "merge")}} for r in row["regions"]]
    row["schema_version"] = "1.1"
    store = OutputStore(tmp_path)
    path = store.output_path("final", "00000")
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=schema), path)
    [old] = list(iter_stored_records(path))
    assert old.regions[0].fine_caption == DESCRIPTION and old.regions[0].summary is None
    assert old.regions[0].negatives is None and old.schema_version == "1.1"
    assert row_to_image_record(pq.read_table(path).to_pylist()[0]).regions[0].quality is None


def test_the_card_describes_every_region_field(tmp_path):
    from annotate.data.records import features
    from annotate.data.writer import write_dataset_card

    write_dataset_card(tmp_path, "data/*.parquet")
    card = (tmp_path / "README.md").read_text()
    for field in features()["regions"].feature:
        assert f"| `{field}` |" in card, field


def test_near_duplicate_side_file_covers_the_dataset_and_names_its_files(tmp_path):
    import json as json_

    from annotate.data.store import FINAL
    from annotate.data.writer import write_parquet_atomic
    from annotate.stages.quality import write_near_duplicates

    record, _ = make_record()
    twin = record.model_copy(deep=True)
    twin.image_key = "img2"
    for region in twin.regions:
        region.region_id = region.region_id.replace("img", "img2")
    store = OutputStore(tmp_path)
    write_parquet_atomic([record, twin], store.output_path(FINAL, "00000"))
    path = write_near_duplicates(store, QualityConfig())
    assert store.near_duplicates() == {"s:img2:0": ("s:img2:0", 2), "s:img:0": ("s:img2:0", 2)}
    meta = json_.loads(pq.read_schema(path).metadata[b"longgrit"])
    assert list(meta["files"]) == ["00000.parquet"] and meta["threshold"] == QualityConfig().duplicate_threshold


def test_a_stage_that_shows_the_whole_image_resizes_it_once_for_all_its_regions(cfg, monkeypatch):
    """The context stage sends every region the whole image fitted to crops.max_side: one resize per image
    and stage, the same fitted image in every region's request."""
    import annotate.stages.base as base
    from annotate.data.records import Validation
    from test_part_stages import images_of

    record, _ = make_record()
    for region in record.regions:
        region.status, region.validation = "pending", Validation(consistent=True, reason="it is a mug")
    image = Image.new("RGB", (256, 256), (200, 30, 30))  # larger than max_side 64: each fit is a resize
    fits = []
    monkeypatch.setattr(base, "fit_within", lambda img, side: fits.append(img.size) or img.resize((side, side)))
    engine = Scripted(*["a mug on a table, left of a laptop"] * 3)
    run(cfg, "context", record, image, engine)
    sent = [images_of(request) for request in engine.requests]
    assert len(sent) == 3 and fits == [(256, 256)]
    assert all(len(images) == 1 and images[0] is sent[0][0] and images[0].size == (64, 64) for images in sent)
    assert [region.context_caption for region in record.regions] == ["a mug on a table, left of a laptop"] * 3
