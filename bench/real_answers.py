"""What the answer rules do to a real model's answers: `python -m bench.real_answers`.

Issues 21 and 30's table. `pipelines/real-text.yaml` (SmolLM2-135M-Instruct, real weights, answering
every text stage; the tiny VLM the VLM stages) over the sample shards through `run_pipeline`, as
`annotate run` runs it. Per stage, from the run record's `answers` (stages/batch.py `StageCounts`,
counted per answer read, so a retried region counts each time):

* read: successful model results that reached the stage's rules;
* accepted as given / cleaned: applied unchanged, or after the stripper removed a label, markdown,
  a preamble or restated inputs;
* ruled out, by reason: echo (an 8-word run of the prompt's own text), copied example, no
  description, contradictory verdict; each such answer was asked again once, then its region failed
  with that reason;
* regions failed at the stage (any reason) and rejected (validate: inconsistent), from the stored rows.

Before these rules (commit d2ce3e3 and earlier) every answer read was stored as given, with only
wrapping quotes removed: the "read" column is what would have been stored.

    python -m bench.real_answers [--shards 0,1] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

from annotate.config import load_config
from bench.harness import REPO, SAMPLE_SHARDS

REAL_TEXT = REPO / "pipelines" / "real-text.yaml"
RULED_OUT = ("echo", "copied_example", "no_description", "contradictory_verdict")


def run(shards: list[int], work: Path) -> dict:
    import pyarrow.parquet as pq
    import ray

    from annotate.cluster import ensure_ray
    from annotate.data.store import OutputStore
    from annotate.executor.runner import run_pipeline

    cfg = load_config(REAL_TEXT)
    ensure_ray(cfg.run)
    try:
        summary = run_pipeline(cfg, SAMPLE_SHARDS, work / "out", shards, stage="all")
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    regions = [r for f in OutputStore(work / "out").dataset_files()
               for rs in pq.read_table(f, columns=["regions"]).column("regions").to_pylist() for r in rs]
    failed_at = Counter(r["error"].split(": ", 1)[0] for r in regions if r["status"] == "failed" and r["error"])
    reasons = Counter(": ".join(r["error"].split(": ", 2)[:2]) for r in regions if r["status"] == "failed" and r["error"])
    return {"shards": shards, "regions": len(regions), "statuses": dict(Counter(r["status"] for r in regions)),
            "answers": summary.answers, "failed_at": dict(failed_at), "failure_reasons": dict(reasons),
            "rejected": sum(r["status"] == "rejected" for r in regions),
            "examples": [{k: r[k] for k in ("phrase", "object_caption", "context_caption", "fine_caption", "summary")}
                         for r in regions if r["fine_caption"]][:5]}


def table(figures: dict) -> str:
    rows = ["| stage | read | accepted as given | cleaned | retried | echo | copied example | no description "
            "| contradictory verdict | regions failed here |", "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, c in figures["answers"].items():
        if not c["answers"]:
            continue
        ruled = sum(c[k] for k in RULED_OUT)
        rows.append(f"| {stage} | {c['answers']} | {c['answers'] - ruled - c['cleaned']} | {c['cleaned']} | {c['retried']} | "
                    + " | ".join(str(c[k]) for k in RULED_OUT) + f" | {figures['failed_at'].get(stage, 0)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="0,1", help="sample shard ids")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-real-answers-"))
    figures = run([int(s) for s in args.shards.split(",")], work)
    print(table(figures))
    print(json.dumps({k: v for k, v in figures.items() if k != "answers"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
