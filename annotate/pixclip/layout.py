"""What a CLIP checkpoint file says about the model it was trained as: its joint-space width and its
text adaptor's shape, read from the tensors so that a checkpoint is built as what it is.

Why: LLM2CLIP's EVA02-CLIP-B-16 (microsoft/LLM2CLIP, `llm2clip/eva_clip/model_configs/EVA02-CLIP-B-16.json`,
`"embed_dim": 1280`) projects into a 1280-d space, where open_clip's registered EVA02-B-16 projects
into 512; building open_clip's config and loading the file fails on `trunk.head.weight`. The head's
width is the projection's output width: `visual.head.weight` (EVA-CLIP's `EVAVisionTransformer.head`,
`llm2clip/eva_clip/eva_vit_model.py`), `visual.trunk.head.weight` / `visual.head.proj.weight` (open_clip
TimmModel) or `visual.proj` (open_clip ViT, stored (width, embed)).

LLM2CLIP's adaptor (`TextProj.text_adaptor` in `llm2clip/eva_clip/model.py`, saved under
`text.text_adaptor.*`): `num_layers_text` `LinearBlock`s (`ln`, `fn.0` Linear(d, 2d), `fn.3` Linear(2d, d)),
then `nn.LayerNorm(d)` and `nn.Linear(d, embed_dim)`; `d` is the LLM2Vec width (4096 for Llama-3-8B).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

ADAPTOR_PREFIX = "text.text_adaptor."  # LLM2CLIP's adaptor inside its CLIP checkpoint


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


def adaptor_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text adaptor's weights: LLM2CLIP's `text.text_adaptor.*` or ours `text_adaptor.*` (or bare)."""
    for prefix in (ADAPTOR_PREFIX, "text_adaptor."):
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    return dict(state)


def projection_width(visual: dict[str, torch.Tensor]) -> int | None:
    """The joint-space width of a vision tower's state dict (keys without `visual.`), None if it has
    no projection (a bare trunk)."""
    for key in ("head.weight", "trunk.head.weight", "head.proj.weight", "trunk.head.proj.weight"):
        if key in visual and visual[key].ndim == 2:
            return int(visual[key].shape[0])
    if "proj" in visual and visual["proj"].ndim == 2:
        return int(visual["proj"].shape[1])
    return None


@dataclass(frozen=True)
class AdaptorLayout:
    """The shape of a text adaptor, as `PixCLIP` builds it."""

    kind: str  # "llm2clip" (residual blocks) or "mlp"
    layers: int  # llm2clip: residual blocks; mlp: Linear layers
    text_dim: int  # the frozen text encoder's width it reads
    embed_dim: int  # the joint space it writes
    hidden: int | None = None  # mlp only


def adaptor_layout(state: dict[str, torch.Tensor]) -> AdaptorLayout:
    """The layout of an adaptor state dict (bare keys, as `adaptor_state` returns them)."""
    if "0.ln.weight" in state and "0.fn.0.weight" in state:
        blocks = 0
        while f"{blocks}.ln.weight" in state:
            blocks += 1
        head = state.get(f"{blocks + 1}.weight")
        if head is None or head.ndim != 2:
            raise ValueError(f"LLM2CLIP adaptor with {blocks} blocks has no final Linear at index {blocks + 1}")
        return AdaptorLayout("llm2clip", blocks, int(state["0.ln.weight"].shape[0]), int(head.shape[0]))
    linears = sorted(int(k.split(".")[0]) for k, v in state.items() if k.endswith(".weight") and v.ndim == 2 and k.split(".")[0].isdigit())
    if "0.weight" in state and state["0.weight"].ndim == 1 and linears:
        first, last = state[f"{linears[0]}.weight"], state[f"{linears[-1]}.weight"]
        hidden = int(first.shape[0]) if len(linears) > 1 else None
        return AdaptorLayout("mlp", len(linears), int(state["0.weight"].shape[0]), int(last.shape[0]), hidden)
    raise ValueError(f"not a text adaptor state dict (keys {sorted(state)[:6]}...)")
