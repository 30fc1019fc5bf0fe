"""Which setting wins when a checkpoint file also has one (temperature, joint width), how a job keeps
"unset" across processes, and the torchrun device (issue 26)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")
open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """open_clip ViT-S-32 (a small registered ViT) rebuilt with a 256-d joint space (its config says 384),
    logit_scale 4.3, saved as an open_clip checkpoint."""
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-S-32", pretrained=None, embed_dim=256)
    with torch.no_grad():
        clip.logit_scale.fill_(4.3)
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save({k: v for k, v in clip.state_dict().items() if k.startswith("visual.") or k == "logit_scale"}, path)
    return path


def _cfg(tmp_path, lines: str):
    """A `train:` section as a user writes it, loaded as the CLI loads it (so only written keys count as set)."""
    from annotate.config import load_config

    (tmp_path / "p.yaml").write_text("train:\n  vision_source: open_clip\n  vision_model: ViT-S-32\n" + lines)
    return load_config(tmp_path / "p.yaml").train


def test_logit_scale_init_written_wins_over_the_checkpoint(small_clip, tmp_path):
    """Written in the config, `logit_scale_init` is the starting temperature (before: silently replaced by the
    checkpoint's); unwritten, the pretrained CLIP's own temperature is kept, as fine-tuning expects; with no
    checkpoint the config's value (default 4.0652) is used (before: always PixCLIP's constructor default)."""
    from annotate.pixclip.build import build_pixclip

    cases = [(f"  vision_checkpoint: {small_clip}\n  logit_scale_init: 2.5\n", 2.5),
             (f"  vision_checkpoint: {small_clip}\n", 4.3),
             ("  logit_scale_init: 3.25\n", 3.25),
             ("", 4.0652)]
    for lines, want in cases:
        model = build_pixclip(_cfg(tmp_path, lines), text_dim=8)
        assert float(model.logit_scale.detach()) == pytest.approx(want), lines


def test_width_from_the_file_is_recorded_so_evaluation_rebuilds_it(small_clip, tmp_path):
    """The 256-d width comes from the checkpoint (open_clip's config says 384); run.json records it, and
    `load_run` rebuilds the model without the file and loads the trained weights."""
    from safetensors.torch import save_file

    from annotate.pixclip.build import build_pixclip
    from annotate.train.evaluate import load_run
    from annotate.train.trainer import RUN_FILE, run_record

    cfg = _cfg(tmp_path, f"  vision_checkpoint: {small_clip}\n  adaptor_layers: 2\n  adaptor_hidden: 16\n")
    model = build_pixclip(cfg, text_dim=8)
    assert model.embed_dim == 256 and model.text_adaptor[-1].out_features == 256
    (tmp_path / RUN_FILE).write_text(json.dumps(run_record(cfg, model, 8, {"synthetic": False})))
    ckpt = tmp_path / "checkpoints" / "step_0000001"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
    back, _, meta = load_run(ckpt)
    assert meta["config"]["embed_dim"] == 256 and back.embed_dim == 256
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(back.encode_text(x), model.eval().encode_text(x))


def test_job_sent_to_workers_keeps_unset_settings_unset(tmp_path):
    """Ray Train workers rebuild the job from JSON: a default sent as a value would count as written and
    override (or contradict) the checkpoint's width and temperature on the workers only."""
    from annotate.train.job import TrainJob

    cfg = _cfg(tmp_path, "  batch_size: 4\n")
    job = TrainJob(cfg=cfg, output=tmp_path, synthetic=True).resolved()
    back = TrainJob.model_validate(json.loads(json.dumps(job.wire())))
    assert back.cfg.model_fields_set == cfg.model_fields_set == {"vision_source", "vision_model", "batch_size"}
    assert back.cfg == cfg and back.output == tmp_path.resolve()


def test_torchrun_sets_the_local_gpu_before_the_process_group(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1, no group yet) on GPUs, rank LOCAL_RANK must be on cuda:LOCAL_RANK
    before NCCL starts; torch.cuda and the process group are stand-ins (no GPU here), recording the calls.
    With a group already set up (Ray Train, which sets the device itself) nothing is changed."""
    import annotate.train.trainer as trainer_mod

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    state = {"up": False}
    monkeypatch.setattr(trainer_mod.dist, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(trainer_mod.dist, "init_process_group", lambda backend: (calls.append(("init", backend)), state.update(up=True)))
    monkeypatch.setattr(trainer_mod.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(trainer_mod.dist, "get_world_size", lambda: 2)
    assert trainer_mod._dist_info() == (1, 2)
    assert calls == [("set_device", 1), ("init", "nccl")]
    calls.clear()
    assert trainer_mod._dist_info() == (1, 2) and calls == []  # an existing group (Ray Train): untouched
