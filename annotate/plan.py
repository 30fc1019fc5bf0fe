"""`annotate plan`: GPU-hours per stage for N regions, before anything is run.

    GPU-hours(stage) = regions reaching the stage
                       x (prompt tokens / prefill tok/s + completion tokens / decode tok/s)
                       x GPUs per replica / 3600

* tokens per region: measured from a finished run's provenance (`--from-run OUT`: the mean over the
  regions that reached the stage, retries included) or the defaults in the throughput file;
* regions reaching a stage: the fraction seen in that run (a region reaches a stage when the stage
  spent tokens on it) or the throughput file's defaults (rejection rate assumed there);
* tok/s per replica, per model and GPU type: the throughput file (pipelines/throughput.yaml), whose
  numbers are estimates derived from datasheets, with the arithmetic written next to them;
* GPUs per replica: the pipeline file (`resources.num_gpus`, else tensor x pipeline parallel);
* with `--from-run`, each stage's worst-case prompt as the run's models counted it at load time
  (stages/budget.py, kept in OUT/runs/*.json) is shown against the context, and stands in for the
  mean prompt of a stage that no region of that run reached.

Everything the estimate rests on is printed with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from annotate.config import ModelConfig, PipelineConfig
from annotate.data.store import OutputStore
from annotate.stages.chain import STAGE_ORDER

DEFAULT_THROUGHPUT = Path(__file__).resolve().parent.parent / "pipelines" / "throughput.yaml"


@dataclass
class StagePlan:
    stage: str
    model: str
    gpu: str
    gpus_per_replica: int
    replicas: int
    regions: float
    reach: float
    prompt_tokens: float
    completion_tokens: float
    prefill_tok_s: float
    decode_tok_s: float
    gpu_hours: float
    tokens_from: str
    budget: dict | None = None  # the load-time token budget of the measured run (worst-case prompt)


@dataclass
class Plan:
    regions: int
    gpu: str
    stages: list[StagePlan]
    assumptions: list[str] = field(default_factory=list)

    @property
    def total_gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    def wall_hours(self) -> dict[str, float]:
        """Per model deployment: its GPU-hours over all the GPUs it holds (its stages share them)."""
        per_model: dict[str, float] = {}
        gpus: dict[str, int] = {}
        for s in self.stages:
            per_model[s.model] = per_model.get(s.model, 0.0) + s.gpu_hours
            gpus[s.model] = s.gpus_per_replica * s.replicas
        return {m: h / gpus[m] for m, h in per_model.items()}


def load_throughput(path: str | Path | None = None) -> dict[str, Any]:
    path = Path(path) if path else DEFAULT_THROUGHPUT
    table = yaml.safe_load(path.read_text()) or {}
    for key in ("gpus", "models", "default_tokens", "default_reach"):
        if key not in table:
            raise ValueError(f"throughput file {path} lacks `{key}`")
    return table


def measure_run(output_dir: str | Path) -> dict[str, Any]:
    """Tokens per region and reach per stage from a run's final output (OUT/data/*.parquet)."""
    import pyarrow.parquet as pq

    files = OutputStore(output_dir).dataset_files()
    if not files:
        raise FileNotFoundError(f"{output_dir} holds no data/*.parquet; is it the --output of a finished `annotate run`?")
    reached = {s: 0 for s in STAGE_ORDER}
    prompt = {s: 0 for s in STAGE_ORDER}
    completion = {s: 0 for s in STAGE_ORDER}
    models: dict[str, set[str]] = {s: set() for s in STAGE_ORDER}
    status = {"ok": 0, "rejected": 0, "failed": 0, "pending": 0}
    for f in files:
        for regions in pq.read_table(f, columns=["regions"]).column("regions").to_pylist():
            for r in regions or []:
                status[r["status"]] = status.get(r["status"], 0) + 1
                for s in STAGE_ORDER:
                    p = (r.get("provenance") or {}).get(s) or {}
                    if p.get("prompt_tokens"):
                        reached[s] += 1
                        prompt[s] += p["prompt_tokens"]
                        completion[s] += p.get("completion_tokens") or 0
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


def gpus_per_replica(model: ModelConfig) -> int:
    if model.resources.num_gpus:
        return max(1, round(model.resources.num_gpus))
    return max(1, model.vllm.tensor_parallel_size * model.vllm.pipeline_parallel_size)


def _model_row(table: dict, key: str, model: ModelConfig) -> tuple[str, dict]:
    for name in (model.paper_model, key, model.path):
        if name and name in table["models"]:
            return name, table["models"][name]
    raise KeyError(f"model {key!r} ({model.paper_model or model.path}) is not in the throughput table; "
                   f"add a row for it (known: {', '.join(table['models'])})")


