"""Replicas and GPUs per replica for each model on a given cluster, minimising billed GPU-hours.

Why: a streamed run holds every GPU until its slowest deployment finishes, so the bill is
cluster GPUs x the slowest deployment's wall time; balancing is choosing the layout that makes
the slowest deployment as fast as possible.

The rule for a replica's GPUs: the fewest GPUs, a power of two (tensor parallelism), whose memory
holds the bf16 weights in at most `memory_rule.weights_fraction` of it (the rest, with vLLM's
gpu_memory_utilization 0.9, is the KV cache and activations): 76B/72B/70B -> 4 x 80 GB, 27B -> 1.
As throughput per GPU is the same at any tensor-parallel size in the table's formulas, the fewest
GPUs per replica is never worse and leaves the finest steps to share out. Every replica count per
model that fits is then tried (a few thousand layouts for 24 GPUs): `balance` takes the shortest
wall time (the whole cluster is held), `cheapest` the least GPUs-used x wall time (a smaller
cluster, when the GPUs left over are not billed to the run).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from annotate.config import ENGINE_KINDS


def min_gpus(row: dict, gpu: dict, rule: dict) -> int:
    """Fewest GPUs (a power of two) that hold the model's bf16 weights (2 bytes per parameter)."""
    weights_gb = 2 * float(row.get("weights_b", row["params_b"]))
    need = weights_gb / (float(rule["weights_fraction"]) * float(gpu["memory_gb"]))
    return 2 ** max(0, math.ceil(math.log2(max(need, 1.0))))


def layouts(min_gpr: dict[str, int], cluster_gpus: int, limit: int = 2_000_000):
    """Every replica count per model (each at its fewest GPUs per replica) that fits the cluster."""
    import itertools

    need = sum(min_gpr.values())
    if need > cluster_gpus:
        raise ValueError(f"{cluster_gpus} GPUs cannot hold one replica of each model: "
                         + ", ".join(f"{m} needs {g}" for m, g in min_gpr.items()) + f" ({need} in all)")
    models = list(min_gpr)
    ranges = [range(1, 1 + (cluster_gpus - need + min_gpr[m]) // min_gpr[m]) for m in models]
    if math.prod(len(r) for r in ranges) > limit:
        raise ValueError(f"{cluster_gpus} GPUs give too many layouts to try; plan a smaller cluster")
    for counts in itertools.product(*ranges):
        if sum(c * min_gpr[m] for c, m in zip(counts, models)) <= cluster_gpus:
            yield {m: (c, min_gpr[m]) for c, m in zip(counts, models)}


def wall(layout: dict[str, tuple[int, int]], busy: dict[str, float]) -> float:
    """The run's wall hours: its slowest deployment's busy GPU-hours over the GPUs it holds."""
    return max(busy[m] / (r * g) for m, (r, g) in layout.items())


def balance(busy: dict[str, float], min_gpr: dict[str, int], cluster_gpus: int) -> dict[str, tuple[int, int]]:
    """model -> (replicas, GPUs per replica) with the shortest wall time on the cluster, so the least
    billed when all `cluster_gpus` are held for the run; ties go to the layout using fewer GPUs.
    `busy`: each model's busy GPU-hours (the same at any GPUs per replica, see the module docstring)."""
    return min(layouts(min_gpr, cluster_gpus),
               key=lambda lay: (wall(lay, busy), sum(r * g for r, g in lay.values())))


def cheapest(busy: dict[str, float], min_gpr: dict[str, int], cluster_gpus: int) -> dict[str, tuple[int, int]]:
    """The layout of at most `cluster_gpus` that bills the least when only the GPUs it uses are held."""
    return min(layouts(min_gpr, cluster_gpus),
               key=lambda lay: (sum(r * g for r, g in lay.values()) * wall(lay, busy), wall(lay, busy)))


def snippet(config_path: str, layout: dict[str, tuple[int, int]], gpu: str, utilisation: dict[str, float],
            table_engines: dict[str, str]) -> str:
    """The pipeline file's `models:` block with the balanced resources (and tensor_parallel_size for
    vLLM models), each entry's expected utilisation above it as a comment."""
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    lines = ["models:"]
    for key, entry in (raw.get("models") or {}).items():
        if key not in layout:
            continue
        replicas, gpr = layout[key]
        entry: dict[str, Any] = dict(entry)
        engine = table_engines.get(key)
        if engine and engine != entry.get("engine"):
            lines.append(f"  # {key}: the throughput table assumes engine {engine}; this file says {entry.get('engine')}")
        if (kind := ENGINE_KINDS.get(entry.get("engine"))) and kind.tensor_parallel:
            entry["vllm"] = {**(entry.get("vllm") or {}), "tensor_parallel_size": gpr}
        entry["resources"] = {**(entry.get("resources") or {}), "num_gpus": gpr, "replicas": replicas,
                              "accelerator_type": gpu}
        lines.append(f"  # expected utilisation {utilisation[key]:.0%} ({replicas} x {gpr} GPU)")
        body = yaml.safe_dump({key: entry}, sort_keys=False, default_flow_style=False, width=120)
        lines += ["  " + line for line in body.splitlines()]
    return "\n".join(lines)
