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
`adaptor_kind="llm2clip"`, and PixCLIP then starts from LLM2CLIP's full alignment. Shapes are read
from the file (`layout.py`): LLM2CLIP's EVA02-CLIP-B-16 projects into 1280 dims (open_clip's
EVA02-B-16 config says 512), and its adaptor's depth and LLM2Vec width are whatever it was trained
with. tests/test_pixclip_llm2clip.py checks PixCLIP at init against LLM2CLIP's own module structure.

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

from annotate.pixclip.layout import (
    ADAPTOR_PREFIX,
    adaptor_layout,
    adaptor_state,
    projection_width,
    read_state_dict,
    split_open_clip_state,
)
from annotate.pixclip.model import PixCLIP, is_open_clip_vit

# The backbones the paper and LLM2CLIP use; any open_clip ViT / timm-trunk model name works.
PAPER_MODELS = ("EVA02-B-16", "EVA02-L-14", "EVA02-L-14-336", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")


def _eva_clip_to_timm(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """EVA-CLIP key names (LLM2CLIP, EVA-CLIP releases) -> timm Eva names, by timm's own filter."""
    from timm.models.eva import Eva, checkpoint_filter_fn

    if not isinstance(trunk, Eva) or any(k.startswith("trunk.") for k in state):
        return state
    return {"trunk." + k: v for k, v in checkpoint_filter_fn(state, trunk).items()}


def open_clip_visual(
    model_name: str, checkpoint: str | Path | None = None, embed_dim: int | None = None
) -> tuple[nn.Module, torch.Tensor | None, dict]:
    """open_clip's vision tower for `model_name` (weights from `checkpoint`, else random), the
    checkpoint's logit_scale and its whole state dict (for the adaptor). The text tower is built by
    open_clip and then dropped: PixCLIP's text side is the adaptor over cached LLM features.

    The joint-space width is the checkpoint's own (its projection's output width: 1280 for LLM2CLIP's
    EVA02-B/16, 512 for open_clip's), else `embed_dim`, else the registered config's; a checkpoint
    whose width contradicts an explicit `embed_dim` is refused."""
    import open_clip

    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; known: {open_clip.list_models()[:8]}...")
    full = read_state_dict(checkpoint) if checkpoint else {}
    state, scale = split_open_clip_state(full) if full else ({}, None)
    width = projection_width(state)
    if width is not None and embed_dim is not None and width != embed_dim:
        raise ValueError(f"{checkpoint} projects into {width} dims but train.embed_dim is {embed_dim}: "
                         "leave embed_dim unset to take the checkpoint's")
    width = width or embed_dim
    override = {"embed_dim": width} if width and width != config["embed_dim"] else {}
    clip = open_clip.create_model(model_name, pretrained=None, **override)
    visual = clip.visual
    if full:
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
    adaptor_layers: int | None = None,
    adaptor_hidden: int | None = None,
    adaptor_checkpoint: str | Path | None = None,
    adaptor_kind: str | None = None,
    embed_dim: int | None = None,
    logit_scale_init: float | None = None,
) -> PixCLIP:
    """PixCLIP on open_clip's `model_name` with the weights of a local `checkpoint` (open_clip or
    EVA-CLIP/LLM2CLIP format), projection and temperature kept. A text adaptor is loaded from
    `adaptor_checkpoint`, or from `checkpoint` itself when it holds one (LLM2CLIP's
    `text.text_adaptor.*`); otherwise the adaptor starts random.

    Shapes come from the files (`layout.py`): the joint width from the projection, the adaptor's
    kind, depth and widths from its tensors. An argument left None takes the file's value (or the
    fresh-model default: mlp, 4 layers, 2048 hidden); one given explicitly must agree with the file.
    `logit_scale_init`, when given, replaces the checkpoint's temperature (the user asked for it);
    None keeps the checkpoint's, or 4.0652 for a random tower."""
    visual, scale, full = open_clip_visual(model_name, checkpoint, embed_dim)
    tower, proj = detach_projection(visual)
    source = read_state_dict(adaptor_checkpoint) if adaptor_checkpoint else None
    if source is None and any(k.startswith(ADAPTOR_PREFIX) for k in full):
        source = full
    shape = dict(adaptor_kind=adaptor_kind or "mlp", adaptor_layers=adaptor_layers or 4, adaptor_hidden=adaptor_hidden or 2048)
    if source is not None:
        shape = _adaptor_shape(adaptor_state(source), text_dim, adaptor_kind, adaptor_layers, adaptor_hidden)
    if scale is not None and logit_scale_init is None:
        logit_scale_init = float(scale.reshape(()))
    model = PixCLIP(tower, text_dim=text_dim, visual_proj=proj,
                    logit_scale_init=4.0652 if logit_scale_init is None else logit_scale_init, **shape)
    model.adaptor_pretrained = source is not None  # the trainer then fine-tunes it at lr_other
    if source is not None:
        try:
            model.text_adaptor.load_state_dict(adaptor_state(source))
        except RuntimeError as e:
            raise ValueError(f"text adaptor weights do not fit the image projection ({model.embed_dim} dims): {e}") from e
    return model


def _adaptor_shape(state: dict, text_dim: int, kind: str | None, layers: int | None, hidden: int | None) -> dict:
    """PixCLIP's adaptor arguments for a pretrained adaptor, checked against the explicit ones and
    against the text features it will read."""
    layout = adaptor_layout(state)
    if kind is not None and kind != layout.kind:
        raise ValueError(f"the checkpoint's text adaptor is {layout.kind!r}, not adaptor_kind={kind!r} "
                         f"(LLM2CLIP's adaptor needs adaptor_kind: llm2clip, or leave it unset)")
    if layers is not None and layers != layout.layers:
        raise ValueError(f"the checkpoint's text adaptor has {layout.layers} layers, not adaptor_layers={layers}")
    if layout.kind == "mlp" and hidden is not None and layout.hidden is not None and hidden != layout.hidden:
        raise ValueError(f"the checkpoint's text adaptor is {layout.hidden} wide, not adaptor_hidden={hidden}")
    if layout.text_dim != text_dim:
        raise ValueError(f"the checkpoint's text adaptor reads {layout.text_dim}-d features but the text features "
                         f"are {text_dim}-d: embed the texts with the encoder it was trained on (LLM2CLIP: LLM2Vec)")
    return dict(adaptor_kind=layout.kind, adaptor_layers=layout.layers, adaptor_hidden=layout.hidden or hidden or 2048)


def open_clip_image_size(model_name: str) -> int:
    """The input resolution of an open_clip model (224 for EVA02-B-16, 336 for EVA02-L-14-336)."""
    import open_clip

    size: Any = open_clip.get_model_config(model_name)["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)
