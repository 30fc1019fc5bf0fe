"""The training loop sized for GPUs: one persistent DataLoader per fit, host syncs only at log steps,
DDP's no_sync() on the micro-batches that only accumulate, and num_workers: auto."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys

import pytest
import torch
import torch.distributed as dist

import annotate.train.trainer as trainer_mod
from annotate.pixclip.build import build_pixclip
from annotate.train.synthetic import SyntheticDataset
from annotate.train.trainer import Trainer, latest_checkpoint, loader_workers
from ranks import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")
WORLD = 2


def _trainer(cfg, ds, out):
    torch.manual_seed(cfg.seed)
    return Trainer(cfg, build_pixclip(cfg, text_dim=64), ds, out, device="cpu")


def _accum_cfg(tiny_train_cfg, **update):
    # 30 regions, micro-batches of 6, 2 per step: 2 steps per epoch and a micro-batch left over.
    return tiny_train_cfg.model_copy(update={"batch_size": 6, "max_steps": 5, "checkpoint_every": 2,
                                             "grad_accum_steps": 2, **update})


def test_one_persistent_loader_per_fit_and_resume_stays_exact(tiny_train_cfg, tmp_path, monkeypatch):
    """A worker process kept across three epochs: one DataLoader per fit, the sampler still moves to
    each new epoch, the weights equal a workers=0 run bit for bit, a resume from mid-run equals the
    uninterrupted run, and no worker outlives fit."""
    built = []

    class CountingLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            # spawned workers: in the full suite this process is a Ray driver (conftest's fork guard)
            super().__init__(*args, **kwargs, multiprocessing_context="spawn" if kwargs["num_workers"] else None)

    monkeypatch.setattr(trainer_mod, "DataLoader", CountingLoader)
    ds = SyntheticDataset(_accum_cfg(tiny_train_cfg), n_images=10, seed=1)
    reference = _trainer(_accum_cfg(tiny_train_cfg, num_workers=0), ds, tmp_path / "w0")
    reference.fit(5, log=lambda _: None)

    cfg = _accum_cfg(tiny_train_cfg, num_workers=1, persistent_workers=True)
    straight = _trainer(cfg, ds, tmp_path / "w1")
    epochs = []
    set_epoch = straight.sampler.set_epoch
    monkeypatch.setattr(straight.sampler, "set_epoch", lambda e, s=0: (epochs.append(e), set_epoch(e, s)))
    built.clear()
    straight.fit(5, log=lambda _: None)
    assert len(built) == 1 and built[0]["num_workers"] == 1 and built[0]["persistent_workers"] is True
    assert epochs == [0, 1, 2] and straight.epoch == 2
    assert not multiprocessing.active_children(), "fit left loader workers running"
    for (name, a), b in zip(reference.model.state_dict().items(), straight.model.state_dict().values()):
        assert torch.equal(a, b), name

    first = _trainer(cfg, ds, tmp_path / "resumed")
    first.fit(3, log=lambda _: None)
    resumed = _trainer(cfg, ds, tmp_path / "resumed")
    resumed.load(latest_checkpoint(tmp_path / "resumed"))
    resumed.fit(5, log=lambda _: None)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_losses_reach_the_host_only_at_log_steps(tiny_train_cfg, tmp_path, monkeypatch):
    """float()/item() calls made by the project's code per fit do not grow with the number of steps
    between logs (torch's own AdamW reads its step counters, but those live on the CPU), and a logged
    loss is the mean over the micro-batches since the previous log."""
    reads = [0]
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item

    def counted(real):
        def read(self, *args):
            if "annotate" in sys._getframe(1).f_code.co_filename.split(os.sep):  # pylint: disable=protected-access
                reads[0] += 1
            return real(self, *args)
        return read

    ds = SyntheticDataset(_accum_cfg(tiny_train_cfg), n_images=10, seed=1)
    counts = {}
    for steps in (1, 5):
        cfg = _accum_cfg(tiny_train_cfg, max_steps=steps, log_every=1000, checkpoint_every=1000)
        trainer = _trainer(cfg, ds, tmp_path / f"s{steps}")
        monkeypatch.setattr(torch.Tensor, "__float__", counted(real_float))
        monkeypatch.setattr(torch.Tensor, "item", counted(real_item))
        reads[0] = 0
        logs = []
        last = trainer.fit(steps, log=logs.append)
        counts[steps] = reads[0]
        monkeypatch.setattr(torch.Tensor, "__float__", real_float)
        monkeypatch.setattr(torch.Tensor, "item", real_item)
        assert len(logs) == 1 and set(last) <= set(json.loads(logs[0]))
    assert counts[1] == counts[5]

    cfg = _accum_cfg(tiny_train_cfg, max_steps=4, log_every=2, checkpoint_every=1000)
    trainer = _trainer(cfg, ds, tmp_path / "mean")
    totals, logs = [], []
    losses = trainer.losses

    def recorded(batch):
        out = losses(batch)
        totals.append(float(out["total"].detach()))
        return out

    monkeypatch.setattr(trainer, "losses", recorded)
    trainer.fit(4, log=lambda line: logs.append(json.loads(line)))
    # steps 1-2 are epoch 0 (4 micro-batches), steps 3-4 epoch 1; the leftover micro-batch is not fed
    assert [r["step"] for r in logs] == [2, 4] and len(totals) == 8
    for rec, window in zip(logs, (totals[:4], totals[4:])):
        assert rec["total"] == pytest.approx(sum(window) / 4, rel=1e-5)


def test_auto_workers_follow_batch_and_cores(tiny_train_cfg, monkeypatch):
    cfg = tiny_train_cfg.model_copy(update={"num_workers": "auto", "batch_size": 128})
    monkeypatch.setattr(trainer_mod.os, "sched_getaffinity", lambda _pid: set(range(32)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(cfg, torch.device("cuda")) == 7  # ceil(128 x 5 ms / 100 ms)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers(cfg, torch.device("cuda")) == 3  # 32 cores / 8 ranks, less the rank's own
    monkeypatch.setattr(trainer_mod.os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers(cfg, torch.device("cpu")) == 2 - torch.get_num_threads()
    assert loader_workers(cfg.model_copy(update={"num_workers": 3}), torch.device("cpu")) == 3


def _no_sync_rank(rank: int, init_file: str, cfg_json: str, out: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        from annotate.config import TrainConfig

        cfg = TrainConfig.model_validate_json(cfg_json)
        torch.manual_seed(cfg.seed)
        trainer = Trainer(cfg, build_pixclip(cfg, text_dim=64), SyntheticDataset(cfg, n_images=16, seed=1), out,
                          device="cpu")
        forwards, reduced_at = [0], []
        trainer.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

        def hook(state, bucket):
            reduced_at.append(forwards[0])
            return default_hooks.allreduce_hook(state, bucket)

        trainer.ddp.register_comm_hook(None, hook)
        trainer.fit(2, log=lambda _: None)  # raises if the replicas diverged
        results[rank] = {"reduced_at": reduced_at, "forwards": forwards[0], "step": trainer.step}
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduces_once_per_step_under_accumulation(tiny_train_cfg, tmp_path):
    """Two gloo ranks, 3 micro-batches per step: gradients are all-reduced only in the backward of
    each step's last micro-batch (the others run under no_sync), and the replicas stay identical."""
    cfg = tiny_train_cfg.model_copy(update={"batch_size": 2, "grad_accum_steps": 3, "max_steps": 2,
                                            "checkpoint_every": 100, "num_workers": 0})
    results = run_ranks(_no_sync_rank, WORLD, str(tmp_path / "pg"), cfg.model_dump_json(), str(tmp_path / "run"))
    for rank in range(WORLD):
        r = results[rank]
        assert r["step"] == 2 and r["forwards"] == 6
        assert r["reduced_at"] and set(r["reduced_at"]) == {3, 6}