def make_plan(cfg: PipelineConfig, regions: int, gpu: str | None = None, throughput: dict | None = None,
              measured: dict | None = None) -> Plan:
    table = throughput or load_throughput()
    gpu = gpu or next((m.resources.accelerator_type for m in cfg.models.values() if m.resources.accelerator_type), "H100")
    if gpu not in table["gpus"]:
        raise ValueError(f"unknown GPU type {gpu!r}; the throughput table knows {', '.join(table['gpus'])}")
    plan = Plan(regions=regions, gpu=gpu, stages=[])
    for stage in STAGE_ORDER:
        if stage not in cfg.stages:
            continue
        key = cfg.stages[stage].model
        model = cfg.models[key]
        row_name, row = _model_row(table, key, model)
        if gpu not in row:
            raise ValueError(f"the throughput table has no {gpu} figures for {row_name}")
        budget = (measured or {}).get("budgets", {}).get(stage)
        if measured is not None:
            m = measured["stages"][stage]
            reach, pt, ct, src = m["reach"], m["prompt_tokens"], m["completion_tokens"], "run"
            if not m["regions"] and budget:  # no region reached it: the load-time worst case, an upper bound
                pt, src = float(budget["prompt_tokens"]), "run (prompt: load-time worst case)"
        else:
            d = table["default_tokens"][stage]
            reach, pt, ct, src = float(table["default_reach"][stage]), float(d["prompt"]), float(d["completion"]), "default"
        n = regions * reach
        prefill, decode = float(row[gpu]["prefill_tok_s"]), float(row[gpu]["decode_tok_s"])
        gpr = gpus_per_replica(model)
        seconds_per_replica = n * (pt / prefill + ct / decode)
        plan.stages.append(StagePlan(stage, key, gpu, gpr, model.resources.replicas, n, reach, pt, ct, prefill, decode,
                                     seconds_per_replica * gpr / 3600, src, budget))
    g = table["gpus"][gpu]
    plan.assumptions = [
        f"throughput per replica: {DEFAULT_THROUGHPUT.name if throughput is None else 'the given table'}; ESTIMATES derived "
        f"from {gpu} datasheet peaks ({g['peak_bf16_tflops']} TFLOPS bf16, {g['hbm_tb_s']} TB/s) with assumed MFU/MBU, "
        "not measured on this project; replace them with measured figures when you have them",
        "prefill and decode time are added (vLLM overlaps them) and prefix caching is ignored: the estimate errs high",
        "GPU-hours count every GPU of a replica for the replica's whole busy time; idle time between stages, model "
        "load and retries beyond what the run measured are not included",
    ]
    if measured is not None:
        rr = measured["rejection_rate"]
        plan.assumptions.append(
            f"tokens per region and the fraction reaching each stage are measured from {measured['path']} "
            f"({measured['regions']} regions; rejection rate {rr if rr is None else f'{rr:.1%}'}); retries are included")
        used = {s: set(m["models"]) for s, m in measured["stages"].items()}
        configured = {s: {cfg.models[cfg.stages[s].model].paper_model or cfg.models[cfg.stages[s].model].path}
                      for s in cfg.stages}
        differs = [s for s in configured if used.get(s) and used[s] != configured[s]]
        if differs:
            plan.assumptions.append(
                "WARNING: the run used other models than this pipeline file for "
                + ", ".join(f"{s} ({', '.join(sorted(used[s]))})" for s in differs)
                + ": their token counts (image tokens above all) and output lengths need not carry over")
    else:
        plan.assumptions.append("tokens per region and the fraction reaching each stage are the throughput file's "
                                "defaults (estimates; rejection rate assumed 15%); pass --from-run OUT to measure them")
    return plan


def print_plan(plan: Plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a log file: do not squeeze the table into 80 columns
            console = Console(width=160)
    table = Table(title=f"GPU-hours for {plan.regions:,} regions on {plan.gpu}")
    for col in ("stage", "model", "GPUs/replica", "regions", "prompt tok", "completion tok", "prefill tok/s",
                "decode tok/s", "GPU-hours", "tokens from"):
        table.add_column(col, justify="left" if col in ("stage", "model", "tokens from") else "right")
    for s in plan.stages:
        table.add_row(s.stage, s.model, str(s.gpus_per_replica), f"{s.regions:,.0f} ({s.reach:.0%})",
                      f"{s.prompt_tokens:,.0f}", f"{s.completion_tokens:,.0f}", f"{s.prefill_tok_s:,.0f}",
                      f"{s.decode_tok_s:,.0f}", f"{s.gpu_hours:,.1f}", s.tokens_from)
    table.add_row("total", "", "", "", "", "", "", "", f"{plan.total_gpu_hours:,.1f}", "", style="bold")
    console.print(table)
    walls = plan.wall_hours()
    slowest = max(walls, key=walls.get)
    console.print("wall-clock hours per deployment with the pipeline file's replicas: "
                  + ", ".join(f"{m} {h:,.1f} h" for m, h in walls.items())
                  + f" (streamed, the run takes about as long as the slowest: {slowest})")
    budgets = [s.budget for s in plan.stages if s.budget]
    if budgets:
        console.print("token budgets, counted by the run's models at load time (worst-case prompt + max_tokens "
                      "vs max_model_len): " + "; ".join(
                          f"{b['stage']} {b['prompt_tokens']:,} + {b['max_tokens']:,} vs {b['max_model_len'] or '?'}"
                          for b in budgets))
    console.print("[bold]Assumptions[/bold]")
    for a in plan.assumptions:
        console.print(f"  - {a}")


def run_plan(config: str, regions: int, gpu: str | None = None, from_run: str | None = None,
             throughput: str | None = None) -> Plan:
    from annotate.config import load_config

    cfg = load_config(config)
    plan = make_plan(cfg, regions, gpu, load_throughput(throughput) if throughput else None,
                     measure_run(from_run) if from_run else None)
    print_plan(plan)
    return plan
