"""Checkpoint + --resume continues exactly like an uninterrupted run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from annotate.pixclip.build import build_pixclip
from annotate.train.synthetic import SyntheticDataset
from annotate.train.job import TrainJob
from annotate.train.trainer import Trainer, latest_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(cfg, ds, out):
    torch.manual_seed(cfg.seed)
    return Trainer(cfg, build_pixclip(cfg, text_dim=64), ds, out, device="cpu")


def test_resume_continues_identically(tiny_train_cfg, tmp_path):
    cfg = tiny_train_cfg.model_copy(update={"batch_size": 6, "max_steps": 5, "checkpoint_every": 2, "grad_accum_steps": 2})
    ds = SyntheticDataset(cfg, n_images=10, seed=1)  # 30 regions: 2 steps of 12 per epoch, so resume crosses epochs
    straight = _trainer(cfg, ds, tmp_path / "a")
    straight.fit(5, log=lambda _: None)

    first = _trainer(cfg, ds, tmp_path / "b")
    first.fit(3, log=lambda _: None)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step_0000003"
    assert set(p.name for p in ckpt.iterdir()) == {"model.safetensors", "train_state.pt"}
    resumed = _trainer(cfg, ds, tmp_path / "b")
    resumed.load(ckpt)
    assert (resumed.step, resumed.epoch, resumed.step_in_epoch) == (3, 1, 1)
    resumed.fit(5, log=lambda _: None)

    assert resumed.step == straight.step == 5
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch == 5
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    for k in sa["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][k][field], sb["state"][k][field])
    assert [g["lr"] for g in sa["param_groups"]] == [g["lr"] for g in sb["param_groups"]]
    saved = load_file(latest_checkpoint(tmp_path / "b") / "model.safetensors")
    assert torch.equal(saved["logit_scale"], straight.model.logit_scale.detach())


def test_train_entry_resume_flag(tiny_train_cfg, tmp_path):
    cfg = tiny_train_cfg.model_copy(update={"max_steps": 4})
    logs = []
    train(TrainJob(cfg=cfg, output=tmp_path, synthetic=True, max_steps=2), log=logs.append)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["synthetic"] and run["text_dim"] == 64 and run["config"]["max_steps"] == 4
    out = train(TrainJob(cfg=cfg, output=tmp_path, synthetic=True, max_steps=4, resume=True), log=logs.append)
    assert out["step"] == 4 and any("resumed from" in line and "step 2" in line for line in logs)


# ------------------------------------------------------------------ what a checkpoint may hold
def _weights_only_torch_load(monkeypatch):
    """Make every torch.load in the trainer refuse weights_only=False, as a checkpoint from an untrusted
    place must be read: pickle would run any code the file names."""
    real = torch.load

    def guarded(*args, weights_only=None, **kwargs):
        assert weights_only is True, "checkpoints are read with weights_only=True"
        return real(*args, weights_only=True, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)


def test_resume_round_trip_under_weights_only(tiny_train_cfg, tmp_path, monkeypatch):
    """Everything `load` needs comes back through the safe unpickler: a field that needs a class (numpy,
    a dataclass, a closure) would fail here, not on the day someone resumes a downloaded run."""
    _weights_only_torch_load(monkeypatch)
    cfg = tiny_train_cfg.model_copy(update={"batch_size": 6, "max_steps": 4, "checkpoint_every": 2})
    ds = SyntheticDataset(cfg, n_images=10, seed=1)
    first = _trainer(cfg, ds, tmp_path)
    first.fit(3, log=lambda _: None)
    ckpt = latest_checkpoint(tmp_path)
    for f in ckpt.iterdir():
        if f.suffix == ".pt":
            torch.load(f, map_location="cpu", weights_only=True)  # no pickled class, no numpy, no callable
    resumed = _trainer(cfg, ds, tmp_path)
    resumed.load(ckpt)
    assert (resumed.step, resumed.epoch, resumed.step_in_epoch) == (first.step, first.epoch, first.step_in_epoch)
    assert resumed.scheduler.state_dict() == first.scheduler.state_dict()
    sa, sb = first.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for field, value in sa["state"][k].items():
            assert torch.equal(value, sb["state"][k][field]), (k, field)


# ------------------------------------------------------------------ the `latest` pointer
def test_latest_pointer_survives_a_crash_mid_write(tiny_train_cfg, tmp_path, monkeypatch):
    """A crash while `latest` is being rewritten (after the bytes, before they are in place) leaves the
    previous pointer whole and pointing at a complete checkpoint: resume never meets a torn pointer."""
    import annotate.train.trainer as trainer_mod

    cfg = tiny_train_cfg.model_copy(update={"batch_size": 6, "max_steps": 4, "checkpoint_every": 2})
    ds = SyntheticDataset(cfg, n_images=10, seed=1)
    t = _trainer(cfg, ds, tmp_path)
    t.fit(2, log=lambda _: None)
    assert latest_checkpoint(tmp_path).name == "step_0000002"

    class Crash(Exception):
        pass

    def crash(*_args, **_kwargs):
        raise Crash

    # In place (today's write_text), the file is truncated before its new bytes land; atomically, the
    # new bytes go to a temporary file that replaces the pointer in one step. Crash at either moment.
    monkeypatch.setattr(trainer_mod.os, "replace", crash)
    monkeypatch.setattr(trainer_mod.Path, "write_text", lambda self, *a, **k: (self.open("w").close(), crash()))
    with pytest.raises(Crash):
        t.fit(4, log=lambda _: None)
    monkeypatch.undo()
    pointer = tmp_path / "checkpoints" / "latest"
    assert pointer.read_text().strip() == "step_0000002", "the old pointer is intact"
    assert latest_checkpoint(tmp_path).name == "step_0000002"
    assert not [p for p in pointer.parent.iterdir() if p.name.startswith("latest") and p != pointer], "no temp left"



def test_resume_at_an_epoch_boundary_with_accumulation(tiny_train_cfg, tmp_path):
    """grad_accum_steps=2, 30 regions, micro-batches of 6: two steps per epoch and one micro-batch left
    over. Resumed from the checkpoint of the epoch's last step, the run must not feed that leftover
    micro-batch (its gradient used to be added to the next epoch's first step) and must equal an
    uninterrupted run bit for bit, also from a checkpoint written as (epoch, steps_per_epoch)."""
    cfg = tiny_train_cfg.model_copy(update={"batch_size": 6, "max_steps": 5, "checkpoint_every": 2, "grad_accum_steps": 2})
    ds = SyntheticDataset(cfg, n_images=10, seed=1)
    straight = _trainer(cfg, ds, tmp_path / "a")
    assert straight.steps_per_epoch == 2 and len(straight.sampler) % 12 == 6
    straight.fit(5, log=lambda _: None)

    first = _trainer(cfg, ds, tmp_path / "b")
    first.fit(2, log=lambda _: None)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step_0000002"
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)  # saved as the next epoch's start
    for written_as in ((1, 0), (0, 2)):  # this version's position, and older versions' epoch end
        torch.save({**state, "epoch": written_as[0], "step_in_epoch": written_as[1]}, ckpt / "train_state.pt")
        resumed = _trainer(cfg, ds, tmp_path / "b")
        resumed.load(ckpt)
        assert (resumed.step, resumed.epoch, resumed.step_in_epoch) == (2, 1, 0)
        resumed.fit(5, log=lambda _: None)
        for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
            assert torch.equal(a, b), (written_as, name, float((a - b).abs().max()))
