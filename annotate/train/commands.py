"""What the `train`, `eval`, `embed-text` and `ablation` commands do, so that cli.py only parses."""

from __future__ import annotations

import json
from pathlib import Path

from annotate.config import PipelineConfig, TrainConfig, load_config
from annotate.train.job import TrainJob
from annotate.train.trainer import cpu_threads, train


def pipeline_config(config: str | None) -> PipelineConfig:
    """The pipeline YAML's settings (its `train:` and `run:` sections), or the defaults without one."""
    return load_config(config) if config else PipelineConfig()


def train_config(config: str | None, synthetic: bool = False, **overrides) -> TrainConfig:
    """The `train` section of a pipeline YAML; without one, the paper's defaults or the synthetic preset."""
    if config:
        cfg = pipeline_config(config).train
    elif synthetic:
        from annotate.train.synthetic import synthetic_config

        cfg = synthetic_config()
    else:
        cfg = TrainConfig()
    updates = {k: v for k, v in overrides.items() if v is not None}
    return cfg.model_copy(update=updates) if updates else cfg


def run_train(output, data=None, synthetic=False, config=None, max_steps=None, resume=False, text_cache=None,
              workers=None, address=None, gpu=False, cpus_per_worker=1.0, max_failures=0) -> dict:
    """In this process, or (with `workers` or `address`) on Ray Train workers with DDP, on the Ray
    cluster the pipeline file's `run:` section describes."""
    job = TrainJob(cfg=train_config(config, synthetic, max_steps=max_steps), output=output, data=data,
                   synthetic=synthetic, max_steps=max_steps, resume=resume, text_cache=text_cache)
    if workers or address:
        from annotate.train.distributed import train_on_ray

        return train_on_ray(job, pipeline_config(config).run, workers=workers or 1, use_gpu=gpu,
                            cpus_per_worker=cpus_per_worker, address=address, max_failures=max_failures)
    cpu_threads()
    return train(job)


def run_eval(checkpoint, data=None, synthetic=False, zero_shot=None, output=None, task=None, bench_dir=None) -> dict:
    from annotate.train.eval_tasks import evaluate_task
    from annotate.train.evaluate import evaluate, print_table

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
        job = TrainJob(cfg=base.model_copy(update={"use_fc": fc, "use_lg": lg}), output=run, synthetic=True)
        train(job, **({"log": log} if log else {}))
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
