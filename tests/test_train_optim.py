"""Parameter groups (learning rates, which params decay) and the warmup-cosine schedule."""

import math

import pytest

from annotate.pixclip.build import build_pixclip
from annotate.train.trainer import param_groups, warmup_cosine

pytestmark = pytest.mark.usefixtures("one_thread")


def test_param_groups_follow_the_paper(tiny_train_cfg):
    cfg = tiny_train_cfg.model_copy(update={"lr_mask_conv": 1e-5, "lr_other": 1e-7, "lr_adaptor": None, "weight_decay": 1e-2})
    model = build_pixclip(cfg, text_dim=8)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["mask_conv"]["param_names"] == ["visual.patch_embed.mask_proj.weight"]
    assert groups["mask_conv"]["lr"] == 1e-5 and groups["mask_conv"]["weight_decay"] == 1e-2
    for name, g in groups.items():
        if name.startswith("other"):
            assert g["lr"] == 1e-7  # the paper's "other layers"
        if name.startswith("adaptor"):
            assert g["lr"] == 1e-5  # a random adaptor (none loaded) must move: lr_mask_conv
        assert g["weight_decay"] == (0.0 if name.endswith("no_decay") else 1e-2)
    no_decay = {n for g in groups.values() if g["weight_decay"] == 0 for n in g["param_names"]}
    decay = {n for g in groups.values() if g["weight_decay"] > 0 for n in g["param_names"]}
    assert "logit_scale" in no_decay
    assert all(n.endswith(".bias") or "norm" in n or n == "logit_scale" or n.startswith("text_adaptor.0") for n in no_decay)
    assert {"visual.pos_embed", "visual.cls_token", "visual_proj.weight", "visual.blocks.0.attn.qkv.weight"} <= decay
    every = {n for n, p in model.named_parameters()}
    assert decay | no_decay == every and not decay & no_decay
    # a trained adaptor (LLM2CLIP's) is fine-tuned like the other layers
    trained = {g["name"]: g["lr"] for g in param_groups(model, cfg.model_copy(update={"adaptor_checkpoint": "a.pt"}))}
    assert trained["adaptor"] == trained["adaptor_no_decay"] == 1e-7
    # the adaptor gets its own lr when configured
    cfg2 = cfg.model_copy(update={"lr_adaptor": 3e-4})
    assert {g["name"]: g["lr"] for g in param_groups(model, cfg2)}["adaptor"] == 3e-4


def test_warmup_then_cosine():
    f = warmup_cosine(warmup=4, total=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0, abs=1e-12)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))


def test_trainer_clamps_logit_scale_after_each_step(tiny_train_cfg, tmp_path):
    """Started above ln(100), the temperature is brought back to ln(100) by the in-place clamp after
    the optimizer step (the forward pass no longer clamps, so it keeps its gradient)."""
    from annotate.train.synthetic import SyntheticDataset
    from annotate.train.trainer import Trainer

    cfg = tiny_train_cfg.model_copy(update={"logit_scale_init": math.log(150.0), "max_steps": 1})
    trainer = Trainer(cfg, build_pixclip(cfg, text_dim=64), SyntheticDataset(cfg, n_images=4, seed=1), tmp_path, device="cpu")
    trainer.fit(1, log=lambda _: None)
    assert trainer.step == 1
    assert float(trainer.model.logit_scale.detach()) == pytest.approx(math.log(100.0))
