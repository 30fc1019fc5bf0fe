"""`annotate plan`'s output: the per-stage table, busy and billed GPU-hours with the wall time, the
check against a run, and the balanced `models:` snippet; every assumption printed with them."""

from __future__ import annotations

from annotate.plan.core import Plan


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)  # a pipe or a log: do not squeeze the table


def print_plan(plan: Plan, console=None, title: str = "") -> None:
    from rich.table import Table

    console = console or _console()
    table = Table(title=title or f"GPU-hours for {plan.regions:,} regions on {plan.gpu}")
    cols = ("stage", "model", "replicas x GPUs", "regions", "prompt tok", "of which image", "ViT TFLOP",
            "completion tok", "prefill tok/s", "decode tok/s", "busy GPU-h", "tokens from")
    for col in cols:
        table.add_column(col, justify="left" if col in ("stage", "model", "tokens from") else "right")
    for s in plan.stages:
        table.add_row(s.stage, s.model, f"{s.replicas} x {s.gpus_per_replica}", f"{s.regions:,.0f} ({s.reach:.0%})",
                      # a run's prompts are measured whole: the processors' image share is not theirs
                      f"{s.prompt_tokens:,.0f}", "-" if s.tokens_from.startswith("run") else f"{s.image_tokens:,.0f}",
                      f"{s.vit_tflops:,.1f}",
                      f"{s.completion_tokens:,.0f}", f"{s.prefill_tok_s:,.0f}", f"{s.decode_tok_s:,.0f}",
                      f"{s.gpu_hours:,.1f}", s.tokens_from)
    console.print(table)
    walls, util = plan.wall_hours(), plan.utilisation()
    console.print("wall hours per deployment: " + ", ".join(
        f"{m} {h:,.1f} h ({util[m]:.0%} busy)" for m, h in walls.items()))
    console.print(f"[bold]busy GPU-hours {plan.total_gpu_hours:,.0f}; run wall time {plan.run_wall_hours:,.1f} h "
                  f"(the slowest deployment); billed GPU-hours {plan.billed_gpu_hours:,.0f} = {plan.gpus_held} GPUs "
                  f"held x {plan.run_wall_hours:,.1f} h[/bold]")
    budgets = [s.budget for s in plan.stages if s.budget]
    if budgets:
        console.print("token budgets, counted by the run's models at load time (worst-case prompt + max_tokens "
                      "vs max_model_len): " + "; ".join(
                          f"{b['stage']} {b['prompt_tokens']:,} + {b['max_tokens']:,} vs {b['max_model_len'] or '?'}"
                          for b in budgets))


def print_assumptions(plan: Plan, console=None) -> None:
    console = console or _console()
    console.print("[bold]Assumptions[/bold]")
    console.print(f"  - region shapes: {plan.shapes_from}")
    for a in plan.assumptions:
        console.print(f"  - {a}")


def run_plan(config: str, regions: int, gpu: str | None = None, from_run: str | None = None,
             throughput: str | None = None, sample_shards: int | None = None, input_dir: str | None = None,
             cluster_gpus: int | None = None) -> Plan:
    """What `annotate plan` does; returns the plan of the pipeline file's layout (balanced when --gpus)."""
    from annotate.config import load_config
    from annotate.plan.balance import balance, cheapest, min_gpus, snippet, wall
    from annotate.plan.check import compare_with_run, measure_run, within
    from annotate.plan.core import load_throughput, make_plan, model_row
    from annotate.plan.shapes import shapes_from_run, shapes_from_shards

    cfg = load_config(config)
    table = load_throughput(throughput)
    if sample_shards:
        if not input_dir:
            raise ValueError("--sample-shards needs --input (the shard folder)")
        shapes = shapes_from_shards(input_dir, sample_shards, cfg.data)
    elif from_run:
        shapes = shapes_from_run(from_run, cfg.data.crops)
    else:
        shapes = None
    measured = measure_run(from_run) if from_run else None
    console = _console()
    plan = make_plan(cfg, regions, gpu, table, measured, shapes)
    print_plan(plan, console, f"GPU-hours for {regions:,} regions on {plan.gpu}, the pipeline file's replicas")
    if from_run:
        rows = compare_with_run(cfg, from_run, table, measured)
        console.print("predicted (processors + table) vs recorded tokens per region: " + "; ".join(
            f"{r['stage']} prompt {r['predicted_prompt']:,.0f}/{r['recorded_prompt']:,.0f} ({r['prompt_error']:+.0%}), "
            f"completion {r['predicted_completion']:,.0f}/{r['recorded_completion']:,.0f} ({r['completion_error']:+.0%})"
            for r in rows))
        misses = within(rows)
        console.print("off by more than 10%: " + "; ".join(misses) if misses else "every stage within 10%")
    if cluster_gpus:
        rows = {s.model: model_row(table, s.model, cfg.models[s.model])[1] for s in plan.stages}
        mins = {m: min_gpus(row, table["gpus"][plan.gpu], table["memory_rule"]) for m, row in rows.items()}
        busy = plan.busy_hours()
        layout = balance(busy, mins, cluster_gpus)
        plan = make_plan(cfg, regions, plan.gpu, table, measured, shapes, cluster_gpus=cluster_gpus, layout=layout)
        print_plan(plan, console, f"Balanced on {cluster_gpus} x {plan.gpu}")
        used = sum(r * g for r, g in layout.values())
        if used < cluster_gpus:
            console.print(f"{cluster_gpus - used} of the {cluster_gpus} GPUs fit no further replica and stay idle")
        small = cheapest(busy, mins, cluster_gpus)
        small_used = sum(r * g for r, g in small.values())
        if small_used * wall(small, busy) < plan.billed_gpu_hours - 0.5:
            console.print(f"a cluster of {small_used} GPUs would bill less, {small_used * wall(small, busy):,.0f} "
                          f"GPU-hours over {wall(small, busy):,.1f} h: "
                          + ", ".join(f"{m} {r} x {g}" for m, (r, g) in small.items()))
        engines = {m: row.get("engine", "") for m, row in rows.items()}
        console.print(f"Paste into the pipeline file (GPUs per replica: fewest powers of two whose memory holds the "
                      f"bf16 weights in {table['memory_rule']['weights_fraction']:.0%} of it):")
        console.print(snippet(config, layout, plan.gpu, plan.utilisation(), engines), markup=False, highlight=False)
    print_assumptions(plan, console)
    return plan
