"""`annotate diff OUT_A OUT_B` without Ray: two small outputs committed through the store, compared per
field by region id, with status transitions, examples, --field, --json and the CLI's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from annotate.cli import app
from annotate.data.records import ImageRecord, RegionRecord, Validation
from annotate.data.store import FINAL, OutputStore, iter_region_fields
from annotate.diff import STAGE_WRITTEN, diff_outputs, shorten
from annotate.stages.chain import STAGE_FIELDS

LONG = "a red kite above the beach, its tail in loops; " * 4


def _region(rid: str, fine: str | None, status: str = "ok", error: str | None = None) -> RegionRecord:
    index = int(rid.rsplit(":", 1)[1])
    return RegionRecord(region_id=rid, region_index=index, phrase="a kite", bbox=[1, 2, 3, 4],
                        object_caption=f"object {rid}", validation=Validation(consistent=True, reason="matches"),
                        context_caption=f"context {rid}", fine_caption=fine, status=status, error=error)


def _commit(out: Path, shard: str, images: dict[str, list[RegionRecord]], damaged: bool = False) -> None:
    store = OutputStore(out)
    writer = store.writer(FINAL, shard)
    for key, regions in images.items():
        writer.add(ImageRecord(image_key=key, shard=shard, width=8, height=8, caption="c",
                               image_bytes=b"\xff\xd8 not read by diff", regions=regions))
    store.commit(writer, FINAL, shard, "config-of-" + out.name,
                 damage={"damage": "truncated", "samples_read": 1} if damaged else None)


def build(root: Path) -> tuple[Path, Path]:
    """A and B: B's merge prompt changed two fine captions, failed one region (ok -> failed, its fine
    caption gone), and found one more region; shard 00002 is only in A, B's shard 00003 is damaged."""
    a, b = root / "a", root / "b"
    _commit(a, "00000", {"k0": [_region("00000:k0:0", "kite, old"), _region("00000:k0:1", "same"),
                                _region("00000:k0:2", "will fail")],
                         "k1": [_region("00000:k1:0", LONG + "old end.")]})
    _commit(a, "00001", {"k2": [_region("00001:k2:0", "unchanged")]})
    _commit(a, "00002", {"k3": [_region("00002:k3:0", "only in a")]})
    _commit(b, "00000", {"k0": [_region("00000:k0:0", "kite, new"), _region("00000:k0:1", "same"),
                                _region("00000:k0:2", None, "failed", "merge: length: output cut by max_tokens")],
                         "k1": [_region("00000:k1:0", LONG + "new end.")]})
    _commit(b, "00001", {"k2": [_region("00001:k2:0", "unchanged"), _region("00001:k2:1", "only in b")]})
    _commit(b, "00003", {"k4": [_region("00003:k4:0", "damaged")]}, damaged=True)
    return a, b


@pytest.fixture(scope="module")
def outs(tmp_path_factory) -> tuple[Path, Path]:
    return build(tmp_path_factory.mktemp("diff"))


def test_counts_transitions_and_examples(outs):
    d = diff_outputs(*outs)
    assert tuple(d.fields) == STAGE_WRITTEN == tuple(dict.fromkeys(name for _, name in STAGE_FIELDS))
    assert (d.matched, d.only_in_a, d.only_in_b) == (5, 1, 1)
    assert d.region_examples == {"a": ["00002:k3:0"], "b": ["00001:k2:1"]}
    assert d.shards == {"a": ["00000", "00001", "00002"], "b": ["00000", "00001"], "skipped_a": [], "skipped_b": ["00003"]}
    fine = d.fields["fine_caption"]
    assert (fine.same, fine.changed, fine.only_a, fine.only_b, fine.empty) == (2, 2, 1, 0, 0)
    assert fine.examples == [
        {"region_id": "00000:k0:0", "kind": "changed", "a": "kite, old", "b": "kite, new"},
        {"region_id": "00000:k0:2", "kind": "only_a", "a": "will fail", "b": None},
        {"region_id": "00000:k1:0", "kind": "changed", "a": LONG + "old end.", "b": LONG + "new end."},
    ]
    for name in ("object_caption", "validation", "context_caption"):  # a dict (validation) compares as canonical JSON
        f = d.fields[name]
        assert (f.same, f.changed, f.only_a, f.only_b, f.examples) == (5, 0, 0, 0, [])
    assert d.fields["summary"].empty == d.fields["negatives"].empty == 5
    assert dict(d.transitions) == {("ok", "ok"): 4, ("ok", "failed"): 1}
    assert d.status_examples == [{"region_id": "00000:k0:2", "a": "ok", "error_a": None, "b": "failed",
                                  "error_b": "merge: length: output cut by max_tokens"}]


