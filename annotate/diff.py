"""`annotate diff OUT_A OUT_B`: what changed between two outputs, per region field, so that a user sees
what a prompt (or model) change did before training on it.

Regions are matched by region id. A region id begins with its shard's name (`shard:image_key:index`)
and a shard's regions all lie in that shard's file, so matching is done shard by shard: memory holds
one shard of A (its region ids, statuses and the compared fields as canonical JSON) while B's file of
the same shard streams past it a row group at a time, plus the few examples kept. It grows with the
largest shard, never with the output. Only committed, finished shards count (the store's rule: the
newest manifest line says `finished` and the file still has its checksum, so every file is hashed
once); a shard on one side only counts its regions as only in that side.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from annotate.data.records import RegionRecord
from annotate.data.store import NoDataset, OutputStore, iter_region_fields
from annotate.stages.chain import STAGE_FIELDS

# The fields compared by default: every region field a stage writes, in chain order.
STAGE_WRITTEN: tuple[str, ...] = tuple(dict.fromkeys(name for _, name in STAGE_FIELDS))
# What every region is read with: how it is matched, and its status transition. Any other region field
# may be asked for by --field.
KEYS = ("region_id", "status", "error")
NOT_FIELDS = ("region_id", "status")


@dataclass
class FieldDiff:
    """One field over the regions of both sides: `empty` is None on both (e.g. a stage not run)."""

    same: int = 0
    changed: int = 0
    only_a: int = 0  # set in A, None in B
    only_b: int = 0
    empty: int = 0
    examples: list[dict] = field(default_factory=list)

    @property
    def differing(self) -> int:
        return self.changed + self.only_a + self.only_b


@dataclass
class Diff:
    out_a: str
    out_b: str
    fields: dict[str, FieldDiff]
    matched: int = 0
    only_in_a: int = 0
    only_in_b: int = 0
    transitions: Counter = field(default_factory=Counter)  # (status in A, status in B) -> regions
    status_examples: list[dict] = field(default_factory=list)
    region_examples: dict[str, list[str]] = field(default_factory=lambda: {"a": [], "b": []})
    shards: dict[str, list[str]] = field(default_factory=dict)  # a, b: compared; skipped_a, skipped_b: unfinished

    def to_json(self) -> dict[str, Any]:
        return {
            "out_a": self.out_a, "out_b": self.out_b, "shards": self.shards,
            "regions": {"matched": self.matched, "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
                        "examples_only_in_a": self.region_examples["a"], "examples_only_in_b": self.region_examples["b"]},
            "status_transitions": [{"a": a, "b": b, "regions": n} for (a, b), n in sorted(self.transitions.items())],
            "status_examples": self.status_examples,
            "fields": {name: {"same": f.same, "changed": f.changed, "only_a": f.only_a, "only_b": f.only_b,
                              "empty": f.empty, "examples": f.examples} for name, f in self.fields.items()},
        }


def compared_fields(requested: Sequence[str] | None = None) -> tuple[str, ...]:
    """The stage-written fields, or the `requested` region fields (checked against the schema)."""
    if not requested:
        return STAGE_WRITTEN
    known = [info.alias or name for name, info in RegionRecord.model_fields.items()]
    unknown = [f for f in requested if f not in known or f in NOT_FIELDS]
    if unknown:
        choices = [f for f in known if f not in NOT_FIELDS]
        raise ValueError(f"no region field {', '.join(unknown)}; compare any of {', '.join(choices)}")
    return tuple(dict.fromkeys(requested))


def canonical(value: Any) -> str | None:
    """A value as compared: None stays None; text, numbers, dicts and lists as sorted-key JSON."""
    return None if value is None else json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def diff_outputs(out_a: str | Path, out_b: str | Path, fields: Sequence[str] | None = None,
                 examples: int = 3) -> Diff:
    """Compare two outputs region by region; keep up to `examples` examples per differing field."""
    names = compared_fields(fields)
    files_a, skipped_a = OutputStore(Path(out_a)).finished_dataset()
    files_b, skipped_b = OutputStore(Path(out_b)).finished_dataset()
    diff = Diff(str(out_a), str(out_b), {name: FieldDiff() for name in names},
                shards={"a": sorted(files_a), "b": sorted(files_b), "skipped_a": skipped_a, "skipped_b": skipped_b})
    columns = (*KEYS, *names)
    for shard in sorted(set(files_a) | set(files_b)):
        held: dict[str, tuple] = {}
        if shard in files_a:
            for region in iter_region_fields(files_a[shard], columns):
                held[region["region_id"]] = (region["status"], region["error"], *(canonical(region[n]) for n in names))
        for region in iter_region_fields(files_b[shard], columns) if shard in files_b else ():
            a = held.pop(region["region_id"], None)
            if a is None:
                diff.only_in_b += 1
                _keep(diff.region_examples["b"], region["region_id"], examples)
            else:
                _compare(diff, region, a, names, examples)
        diff.only_in_a += len(held)
        diff.region_examples["a"] += islice(held, max(examples - len(diff.region_examples["a"]), 0))
    return diff


def _compare(diff: Diff, b: dict, a: tuple, names: Sequence[str], examples: int) -> None:
    rid, (status_a, error_a, *values_a) = b["region_id"], a
    diff.matched += 1
    diff.transitions[(status_a, b["status"])] += 1
    if status_a != b["status"] and len(diff.status_examples) < examples:
        diff.status_examples.append({"region_id": rid, "a": status_a, "error_a": error_a,
                                     "b": b["status"], "error_b": b["error"]})
    for name, va in zip(names, values_a):
        f, vb = diff.fields[name], canonical(b[name])
        if va == vb:
            if va is None:
                f.empty += 1
            else:
                f.same += 1
            continue
        kind = "only_a" if vb is None else "only_b" if va is None else "changed"
        setattr(f, kind, getattr(f, kind) + 1)
        if len(f.examples) < examples:
            f.examples.append({"region_id": rid, "kind": kind, "a": _load(va), "b": _load(vb)})


def _keep(bucket: list, item: Any, limit: int) -> None:
    if len(bucket) < limit:
        bucket.append(item)


def _load(value: str | None) -> Any:
    return None if value is None else json.loads(value)


# ---------------------------------------------------------------------------------------- printing
def shorten(a: Any, b: Any, width: int = 60) -> tuple[str, str]:
    """Both values on one line each, cut to `width` around where they first differ (a long caption
    that changed in its last sentence shows that sentence, not its unchanged start)."""
    ta, tb = (("—" if v is None else v if isinstance(v, str) else canonical(v)).replace("\n", " ") for v in (a, b))
    first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    start = max(0, min(first - width // 4, max(len(ta), len(tb)) - width))
    return tuple(("…" if start else "") + t[start:start + width] + ("…" if len(t) > start + width else "")
                 for t in (ta, tb))


def print_diff(diff: Diff, console: Console | None = None, width: int = 60) -> None:
    console = console or Console()
    console.print(f"A: {diff.out_a} ({len(diff.shards['a'])} shard(s))   B: {diff.out_b} ({len(diff.shards['b'])} shard(s))",
                  highlight=False)
    for side in ("a", "b"):
        if diff.shards[f"skipped_{side}"]:
            console.print(f"  {side.upper()}: not finished, left out: {', '.join(diff.shards[f'skipped_{side}'])}",
                          style="yellow", highlight=False)
    console.print(f"regions: {diff.matched} in both, {diff.only_in_a} only in A, {diff.only_in_b} only in B", highlight=False)
    for side in ("a", "b"):
        if diff.region_examples[side]:
            console.print(f"  e.g. only in {side.upper()}: {', '.join(diff.region_examples[side])}", highlight=False)

    table = Table(title="fields (regions in both)")
    for col in ("field", "same", "changed", "only A", "only B", "empty"):
        table.add_column(col, justify="left" if col == "field" else "right")
    for name, f in diff.fields.items():
        table.add_row(name, *(str(n) for n in (f.same, f.changed, f.only_a, f.only_b, f.empty)),
                      style="bold" if f.differing else None)
    console.print(table)

    table = Table(title="status (A → B)")
    for col in ("A", "B", "regions"):
        table.add_column(col, justify="right" if col == "regions" else "left")
    for (a, b), n in sorted(diff.transitions.items()):
        table.add_row(a, b, str(n), style="bold" if a != b else None)
    console.print(table)
    _print_examples(console, "status changes", [
        {"region_id": e["region_id"], "a": _with_error(e["a"], e["error_a"]), "b": _with_error(e["b"], e["error_b"])}
        for e in diff.status_examples], width)
    for name, f in diff.fields.items():
        _print_examples(console, f"{name}: {f.changed} changed, {f.only_a} only A, {f.only_b} only B", f.examples, width)


def _with_error(status: str, error: str | None) -> str:
    return f"{status} ({error})" if error else status


def _print_examples(console: Console, title: str, rows: Iterable[dict], width: int) -> None:
    rows = list(rows)
    if not rows:
        return
    table = Table(title=title, title_justify="left", show_lines=True)
    for col in ("region", "A", "B"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(row["region_id"], *shorten(row["a"], row["b"], width))
    console.print(table)


def write_json(diff: Diff, path: str | Path) -> Path:
    """The whole result (counts and every kept example, values unshortened) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(diff.to_json(), indent=1, ensure_ascii=False) + "\n")
    return path
