"""What the `train`, `eval`, `embed-text`, `score` and `ablation` commands do, so that cli.py only parses."""

from __future__ import annotations

import json
import re
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


def run_eval(checkpoint=None, data=None, synthetic=False, zero_shot=None, output=None, task=None, bench_dir=None,
             batch_size: int = 64, make_benchmark=None, n: int = 2000, seed: int = 0) -> dict:
    """One of: freeze a benchmark split of a pipeline output (`make_benchmark`, no model involved), one
    paper benchmark (`task`), or retrieval / zero-shot on pipeline output or the synthetic set."""
    if make_benchmark:
        from annotate.train.frozen import make_benchmark as freeze

        res = freeze(make_benchmark, n, seed)
        print(json.dumps(res, indent=2))
        return res
    if not checkpoint:
        raise ValueError("--checkpoint is needed (all but --make-benchmark evaluate a model)")
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    from annotate.train.eval_tasks import evaluate_task
    from annotate.train.evaluate import evaluate, print_table

    cpu_threads()
    if task:
        if not bench_dir:
            raise ValueError("--task needs --bench-dir (the benchmark's local copy)")
        res = evaluate_task(checkpoint, task, bench_dir, output, batch_size)
    else:
        res = evaluate(checkpoint, data, synthetic, zero_shot, output, batch_size)
    print(json.dumps(res, indent=2))
    print_table(res)
    return res


def run_score(output, checkpoint, text_cache=None) -> dict:
    from annotate.train.score import score_output

    cpu_threads()
    return score_output(output, checkpoint, text_cache)


def run_embed_text(data, output, config=None) -> int:
    from annotate.train.text_cache import embed_text

    cache = embed_text(data, output, train_config(config))
    return len(cache)


# (row name, settings changed from the base): Table 6 of the paper, and the branches for the data of
# the optional stages (MulCLIP's short text, verified hard negatives, the part stages' parts) on top of the
# full PixCLIP loss.
LOSS_ROWS = (("L_CL", {"use_fc": False, "use_lg": False}), ("L_CL + L_LG", {"use_fc": False, "use_lg": True}),
             ("L_CL + L_LG + L_FC", {"use_fc": True, "use_lg": True}))
BRANCH_ROWS = (("PixCLIP", {}), ("+ short text", {"use_short": True}),
               ("+ hard negatives", {"use_hard_negatives": True}),
               ("+ both", {"use_short": True, "use_hard_negatives": True}), ("+ parts", {"use_parts": True}))
LOSS_COLUMNS = (("M2T R@1", "m2t_r1"), ("M2T R@5", "m2t_r5"), ("T2M R@1", "t2m_r1"), ("T2M R@5", "t2m_r5"),
                ("mask-zeroed M2T R@1", "m2t_r1_mask_zeroed"), ("full-image I2T R@1", "i2t_r1"),
                ("full-image T2I R@1", "t2i_r1"))
BRANCH_COLUMNS = (("M2T R@1", "m2t_r1"), ("T2M R@1", "t2m_r1"), ("short-text M2T R@1", "short_m2t_r1"),
                  ("description over all 8 negatives", "hn_acc"), ("vs colour edit", "hn_colour"),
                  ("vs object edit", "hn_object"), ("vs relation edit", "hn_relation"), ("part M2T R@1", "part_m2t_r1"))


def run_ablation(output, max_steps: int | None = None, config: str | None = None, log=None, branches: bool = False,
                 **overrides) -> str:
    """On the synthetic benchmark, the same run with each row's settings; a markdown table out. Rows:
    Table 6's losses (L_CL, +L_LG, +L_LG+L_FC), or with `branches` the full loss alone, + the short-text
    branch, + the hard-negative branch, + both, + the part branch."""
    from annotate.train.evaluate import evaluate

    cpu_threads()
    out = Path(output)
    base = train_config(config, synthetic=True, max_steps=max_steps, **overrides)
    rows, columns = (BRANCH_ROWS, BRANCH_COLUMNS) if branches else (LOSS_ROWS, LOSS_COLUMNS)
    lines = [f"| {'Branches' if branches else 'Loss'} | " + " | ".join(c for c, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    results = {}
    for name, update in rows:
        run = out / (re.sub(r"[^a-z0-9_]+", "", name.replace(" ", "").replace("+", "_").lower()) or "base")
        job = TrainJob(cfg=base.model_copy(update=update), output=run, synthetic=True)
        train(job, **({"log": log} if log else {}))
        r = evaluate(run, synthetic=True)
        results[name] = r
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[key]:.1f}%" for _, key in columns) + " |")
    chance = next(iter(results.values()))["chance_r1"]
    lines.append(f"\nSynthetic benchmark, {base.max_steps} steps per row; chance R@1 = {100 * chance:.2f}%.")
    table = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    return table
