"""What the `train`, `eval`, `embed-text` and `ablation` commands do, so that cli.py only parses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from annotate.config import TrainConfig, load_config


def train_config(config: str | None, synthetic: bool = False, **overrides) -> TrainConfig:
    """The `train` section of a pipeline YAML; without one, the paper's defaults or the synthetic preset."""
    if config:
        cfg = load_config(config).train
    elif synthetic:
        from annotate.train.synthetic import synthetic_config

        cfg = synthetic_config()
    else:
        cfg = TrainConfig()
    updates = {k: v for k, v in overrides.items() if v is not None}
    return cfg.model_copy(update=updates) if updates else cfg


def cpu_threads(limit: int | None = None) -> None:
    """Intra-op threads on a CPU: at most `limit`, by default half the cores.

    Small models on a small, shared CPU: extra intra-op threads mostly spin (measured 6x slower with
    2 threads than 1 on a loaded 2-core box).
    """
    if not torch.cuda.is_available():
        limit = limit or max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(max(1, min(torch.get_num_threads(), limit)))


def run_train(output, data=None, synthetic=False, config=None, max_steps=None, resume=False, text_cache=None,
              workers=None, address=None, gpu=False, cpus_per_worker=1.0, max_failures=0) -> dict:
    """In this process, or (with `workers` or `address`) on Ray Train workers with DDP."""
    if not synthetic and not data:
        raise ValueError("give --data OUT (a pipeline output) or --synthetic")
    cfg = train_config(config, synthetic, max_steps=max_steps)
    if workers or address:
        from annotate.train.distributed import train_on_ray

        return train_on_ray(cfg, output, data, synthetic, max_steps, resume, text_cache, workers=workers or 1,
                            use_gpu=gpu, cpus_per_worker=cpus_per_worker, address=address, max_failures=max_failures)
    from annotate.train.trainer import train

    cpu_threads()
    return train(cfg, output, data, synthetic, max_steps, resume, text_cache)


def run_eval(checkpoint, data=None, synthetic=False, zero_shot=None, output=None, task=None, bench_dir=None) -> dict:
    from annotate.train.evaluate import evaluate, evaluate_task, print_table

    cpu_threads()
    if task:
        if not bench_dir:
            raise ValueError("--task needs --bench-dir (the benchmark's local copy)")
        res = evaluate_task(checkpoint, task, bench_dir, output)
    else:
        res = evaluate(checkpoint, data, synthetic, zero_shot, output)
    print(json.dumps(res, indent=2))
    print_table(res)
    return res


def run_embed_text(data, output, config=None) -> int:
    from annotate.train.text_cache import embed_text

    cache = embed_text(data, output, train_config(config))
    return len(cache)


ABLATION_ROWS = (("L_CL", False, False), ("L_CL + L_LG", False, True), ("L_CL + L_LG + L_FC", True, True))


def run_ablation(output, max_steps: int | None = None, config: str | None = None, log=None, **overrides) -> str:
    """Table 6 on the synthetic benchmark: the same run with L_CL, +L_LG, +L_LG+L_FC; markdown out."""
    from annotate.train.evaluate import evaluate
    from annotate.train.trainer import train

    cpu_threads()
    out = Path(output)
    base = train_config(config, synthetic=True, max_steps=max_steps, **overrides)
    lines = [
        "| Loss | M2T R@1 | M2T R@5 | T2M R@1 | T2M R@5 | mask-zeroed M2T R@1 | full-image I2T R@1 | full-image T2I R@1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    for name, fc, lg in ABLATION_ROWS:
        run = out / name.replace(" ", "").replace("+", "_").lower()
        train(base.model_copy(update={"use_fc": fc, "use_lg": lg}), run, synthetic=True, **({"log": log} if log else {}))
        r = evaluate(run, synthetic=True)
        results[name] = r
        cells = [r["m2t_r1"], r["m2t_r5"], r["t2m_r1"], r["t2m_r5"], r["m2t_r1_mask_zeroed"], r["i2t_r1"], r["t2i_r1"]]
        lines.append(f"| {name} | " + " | ".join(f"{100 * c:.1f}%" for c in cells) + " |")
    chance = next(iter(results.values()))["chance_r1"]
    lines.append(f"\nSynthetic benchmark, {base.max_steps} steps per row; chance R@1 = {100 * chance:.2f}%.")
    table = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    return table
