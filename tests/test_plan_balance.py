"""Replicas per model on a cluster (annotate/plan/balance.py): the memory rule, the search, the snippet."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from annotate.config import load_config
from annotate.plan.balance import balance, cheapest, min_gpus, snippet, wall
from annotate.plan.core import load_throughput, model_row

REPO = Path(__file__).resolve().parents[1]
LONGGRIT = REPO / "pipelines" / "longgrit.yaml"


def test_min_gpus_from_weights_and_memory():
    table = load_throughput()
    cfg = load_config(LONGGRIT)
    rule = table["memory_rule"]
    h100 = {k: min_gpus(model_row(table, k, m)[1], table["gpus"]["H100"], rule) for k, m in cfg.models.items()}
    assert h100 == {"internvl2_76b": 4, "qwen2_72b": 4, "griffon_g": 1, "deepseek_r1_70b": 4}
    # 152 GB / (0.7 x 141 GB) = 1.54 -> 2 H200s
    assert min_gpus(table["models"]["OpenGVLab/InternVL2-Llama3-76B"], table["gpus"]["H200"], rule) == 2


def test_balance_and_cheapest_by_hand():
    """a: 100 GPU-h, 4 GPUs a replica; b: 10 GPU-h, 1 GPU; 10 GPUs. Layouts that fit: a 1-2, b 1-6 (a=1)
    or 1-2 (a=2). Shortest wall: a 2 x 4 (12.5 h), b's replicas cannot shorten it: b 1 (fewest GPUs).
    Least billed when only used GPUs are held: 9 GPUs x 12.5 h = 112.5 < 5 x 25 = 125."""
    busy, mins = {"a": 100.0, "b": 10.0}, {"a": 4, "b": 1}
    assert balance(busy, mins, 10) == {"a": (2, 4), "b": (1, 1)}
    assert wall({"a": (2, 4), "b": (1, 1)}, busy) == 12.5
    assert cheapest(busy, mins, 10) == {"a": (2, 4), "b": (1, 1)}
    assert balance({"a": 10.0, "b": 100.0}, mins, 10) == {"a": (1, 4), "b": (6, 1)}
    with pytest.raises(ValueError, match="cannot hold one replica"):
        balance(busy, mins, 4)


def test_snippet_pastes_into_the_pipeline_file(tmp_path):
    """The printed `models:` block replaces the file's and loads, with the balanced resources."""
    layout = {"internvl2_76b": (3, 4), "qwen2_72b": (1, 4), "griffon_g": (2, 1), "deepseek_r1_70b": (2, 4)}
    util = {m: 0.5 for m in layout}
    text = snippet(str(LONGGRIT), layout, "H100", util, {"griffon_g": "vllm"})
    assert "expected utilisation 50%" in text and "assumes engine" not in text  # the file serves Griffon-G on vLLM
    assert "griffon_g: the throughput table assumes engine hf; this file says vllm" in \
        snippet(str(LONGGRIT), layout, "H100", util, {"griffon_g": "hf"})
    raw = yaml.safe_load(LONGGRIT.read_text())
    raw["models"] = yaml.safe_load(text)["models"]
    for stage in raw["stages"].values():
        stage["prompt"] = str((LONGGRIT.parent / stage["prompt"]).resolve())
    path = tmp_path / "balanced.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    for key, (replicas, gpr) in layout.items():
        model = cfg.models[key]
        assert (model.resources.replicas, model.resources.num_gpus) == (replicas, gpr)
        if model.engine == "vllm":
            assert model.vllm.tensor_parallel_size == gpr
