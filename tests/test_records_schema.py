"""The file schema derived from the pydantic records (data/records.features) is the schema the
files were written with, and the dataset card describes every region field from the same models."""

from __future__ import annotations

import pytest

from annotate.data.records import SCHEMA_VERSION, Provenance, RegionRecord, arrow_schema, features
from annotate.data.writer import region_field_descriptions, write_dataset_card


STAGES_1_2 = ("object", "validate", "context", "merge", "summarize", "ground", "negatives", "negatives_text",
              "negatives_visual")


def schema_1_2_as_written_by_hand():
    """`features()` of schema 1.2 as it was written by hand before it was derived (kept verbatim):
    the stored files must not change by a byte of schema."""
    import datasets

    stage_provenance = {
        "model": datasets.Value("string"),
        "prompt_version": datasets.Value("string"),
        "prompt_tokens": datasets.Value("int32"),
        "completion_tokens": datasets.Value("int32"),
    }
    span = {"start": datasets.Value("int32"), "end": datasets.Value("int32"), "text": datasets.Value("string")}
    verdict = {"holds": datasets.Value("bool"), "reason": datasets.Value("string")}
    negative = {"text": datasets.Value("string"), "edit_type": datasets.Value("string"), "start": datasets.Value("int32"),
                "end": datasets.Value("int32"), "replacement": datasets.Value("string"), "contradiction": verdict,
                "visual": verdict}
    region = {
        "region_id": datasets.Value("string"),
        "region_index": datasets.Value("int32"),
        "phrase": datasets.Value("string"),
        "bbox": datasets.List(datasets.Value("float32"), length=4),
        "score": datasets.Value("float32"),
        "mask": {"size": datasets.List(datasets.Value("int32"), length=2), "counts": datasets.Value("string")},
        "mask_source": datasets.Value("string"),
        "object_caption": datasets.Value("string"),
        "validation": {"consistent": datasets.Value("bool"), "reason": datasets.Value("string")},
        "context_caption": datasets.Value("string"),
        "fine_caption": datasets.Value("string"),
        "summary": datasets.Value("string"),
        "summary_tokens": datasets.Value("int32"),
        "sentences": datasets.List(span),
        "phrases": datasets.List({**span, "target": datasets.Value("string"), "region_id": datasets.Value("string")}),
        "negative_candidates": datasets.List(negative),
        "negative_text_verdicts": datasets.List(verdict),
        "negatives": datasets.List(negative),
        "quality": {
            "nouns": datasets.Value("int32"),
            "unsupported_noun_share": datasets.Value("float32"),
            "words": datasets.Value("int32"),
            "flags": datasets.List(datasets.Value("string")),
        },
        "status": datasets.Value("string"),
        "error": datasets.Value("string"),
        "provenance": {stage: dict(stage_provenance) for stage in STAGES_1_2},
    }
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_key": datasets.Value("string"),
            "shard": datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "caption": datasets.Value("string"),
            "url": datasets.Value("string"),
            "error": datasets.Value("string"),
            "regions": datasets.List(region),
            "schema_version": datasets.Value("string"),
        }
    )


def schema_1_3():
    """1.2 plus what 1.3 added: each stage's provenance counts its attempts and keeps its lineage key."""
    import datasets

    schema = schema_1_2_as_written_by_hand()
    region = schema["regions"].feature
    for entry in region["provenance"].values():
        entry["attempts"] = datasets.Value("int32")
        entry["lineage"] = datasets.Value("string")
    string, span = datasets.Value("string"), {"start": datasets.Value("int32"), "end": datasets.Value("int32"),
                                              "text": datasets.Value("string")}
    part = {"part_id": string, "name": string, "visibility": string, "reason": string,
            "bbox": datasets.List(datasets.Value("float32"), length=4),
            "mask": {"size": datasets.List(datasets.Value("int32"), length=2), "counts": string},
            "mask_source": string, "containment": datasets.Value("float32"), "area": datasets.Value("int32"),
            "kept": datasets.Value("bool"), "reject_reason": string, "short_caption": string, "long_caption": string,
            "parent_spans": datasets.List(span), "verdict": {"holds": datasets.Value("bool"), "reason": string}}
    names = list(region)
    at = names.index("quality")
    reordered = {name: region[name] for name in names[:at]} | {"parts": datasets.List(part)} | {
        name: region[name] for name in names[at:]}
    schema["regions"] = datasets.List(reordered)
    return datasets.Features(schema)


def schema_1_4():
    """1.3 plus the provenance of the part stages (parts, part_describe, part_verify)."""
    import datasets

    schema = schema_1_3()
    region = schema["regions"].feature
    entry = dict(region["provenance"]["object"])
    region["provenance"].update({stage: dict(entry) for stage in ("parts", "part_describe", "part_verify")})
    schema["regions"] = datasets.List(region)
    return datasets.Features(schema)


def test_derived_features_are_the_hand_written_ones():
    assert SCHEMA_VERSION == "1.4"
    assert Provenance.stage_names() == (*STAGES_1_2, "parts", "part_describe", "part_verify")
    assert features() == schema_1_4()
    assert arrow_schema() == schema_1_4().arrow_schema


def test_an_unstorable_field_is_refused():
    from typing import Literal

    from annotate.data.records import _feature

    with pytest.raises(TypeError, match="only string Literals"):
        _feature(Literal[1, 2])
    with pytest.raises(TypeError, match="no stored form"):
        _feature(complex)


def test_the_card_describes_every_region_field(tmp_path):
    described = region_field_descriptions()
    assert list(described) == list(RegionRecord.model_fields)
    assert all(text.strip() for text in described.values()), [k for k, v in described.items() if not v.strip()]
    write_dataset_card(tmp_path, "data/*.parquet")
    card = (tmp_path / "README.md").read_text()
    for name, text in described.items():
        assert f"| `{name}` | {text} |" in card


def test_outside_readers_ask_the_store_for_columns_it_has(tmp_path):
    """`read_columns` is how code outside the store reads a few fields: names are checked against the
    schema (a typo is an error, not an empty column), and only the asked columns are read."""
    from annotate.data.records import ImageRecord, stored_columns
    from annotate.data.store import read_columns, read_region_lists
    from annotate.data.writer import write_parquet_atomic

    assert stored_columns() == tuple(arrow_schema().names)
    record = ImageRecord(image_key="k", shard="00000", width=4, height=4, caption="a dog",
                         regions=[RegionRecord(region_id="00000:k:0", region_index=0, phrase="dog", bbox=[0, 0, 2, 2])])
    path = tmp_path / "00000.parquet"
    write_parquet_atomic([record], path)
    assert read_columns(path, ["image_key", "width"]) == [{"image_key": "k", "width": 4}]
    assert [[r["region_id"] for r in rs] for rs in read_region_lists(path)] == [["00000:k:0"]]
    with pytest.raises(KeyError, match="'fine_caption'.* are not columns of the stored schema"):
        read_columns(path, ["fine_caption"])  # a region field, not a column