def test_examples_limit_and_field_filter(outs):
    d = diff_outputs(*outs, fields=["fine_caption", "error"], examples=1)
    assert list(d.fields) == ["fine_caption", "error"]
    assert [e["region_id"] for e in d.fields["fine_caption"].examples] == ["00000:k0:0"]
    err = d.fields["error"]
    assert (err.same, err.only_b, err.empty) == (0, 1, 4)
    with pytest.raises(ValueError, match="no region field nope, status"):
        diff_outputs(*outs, fields=["nope", "status"])


def test_shorten_shows_where_long_texts_differ():
    a, b = shorten(LONG + "old end.", LONG + "new end.", width=30)
    assert a.startswith("…") and a.endswith("old end.") and b.endswith("new end.") and len(a) <= 31
    assert shorten("short", None) == ("short", "—")
    assert shorten({"b": 1, "a": True}, {"a": True, "b": 2}) == ('{"a":true,"b":1}', '{"a":true,"b":2}')


def test_region_fields_reads_only_what_is_asked(outs):
    path = OutputStore(outs[0]).output_path(FINAL, "00000")
    regions = list(iter_region_fields(path, ["region_id", "validation"]))
    assert regions[0] == {"region_id": "00000:k0:0", "validation": {"consistent": True, "reason": "matches"}}
    assert len(regions) == 4
    with pytest.raises(KeyError):
        list(iter_region_fields(path, ["image"]))


def test_cli_prints_tables_and_writes_json(outs, tmp_path):
    out_json = tmp_path / "diff.json"
    result = CliRunner().invoke(app, ["diff", str(outs[0]), str(outs[1]), "--json", str(out_json)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "regions: 5 in both, 1 only in A, 1 only in B" in result.output
    assert "fine_caption: 2 changed, 1 only A, 0 only B" in result.output
    assert "kite, old" in result.output and "kite, new" in result.output
    assert "B: not finished, left out: 00003" in result.output
    saved = json.loads(out_json.read_text())
    assert saved == json.loads(json.dumps(diff_outputs(*outs).to_json()))
    assert saved["fields"]["fine_caption"]["changed"] == 2
    assert saved["status_transitions"] == [{"a": "ok", "b": "failed", "regions": 1}, {"a": "ok", "b": "ok", "regions": 4}]

    only = CliRunner().invoke(app, ["diff", str(outs[0]), str(outs[1]), "--field", "context_caption",
                                    "--field", "fine_caption", "--examples", "0"], env={"COLUMNS": "200"})
    assert only.exit_code == 0, only.output
    assert "fine_caption" in only.output and "object_caption" not in only.output and "kite, old" not in only.output
    bad = CliRunner().invoke(app, ["diff", str(outs[0]), str(outs[1]), "--field", "nope"])
    assert bad.exit_code == 2 and "no region field nope" in bad.output


def test_cli_refuses_an_output_without_a_committed_dataset(outs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["diff", str(outs[0]), str(empty)], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert str(empty) in result.output and "annotate run" in result.output
    _commit(tmp_path / "dmg", "00000", {"k": [_region("00000:k:0", "x")]}, damaged=True)
    result = CliRunner().invoke(app, ["diff", str(tmp_path / "dmg"), str(outs[1])], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "not finished: 1" in result.output
