"""PixCLIP on a pretrained open_clip model, its image-text alignment kept.

The paper fine-tunes an aligned CLIP (EVA02-CLIP) at 1e-7 with only the new mask conv at 1e-5, so
the CLIP projection and temperature must come with the tower: a random projection trained at 1e-7
would stay random. `from_open_clip` builds the open_clip model from its registered config (no
download: `pretrained=None`), loads a local checkpoint, and hands the vision tower, its projection
and its `logit_scale` to `PixCLIP`. Because the mask conv starts at zero, at init
`encode_image(image, mask, normalize=False)` equals open_clip's `encode_image(image)` for any mask.

Towers: open_clip's own `VisionTransformer` (ViT-B-16, ViT-L-14, ...) keeps its `proj` matrix as
`visual_proj`; the EVA02 models are a timm Eva trunk whose classifier head *is* the CLIP projection
(`timm_proj: null` in their configs), so that head becomes `visual_proj`. Models with attentional or
custom pooling heads are refused rather than silently mis-built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from annotate.pixclip.model import PixCLIP, is_open_clip_vit

# The backbones the paper and LLM2CLIP use; any open_clip ViT / timm-trunk model name works.
PAPER_MODELS = ("EVA02-B-16", "EVA02-L-14", "EVA02-L-14-336", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint file as a flat state dict (open_clip's loader: .safetensors, .pt/.bin, `state_dict` key,
    DataParallel `module.` prefixes)."""
    from open_clip.factory import load_state_dict

    return load_state_dict(str(path))


def split_open_clip_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(vision tower state, logit_scale) from a full open_clip checkpoint (`visual.*` keys) or from a
    state dict of the vision tower alone (no prefix)."""
    if any(k.startswith("visual.") for k in state):
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        return visual, state.get("logit_scale")
    return dict(state), state.get("logit_scale")


def open_clip_visual(model_name: str, checkpoint: str | Path | None = None) -> tuple[nn.Module, torch.Tensor | None]:
    """open_clip's vision tower for `model_name` (weights from `checkpoint`, else random) and the
    checkpoint's logit_scale. The text tower is built by open_clip and then dropped: PixCLIP's text
    side is the adaptor over cached LLM features."""
    import open_clip

    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; known: {open_clip.list_models()[:8]}...")
    clip = open_clip.create_model(model_name, pretrained=None)
    visual, scale = clip.visual, None
    if checkpoint:
        state, scale = split_open_clip_state(read_state_dict(checkpoint))
        missing, unexpected = visual.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} does not fit open_clip {model_name}'s vision tower: "
                f"missing={missing[:5]} unexpected={unexpected[:5]}"
            )
    del clip
    return visual, scale


def detach_projection(visual: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(tower whose forward ends at the pooled features, projection module or None).

    open_clip ViT: PixCLIP itself turns `proj` into a Linear, so nothing to do here. open_clip
    `TimmModel`: the projection is the trunk's classifier head (EVA02 configs) or `visual.head.proj`.
    """
    if is_open_clip_vit(visual):
        return visual, None
    trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
    if trunk is None:
        raise ValueError(f"unsupported open_clip vision tower {type(visual).__name__}")
    extra = list(head.named_children()) if head is not None else []
    if any(name not in ("drop", "proj") for name, _ in extra):
        raise ValueError(f"open_clip vision head {[n for n, _ in extra]} (attention pool / MLP) is not supported")
    if "proj" in dict(extra):
        proj = head.proj
    else:
        proj = trunk.get_classifier()
        if not isinstance(proj, nn.Linear):
            raise ValueError("open_clip timm trunk has no linear projection head")
    trunk.reset_classifier(0)  # keeps the trunk's pooling; forward_head(pre_logits=True) = pooled features
    return trunk, proj


def from_open_clip(
    model_name: str,
    checkpoint: str | Path | None = None,
    text_dim: int = 4096,
    adaptor_layers: int = 4,
    adaptor_hidden: int = 2048,
    adaptor_checkpoint: str | Path | None = None,
) -> PixCLIP:
    """PixCLIP on open_clip's `model_name` with the weights of a local `checkpoint`, projection and
    temperature kept. `adaptor_checkpoint` (a state dict of `text_adaptor` keys, with or without that
    prefix) loads a trained text adaptor; otherwise the adaptor starts random."""
    visual, scale = open_clip_visual(model_name, checkpoint)
    tower, proj = detach_projection(visual)
    model = PixCLIP(
        tower,
        text_dim=text_dim,
        adaptor_layers=adaptor_layers,
        adaptor_hidden=adaptor_hidden,
        visual_proj=proj,
    )
    if scale is not None:
        with torch.no_grad():
            model.logit_scale.copy_(scale.reshape(()))
    if adaptor_checkpoint:
        state = read_state_dict(adaptor_checkpoint)
        state = {k.removeprefix("text_adaptor."): v for k, v in state.items()}
        model.text_adaptor.load_state_dict(state)
    return model


def open_clip_image_size(model_name: str) -> int:
    """The input resolution of an open_clip model (224 for EVA02-B-16, 336 for EVA02-L-14-336)."""
    import open_clip

    size: Any = open_clip.get_model_config(model_name)["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)
