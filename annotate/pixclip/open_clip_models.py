"""PixCLIP on a pretrained open_clip model, its image-text alignment kept.

The paper fine-tunes an aligned CLIP (EVA02-CLIP) at 1e-7 with only the new mask conv at 1e-5, so
the CLIP projection and temperature must come with the tower: a random projection trained at 1e-7
would stay random. `from_open_clip` builds the open_clip model from its registered config (no
download: `pretrained=None`), loads a local checkpoint, and hands the vision tower, its projection
and its `logit_scale` to `PixCLIP`. Because the mask conv starts at zero, at init
`encode_image(image, mask, normalize=False)` equals open_clip's `encode_image(image)` for any mask.

LLM2CLIP releases (EVA-CLIP code base) use EVA-CLIP's own key names for the vision tower
(`visual.blocks.N.mlp.w1`...); they are converted with timm's EVA checkpoint filter (the one timm
uses for its EVA02-CLIP weights) into the open_clip EVA02 trunk. Their trained text adaptor
(`text.text_adaptor.*`, LLM2CLIP's residual MLP over LLM2Vec features) loads into
`adaptor_kind="llm2clip"`, and PixCLIP then starts from LLM2CLIP's full alignment.

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
    """(vision tower state, logit_scale) from a full open_clip / EVA-CLIP checkpoint (`visual.*`
    keys) or from a state dict of the vision tower alone (no prefix)."""
    if any(k.startswith("visual.") for k in state):
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        return visual, state.get("logit_scale")
    return dict(state), state.get("logit_scale")


ADAPTOR_PREFIX = "text.text_adaptor."  # LLM2CLIP's adaptor inside its CLIP checkpoint


def adaptor_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text adaptor's weights: LLM2CLIP's `text.text_adaptor.*` or ours `text_adaptor.*` (or bare)."""
    for prefix in (ADAPTOR_PREFIX, "text_adaptor."):
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    return dict(state)


def _eva_clip_to_timm(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """EVA-CLIP key names (LLM2CLIP, EVA-CLIP releases) -> timm Eva names, by timm's own filter."""
    from timm.models.eva import Eva, checkpoint_filter_fn

    if not isinstance(trunk, Eva) or any(k.startswith("trunk.") for k in state):
        return state
    return {"trunk." + k: v for k, v in checkpoint_filter_fn(state, trunk).items()}


def open_clip_visual(model_name: str, checkpoint: str | Path | None = None) -> tuple[nn.Module, torch.Tensor | None, dict]:
    """open_clip's vision tower for `model_name` (weights from `checkpoint`, else random), the
    checkpoint's logit_scale and its whole state dict (for the adaptor). The text tower is built by
    open_clip and then dropped: PixCLIP's text side is the adaptor over cached LLM features."""
    import open_clip

    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; known: {open_clip.list_models()[:8]}...")
    clip = open_clip.create_model(model_name, pretrained=None)
    visual, scale, full = clip.visual, None, {}
    if checkpoint:
        full = read_state_dict(checkpoint)
        state, scale = split_open_clip_state(full)
        if getattr(visual, "trunk", None) is not None:
            state = _eva_clip_to_timm(state, visual.trunk)
        missing, unexpected = visual.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} does not fit open_clip {model_name}'s vision tower: "
                f"missing={missing[:5]} unexpected={unexpected[:5]}"
            )
    del clip
    return visual, scale, full


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
    adaptor_kind: str = "mlp",
) -> PixCLIP:
    """PixCLIP on open_clip's `model_name` with the weights of a local `checkpoint` (open_clip or
    EVA-CLIP/LLM2CLIP format), projection and temperature kept. A text adaptor is loaded from
    `adaptor_checkpoint`, or from `checkpoint` itself when it holds one (LLM2CLIP's
    `text.text_adaptor.*`); otherwise the adaptor starts random."""
    visual, scale, full = open_clip_visual(model_name, checkpoint)
    tower, proj = detach_projection(visual)
    model = PixCLIP(
        tower,
        text_dim=text_dim,
        adaptor_layers=adaptor_layers,
        adaptor_hidden=adaptor_hidden,
        visual_proj=proj,
        adaptor_kind=adaptor_kind,
    )
    if scale is not None:
        with torch.no_grad():
            model.logit_scale.copy_(scale.reshape(()))
    source = read_state_dict(adaptor_checkpoint) if adaptor_checkpoint else None
    if source is None and any(k.startswith(ADAPTOR_PREFIX) for k in full):
        source = full
    model.adaptor_pretrained = source is not None  # the trainer then fine-tunes it at lr_other
    if source is not None:
        try:
            model.text_adaptor.load_state_dict(adaptor_state(source))
        except RuntimeError as e:
            raise ValueError(f"text adaptor weights do not fit adaptor_kind={adaptor_kind!r} "
                             f"(LLM2CLIP's adaptor needs adaptor_kind: llm2clip): {e}") from e
    return model


def open_clip_image_size(model_name: str) -> int:
    """The input resolution of an open_clip model (224 for EVA02-B-16, 336 for EVA02-L-14-336)."""
    import open_clip

    size: Any = open_clip.get_model_config(model_name)["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)
