"""bench/hostile_shards.py in its small mode, so that it does not rot: one shard per attack class, each
in a fresh process. No time is asserted (speed and memory are the benchmark's figures, not a test's);
only that every row is produced, each shard kept its promise (every sample out once, or damaged),
and a very generous bound on the memory one shard may cost.
"""

from __future__ import annotations

import json
import math


def test_hostile_shards_small(tmp_path, capsys):
    from bench.hostile_shards import CLASSES, main

    res = main(["--small", "--json", str(tmp_path / "hostile.json")])
    out = capsys.readouterr().out
    assert "| class | size |" in out and all(f"| {cls} |" in out for cls in CLASSES)
    rows = {r["cls"]: r for r in res["rows"]}
    assert list(rows) == list(CLASSES) and len(res["rows"]) == len(CLASSES)
    for cls, r in rows.items():
        assert r["state"] in ("finished", "damaged"), (cls, r)
        assert r["ok"] and r["each_once"] and not r["unknown_keys"], (cls, r)
        assert math.isfinite(r["cost_mb"]) and 0 <= r["cost_mb"] < 300, (cls, r["cost_mb"])
        assert r["over_baseline_mb"] < 300, (cls, r["over_baseline_mb"])
    assert rows["baseline"]["samples_out"] == rows["baseline"]["samples_in"] == 4
    assert rows["pax_size"]["state"] == rows["zero_tail"]["state"] == "damaged"
    assert all(rows[c]["state"] == "finished" and rows[c]["samples_out"] == 3
               for c in ("many_boxes", "deep_json", "dense_json", "unread_parts", "huge_caption"))
    assert json.loads((tmp_path / "hostile.json").read_text())["small"] is True
