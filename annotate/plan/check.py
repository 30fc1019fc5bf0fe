"""A finished run against the plan: what its provenance recorded per stage, and how far the
processor-and-table prediction for the same regions lies from it (`annotate plan --from-run OUT`).

Why: the plan's token counts are only as good as the check against a real run; a stage whose
prediction misses the record by more than `TOLERANCE` says which assumption to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from annotate.config import PipelineConfig
from annotate.data.store import OutputStore, read_region_lists
from annotate.stages.chain import STAGE_ORDER

TOLERANCE = 0.10


def measure_run(output_dir: str | Path) -> dict[str, Any]:
    """Tokens per region and reach per stage from a run's final output (OUT/data/*.parquet)."""

    files = OutputStore(output_dir).dataset_files()
    if not files:
        raise FileNotFoundError(f"{output_dir} holds no data/*.parquet; is it the --output of a finished `annotate run`?")
    reached = {s: 0 for s in STAGE_ORDER}
    prompt = {s: 0 for s in STAGE_ORDER}
    completion = {s: 0 for s in STAGE_ORDER}
    attempts = {s: 0 for s in STAGE_ORDER}  # requests sent (schema 1.3 records them; 0 in older runs)
    models: dict[str, set[str]] = {s: set() for s in STAGE_ORDER}
    status = {"ok": 0, "rejected": 0, "failed": 0, "pending": 0}
    for f in files:
        for regions in read_region_lists(f):
            for r in regions:
                status[r["status"]] = status.get(r["status"], 0) + 1
                for s in STAGE_ORDER:
                    p = (r.get("provenance") or {}).get(s) or {}
                    if p.get("prompt_tokens"):
                        reached[s] += 1
                        prompt[s] += p["prompt_tokens"]
                        completion[s] += p.get("completion_tokens") or 0
                        attempts[s] += p.get("attempts") or 0
                        if p.get("model"):
                            models[s].add(p["model"])
    base = reached[STAGE_ORDER[0]]
    if base == 0:
        raise ValueError(f"no region of {output_dir} reached the {STAGE_ORDER[0]} stage: nothing to measure")
    judged = status["ok"] + status["rejected"]
    return {
        "path": str(output_dir),
        "budgets": load_time_budgets(output_dir),
        "regions": sum(status.values()),
        "status": status,
        "rejection_rate": status["rejected"] / judged if judged else None,
        "stages": {s: {"regions": reached[s], "reach": reached[s] / base,
                       "prompt_tokens": prompt[s] / reached[s] if reached[s] else 0.0,
                       "completion_tokens": completion[s] / reached[s] if reached[s] else 0.0,
                       # per request, what the planner predicts: retries do not blur it (None: not recorded)
                       "prompt_per_request": prompt[s] / attempts[s] if attempts[s] else None,
                       "completion_per_request": completion[s] / attempts[s] if attempts[s] else None,
                       "attempts_per_region": attempts[s] / reached[s] if reached[s] and attempts[s] else None,
                       "models": sorted(models[s])} for s in STAGE_ORDER},
    }


def load_time_budgets(output_dir: str | Path) -> dict[str, dict]:
    """The newest run record's token budgets per stage (empty for runs older than the check)."""
    import json

    for record in sorted(Path(output_dir).glob("runs/*.json"), reverse=True):
        budgets = json.loads(record.read_text()).get("token_budgets")
        if budgets:
            return {b["stage"]: b for b in budgets}
    return {}


def compare_with_run(cfg: PipelineConfig, output_dir: str | Path, throughput: dict | None = None,
                     measured: dict | None = None) -> list[dict[str, Any]]:
    """Per stage of cfg that the run reached: predicted vs recorded mean prompt and completion tokens
    per request (per region, retries included, for runs that did not record attempts), over the run's own regions (their boxes and image sizes), and the relative errors.
    cfg must be the run's pipeline file (its models' processors), or the comparison means little."""
    from annotate.plan.core import load_throughput, predicted_tokens
    from annotate.plan.shapes import shapes_from_run

    table = throughput or load_throughput()
    measured = measured or measure_run(output_dir)
    shapes = shapes_from_run(output_dir, cfg.data.crops)
    rows = []
    for stage in STAGE_ORDER:
        m = measured["stages"][stage]
        if stage not in cfg.stages or not m["regions"]:
            continue
        p = predicted_tokens(cfg, stage, table, shapes)
        # A request's tokens against the prediction for one request, when the run recorded its attempts;
        # else (older runs) the region's, retries included.
        prompt = m.get("prompt_per_request") or m["prompt_tokens"]
        completion = m.get("completion_per_request") or m["completion_tokens"]
        rows.append({"stage": stage, "regions": m["regions"], "per": "request" if m.get("prompt_per_request") else "region",
                     "attempts_per_region": m.get("attempts_per_region"),
                     "predicted_prompt": p["prompt"], "recorded_prompt": prompt,
                     "prompt_error": _rel(p["prompt"], prompt),
                     "predicted_completion": p["completion"], "recorded_completion": completion,
                     "completion_error": _rel(p["completion"], completion)})
    return rows


def within(rows: list[dict[str, Any]], tolerance: float = TOLERANCE) -> list[str]:
    """The misses: one line per stage and quantity off by more than `tolerance` (empty: all hold)."""
    return [f"{r['stage']} {q}: predicted {r['predicted_' + q]:,.0f}, recorded {r['recorded_' + q]:,.0f} "
            f"({r[q + '_error']:+.1%})"
            for r in rows for q in ("prompt", "completion") if abs(r[q + "_error"]) > tolerance]


def _rel(predicted: float, recorded: float) -> float:
    return (predicted - recorded) / recorded if recorded else float("inf")
