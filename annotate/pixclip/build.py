"""Building a PixCLIP from the `train:` settings: on a timm ViT (`model.create_vision`) or on a
pretrained open_clip tower (`open_clip_models.from_open_clip`). Apart from both so that neither
module imports the other's builder."""

from __future__ import annotations

from typing import Any

from annotate.pixclip.model import PixCLIP, create_vision
from annotate.pixclip.open_clip_models import from_open_clip, open_clip_image_size


def build_pixclip(cfg: Any, text_dim: int) -> PixCLIP:
    """Build from a `TrainConfig` (duck-typed, so this library does not import the app config)."""
    model = _build(cfg, text_dim)
    if getattr(cfg, "use_hard_negatives", False):
        model.add_negative_temperature(cfg.hard_negative_logit_scale_init)
    return model


def _build(cfg: Any, text_dim: int) -> PixCLIP:
    if getattr(cfg, "vision_source", "timm") == "open_clip":
        native = open_clip_image_size(cfg.vision_model)
        if cfg.image_size != native:
            raise ValueError(f"{cfg.vision_model} takes {native} px images; set train.image_size: {native}")
        return from_open_clip(
            cfg.vision_model,
            cfg.vision_checkpoint,
            text_dim=text_dim,
            adaptor_layers=cfg.adaptor_layers,
            adaptor_hidden=cfg.adaptor_hidden,
            adaptor_checkpoint=getattr(cfg, "adaptor_checkpoint", None),
            adaptor_kind=getattr(cfg, "adaptor_kind", "mlp"),
        )
    vision = create_vision(cfg.vision_model, cfg.image_size, cfg.vision_checkpoint, **cfg.vision_kwargs)
    return PixCLIP(
        vision,
        text_dim=text_dim,
        embed_dim=cfg.embed_dim,
        adaptor_layers=cfg.adaptor_layers,
        adaptor_hidden=cfg.adaptor_hidden,
        logit_scale_init=cfg.logit_scale_init,
    )
