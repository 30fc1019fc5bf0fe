"""Multi-process and multi-node training through Ray Train's TorchTrainer (`annotate train --workers N`).

Ray Train starts N workers (one per GPU, or one per CPU slot), sets up the torch process group
(NCCL on GPUs, gloo on CPUs) and runs `train()` in each. From there the training loop is the same as
under torchrun: `Trainer` sees an initialised process group, wraps the model in DDP, shards the
sampler by rank, and the loss gathers features across ranks (open_clip). Only rank 0 writes
checkpoints, into RUN, so on several nodes RUN and the data must be on storage every node mounts.

Worker failures: with `max_failures > 0` Ray Train restarts the worker group, and the restarted
workers resume from the newest checkpoint this job wrote (never from an older job's checkpoint unless
`--resume` was given).
"""

from __future__ import annotations

import json
import time

from annotate.cluster import ensure_ray
from annotate.config import RunConfig
from annotate.train.job import TrainJob
from annotate.train.trainer import RESULT_FILE, cpu_threads, latest_checkpoint, train


def _train_on_worker(loop: dict) -> None:
    """The function every Ray Train worker runs."""
    import ray.train.torch

    cpu_threads(loop["threads_per_worker"])
    job = TrainJob.model_validate(loop["job"])
    ckpt = latest_checkpoint(job.output)
    # A restart after a worker failure goes on from this job's own newest checkpoint.
    restarted = ckpt is not None and ckpt.stat().st_mtime >= loop["started_at"]
    # Rank 0 writes the result to RUN (RESULT_FILE): Ray Train V2 drops metrics reported without a
    # Ray checkpoint, so `ray.train.report` would carry nothing back to the driver.
    train(job.model_copy(update={"resume": job.resume or restarted}), device=str(ray.train.torch.get_device()))


def train_on_ray(
    job: TrainJob,
    run: RunConfig,
    workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
    max_failures: int = 0,
) -> dict:
    """Run `train()` on `workers` Ray Train workers, on the cluster the pipeline file's `run:` section
    names (or `address`); returns rank 0's final metrics."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    job = job.resolved()
    job.output.mkdir(parents=True, exist_ok=True)
    ensure_ray(run, address)
    loop = {"job": job.wire(), "started_at": time.time(),
            "threads_per_worker": max(1, int(cpus_per_worker))}
    trainer = TorchTrainer(
        _train_on_worker,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
        run_config=RayRunConfig(name=f"pixclip-{job.output.name}", storage_path=str(job.output / "ray_train"),
                                failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"Ray Train failed: {result.error}")
    return json.loads((job.output / RESULT_FILE).read_text())
