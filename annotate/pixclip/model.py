"""PixCLIP: a timm ViT with a parallel, zero-initialised mask patch embedding, plus a text adaptor.

F = Enc(Conv_I(I) + Conv_M(M) + P)  (paper eq. 1). The mask branch is spliced in by wrapping the ViT's
own `patch_embed`, so the rest of timm's forward (position embedding, blocks, norm, pooling) is
reused unchanged for any timm ViT family (VisionTransformer, Eva/EVA02). The image and the mask
travel as one 4-channel tensor, which keeps the wrapper stateless.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

# Alpha-CLIP normalises its alpha channel with mean 0.5, std 0.26.
MASK_MEAN = 0.5
MASK_STD = 0.26


class MaskPatchEmbed(nn.Module):
    """The ViT's patch embedding plus a 1-channel conv of the same kernel/stride, no bias, zero init."""

    def __init__(self, patch_embed: nn.Module):
        super().__init__()
        self.image_embed = patch_embed
        proj = patch_embed.proj
        self.mask_proj = nn.Conv2d(1, proj.out_channels, proj.kernel_size, proj.stride, bias=False)
        nn.init.zeros_(self.mask_proj.weight)  # step 0 behaves exactly like the original ViT

    def __getattr__(self, name: str) -> Any:
        # timm reads grid_size, num_patches, feat_ratio... off `patch_embed`; forward them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["image_embed"], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image, mask = x[:, :3], x[:, 3:4]
        out = self.image_embed(image)
        m = self.mask_proj((mask - MASK_MEAN) / MASK_STD)
        # Added after the image embed's own output layout (NLC, or NHWC for dynamic sizes); ViT-B and
        # EVA02 have no norm inside patch_embed, so this is exactly Conv_I(I) + Conv_M(M).
        m = m.flatten(2).transpose(1, 2) if out.ndim == 3 else m.permute(0, 2, 3, 1)
        return out + m.to(out.dtype)


def adaptor_mlp(text_dim: int, hidden: int, embed_dim: int, layers: int) -> nn.Sequential:
    """LLM2CLIP-style projector from the frozen text encoder's space into the joint space."""
    mods: list[nn.Module] = [nn.LayerNorm(text_dim)]
    width = text_dim
    for _ in range(max(layers - 1, 0)):
        mods += [nn.Linear(width, hidden), nn.GELU()]
        width = hidden
    mods.append(nn.Linear(width, embed_dim))
    return nn.Sequential(*mods)


class PixCLIP(nn.Module):
    """Mask-conditioned image tower + trainable text adaptor over cached frozen text features."""

    def __init__(
        self,
        vision: nn.Module,
        text_dim: int,
        embed_dim: int = 512,
        adaptor_layers: int = 4,
        adaptor_hidden: int = 2048,
        logit_scale_init: float = 4.0652,
    ):
        super().__init__()
        vision.patch_embed = MaskPatchEmbed(vision.patch_embed)
        self.visual = vision
        self.visual_proj = nn.Linear(vision.num_features, embed_dim, bias=False)
        self.text_adaptor = adaptor_mlp(text_dim, adaptor_hidden, embed_dim, adaptor_layers)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.text_dim = text_dim

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.visual, "num_prefix_tokens", 0))

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.visual.patch_embed.grid_size)

    @property
    def patch_size(self) -> int:
        return int(self.visual.patch_embed.image_embed.proj.kernel_size[0])

    def forward_visual(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embedding (B, E), projected, and dense patch tokens (B, P, C), not yet projected."""
        tokens = self.visual.forward_features(torch.cat([image, mask.to(image.dtype)], dim=1))
        pooled = self.visual.forward_head(tokens, pre_logits=True)
        return self.visual_proj(pooled), tokens[:, self.num_prefix_tokens :]

    def forward(
        self, image: torch.Tensor, mask: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embedding, dense tokens, text embedding), unnormalised: one call, so DDP sees it all."""
        emb, dense = self.forward_visual(image, mask)
        return emb, dense, self.encode_text(text_features, normalize=False)

    def encode_image(self, image: torch.Tensor, mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb, _ = self.forward_visual(image, mask)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, text_features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.text_adaptor(text_features)
        return F.normalize(emb, dim=-1) if normalize else emb


def create_vision(
    name: str, image_size: int, checkpoint: str | None = None, **kwargs: Any
) -> nn.Module:
    """A timm ViT with no classifier head; weights from a local file, else random init (no downloads)."""
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **kwargs)
    if checkpoint:
        if checkpoint.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(checkpoint)
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state))
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("head")]:
            raise ValueError(f"vision checkpoint mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    return model


def build_pixclip(cfg: Any, text_dim: int) -> PixCLIP:
    """Build from a `TrainConfig` (duck-typed, so this library does not import the app config)."""
    vision = create_vision(cfg.vision_model, cfg.image_size, cfg.vision_checkpoint, **cfg.vision_kwargs)
    return PixCLIP(
        vision,
        text_dim=text_dim,
        embed_dim=cfg.embed_dim,
        adaptor_layers=cfg.adaptor_layers,
        adaptor_hidden=cfg.adaptor_hidden,
        logit_scale_init=cfg.logit_scale_init,
    )
