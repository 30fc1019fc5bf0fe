"""`annotate status OUT`: per-shard and per-stage counts from the manifest, without Ray."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from annotate.data.store import DAMAGED, OutputStore, damage_of
from annotate.stages.chain import STORED_OUTPUTS


def status_report(output_dir: str | Path) -> dict:
    """{output: {shard: manifest entry}} plus totals per output; raises when there is no run here."""
    store = OutputStore(Path(output_dir))
    if not store.manifest_path.exists():
        raise FileNotFoundError(f"{store.root} holds no run (no manifest.jsonl); is it the --output of `annotate run`?")
    report: dict = {"outputs": {}, "totals": {}, "damaged": []}
    for output in STORED_OUTPUTS:
        entries = store.latest(output)
        if not entries:
            continue
        report["damaged"] += [{"output": output, "shard": shard, **damage_of(e), "at": e.get("finished_at", "")}
                              for shard, e in sorted(entries.items()) if e.get("state") == DAMAGED]
        report["outputs"][output] = entries
        totals = {k: sum(int(e.get(k, 0)) for e in entries.values())
                  for k in ("images", "regions", "ok", "rejected", "failed", "pending", "prompt_tokens", "completion_tokens")}
        judged = totals["ok"] + totals["rejected"]
        totals["rejection_rate"] = round(totals["rejected"] / judged, 4) if judged else None
        totals["tokens_per_region"] = (
            round((totals["prompt_tokens"] + totals["completion_tokens"]) / totals["regions"], 1) if totals["regions"] else None
        )
        report["totals"][output] = totals
    return report


def print_status(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    for output, entries in report["outputs"].items():
        table = Table(title=f"{output} ({len(entries)} shard(s))")
        for col in ("shard", "images", "regions", "ok", "rejected", "failed", "pending", "tokens", "finished"):
            table.add_column(col, justify="right" if col not in ("shard", "finished") else "left")
        for shard, e in sorted(entries.items()):
            table.add_row(shard, *(str(e.get(k, 0)) for k in ("images", "regions", "ok", "rejected", "failed", "pending")),
                          str(e.get("prompt_tokens", 0) + e.get("completion_tokens", 0)),
                          "DAMAGED" if e.get("state") == DAMAGED else e.get("finished_at", ""),
                          style="red" if e.get("state") == DAMAGED else None)
        t = report["totals"][output]
        table.add_row("total", *(str(t[k]) for k in ("images", "regions", "ok", "rejected", "failed", "pending")),
                      str(t["prompt_tokens"] + t["completion_tokens"]), "", style="bold")
        console.print(table)
        console.print(f"  rejection rate: {t['rejection_rate']}   tokens per region: {t['tokens_per_region']}")
    if report["damaged"]:
        table = Table(title=f"DAMAGED shards ({len(report['damaged'])}): read only in part, not finished; "
                            "replace the input files and rerun", title_style="bold red")
        for col in ("output", "shard", "samples read", "reason", "at"):
            table.add_column(col, justify="right" if col == "samples read" else "left")
        for d in report["damaged"]:
            table.add_row(d["output"], d["shard"], str(d["samples_read"]), d["damage"], d["at"], style="red")
        console.print(table)
