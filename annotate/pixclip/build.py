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


# For an open_clip tower these are read from the checkpoint unless the config sets them: the joint width
# (LLM2CLIP's EVA02-B/16 is 1280-d, open_clip's 512), the adaptor's shape, the temperature. A value the
# user wrote is honoured (a shape that contradicts the file is refused); a default never overrides a file.
_FROM_FILES = ("embed_dim", "adaptor_kind", "adaptor_layers", "adaptor_hidden", "logit_scale_init")


def _explicit(cfg: Any) -> set[str]:
    """The fields set in the config file or by the caller (pydantic's `model_fields_set`), not defaulted."""
    fields = getattr(cfg, "model_fields_set", None)
    return set(fields) if fields is not None else set(_FROM_FILES)


def _build(cfg: Any, text_dim: int) -> PixCLIP:
    if getattr(cfg, "vision_source", "timm") == "open_clip":
        native = open_clip_image_size(cfg.vision_model)
        if cfg.image_size != native:
            raise ValueError(f"{cfg.vision_model} takes {native} px images; set train.image_size: {native}")
        # Settings the user wrote: the rest comes from the checkpoint files (or open_clip's config).
        given = {k: getattr(cfg, k) for k in _FROM_FILES if k in _explicit(cfg)}
        return from_open_clip(
            cfg.vision_model,
            cfg.vision_checkpoint,
            text_dim=text_dim,
            adaptor_checkpoint=getattr(cfg, "adaptor_checkpoint", None),
            **given,
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
