"""Whether the cluster can hold a run's workers beside the model replicas, asked before a shard is read.

Ray Data starts each stage's actor pool and the shard-reading tasks with the CPUs they ask for, and
when the cluster has not enough free it waits for them without a word: the run sits at 0% for as
long as anyone lets it (seen: the real-text chain's 9 chain workers and its reader beside three model
deployments, one of them left by an earlier run, on a 4-CPU local cluster; the read task stayed
PENDING_NODE_ASSIGNMENT until the test's timeout). So the driver adds up what the run's own actors
ask for, and compares it with the CPUs left free once its models are up.

A local cluster cannot grow, so a shortfall there refuses the run with what to change. A cluster
joined by address may autoscale (Ray adds a node for a pending actor), so there it is a warning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from annotate.config import PipelineConfig


class NotEnoughCpus(RuntimeError):
    """The run's workers do not fit beside the model replicas on a cluster that cannot grow."""


@dataclass(frozen=True)
class CpuNeed:
    """Logical CPUs the run's own actors ask Ray for: chain workers, SAM's worker, one reading task."""

    workers: int
    worker_cpus: float
    reader_cpus: float

    @property
    def total(self) -> float:
        return self.workers * self.worker_cpus + self.reader_cpus

    def describe(self) -> str:
        return (f"{self.total:g} CPUs ({self.workers} chain and segment workers x {self.worker_cpus:g} "
                f"(run.chain_worker_cpus) + one shard reader x {self.reader_cpus:g} (run.reader_cpus))")


def cpu_need(cfg: PipelineConfig, chain_workers: int, segment_worker: bool) -> CpuNeed:
    return CpuNeed(chain_workers + int(segment_worker), cfg.run.chain_worker_cpus, cfg.run.reader_cpus)


def shortfall_message(need: CpuNeed, free: float, total: float, others: list[str], local: bool) -> str:
    """What is missing and what to change, in the order a user would try it."""
    lines = [f"this run's workers need {need.describe()}, and the cluster has {free:g} of its {total:g} "
             f"CPUs free once the run's models are up: Ray would wait for the rest without end."]
    if others:
        lines.append("Model deployments this run does not use hold CPUs: " + ", ".join(others)
                     + " (`annotate serve --config <their pipeline file> --stop` frees them).")
    fixes = "lower run.chain_worker_cpus or run.chain_workers_per_replica"
    lines.append(f"To go on: {fixes}, " + ("or raise run.num_cpus (the local cluster's logical CPUs)."
                                           if local else "or add nodes."))
    return "\n".join(lines)


def check_cpus(need: CpuNeed, local: bool, others: list[str], warn: Callable[[str], None],
               resources: Callable[[], tuple[float, float]], settle_s: float = 30.0,
               poll_s: float = 1.0) -> None:
    """Refuse (local cluster) or warn (joined cluster) when `need` exceeds the free CPUs.

    `resources` gives (free, total) CPUs. CPUs of a previous run's actors come back a moment after
    it ends, so a shortfall is believed only after it has lasted `settle_s`."""
    deadline = time.monotonic() + settle_s
    while True:
        free, total = resources()
        if free + 1e-9 >= need.total:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    message = shortfall_message(need, free, total, others, local)
    if local:
        raise NotEnoughCpus(message)
    warn(f"warning: {message}\n(an autoscaling cluster adds nodes for the waiting workers)")


def ray_cpus() -> tuple[float, float]:
    """(free, total) logical CPUs of the connected Ray cluster."""
    import ray

    return ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
