"""PixCLIP training with more than one process: the cross-rank loss gather, and Ray Train with DDP."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from annotate.pixclip.loss import PixCLIPLoss
from ranks import run_ranks

WORLD = 2
B = 3  # samples per rank


def _features(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(WORLD * B, 8, generator=g) for name in ("main", "text", "crop", "local")}


def _loss_and_grads(feats: dict[str, torch.Tensor], rank: int, world: int) -> tuple[float, dict[str, torch.Tensor]]:
    leaves = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
    out = PixCLIPLoss(alpha=0.25, beta=0.25, rank=rank, world_size=world)(
        leaves["main"], leaves["text"], torch.tensor(2.0), leaves["crop"], leaves["local"])
    out["total"].backward()
    return float(out["total"].detach()), {k: v.grad for k, v in leaves.items()}


def _rank_main(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        local = {k: v[rank * B:(rank + 1) * B] for k, v in _features().items()}
        results[rank] = _loss_and_grads(local, rank, WORLD)
    finally:
        dist.destroy_process_group()


def test_loss_gathers_features_across_two_ranks(tmp_path):
    """Two gloo processes, each holding half the batch, compute the loss of the whole batch: the
    same value as one process with all of it, and (gathered with grad) each rank's gradient is the
    world size times the single-process gradient of its half, which DDP's averaging then undoes."""
    whole_loss, whole_grads = _loss_and_grads(_features(), rank=0, world=1)
    results = run_ranks(_rank_main, WORLD, str(tmp_path / "pg-init"))
    for rank in range(WORLD):
        loss, grads = results[rank]
        assert loss == pytest.approx(whole_loss, rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, WORLD * whole_grads[name][rank * B:(rank + 1) * B], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_train_two_workers_ddp(tiny_train_cfg, tmp_path):
    """`annotate train --synthetic --workers 2`: two Ray Train workers (gloo) train with DDP, rank 0
    writes the checkpoints and the result, and the ranks' weights agree at the end (checked inside
    `fit`; it raises if they diverged). Resuming is the single-process code (test_train_checkpoint)."""
    from annotate.config import load_config
    from annotate.train.distributed import train_on_ray
    from annotate.train.job import TrainJob
    from bench.harness import TINY

    run = tmp_path / "run"
    cfg = tiny_train_cfg.model_copy(update={"max_steps": 2, "checkpoint_every": 2})
    result = train_on_ray(TrainJob(cfg=cfg, output=run, synthetic=True), load_config(TINY).run, workers=WORLD,
                          cpus_per_worker=0.5)
    assert result["world_size"] == WORLD and result["step"] == 2
    assert torch.isfinite(torch.tensor(result["total"]))
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"
    assert (run / "checkpoints" / "step_0000002" / "model.safetensors").exists()
    assert json.loads((run / "run.json").read_text())["synthetic"] is True


def test_the_pipeline_files_run_settings_start_the_trainers_ray(tmp_path, monkeypatch):
    """`annotate train --workers N --config FILE` starts (or joins) Ray with FILE's `run:` section, as
    `annotate run` does, not with defaults. Ray Train itself is replaced by a stand-in here (a fake,
    because only the settings handed to `ensure_ray` are under test; the real Ray Train run is
    test_ray_train_two_workers_ddp), and so is `ensure_ray`, which records what it was given."""
    import annotate.train.distributed as distributed
    from annotate.train.commands import run_train
    from bench.harness import tiny_variant

    config = tiny_variant(tmp_path / "pipeline.yaml", {"run": {"dashboard_port": 8299, "num_cpus": 3}})
    seen = {}

    class StopHere(Exception):
        pass

    def fake_ensure_ray(run, address=None):
        seen.update(run=run, address=address)
        raise StopHere

    monkeypatch.setattr(distributed, "ensure_ray", fake_ensure_ray)
    with pytest.raises(StopHere):
        run_train(str(tmp_path / "run"), synthetic=True, config=str(config), workers=2, address="10.0.0.5:6379")
    assert seen["run"].dashboard_port == 8299 and seen["run"].num_cpus == 3
    assert seen["address"] == "10.0.0.5:6379"
