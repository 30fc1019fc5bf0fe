"""`annotate plan`: GPU-hours before a run, busy and billed, and the layout that minimises the bill.

shapes.py (the regions' image sizes) -> core.py (tokens from the models' processors, GPU time, busy
and billed totals) -> balance.py (replicas per model on a cluster) and check.py (against a run's
provenance) -> report.py (what the command prints)."""

from annotate.plan.check import compare_with_run, load_time_budgets, measure_run, within
from annotate.plan.core import Plan, StagePlan, gpus_per_replica, load_throughput, make_plan, predicted_tokens
from annotate.plan.report import print_plan, run_plan

__all__ = ["Plan", "StagePlan", "compare_with_run", "gpus_per_replica", "load_throughput", "load_time_budgets",
           "make_plan", "measure_run", "predicted_tokens", "print_plan", "run_plan", "within"]
