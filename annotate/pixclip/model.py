"""PixCLIP: a ViT with a parallel, zero-initialised mask patch embedding, plus a text adaptor.

F = Enc(Conv_I(I) + Conv_M(M) + P)  (paper eq. 1). The mask branch is spliced in by wrapping the ViT's
own patch embedding, so the rest of the tower's forward (position embedding, blocks, norm, pooling) is
reused unchanged. Two tower kinds are supported:
- timm ViTs (VisionTransformer, Eva/EVA02; open_clip's EVA02 models are a timm trunk): `patch_embed`
  is wrapped by `MaskPatchEmbed`;
- open_clip's own `VisionTransformer` (ViT-B-16, ViT-L-14...): `conv1` is wrapped by `MaskConv`.
The image and the mask travel as one 4-channel tensor, which keeps the wrappers stateless.
`visual_proj` maps pooled features to the joint space; `from_open_clip` (open_clip_models.py) fills it
with the pretrained CLIP projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from annotate.pixclip.loss import patch_coverage, region_pool

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


class MaskConv(nn.Module):
    """open_clip `VisionTransformer.conv1` plus the zero-initialised mask conv, NCHW in and out."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.image_conv = conv
        self.mask_proj = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, bias=False)
        nn.init.zeros_(self.mask_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.image_conv(x[:, :3])
        return out + self.mask_proj((x[:, 3:4] - MASK_MEAN) / MASK_STD).to(out.dtype)


def is_open_clip_vit(vision: nn.Module) -> bool:
    """open_clip's own VisionTransformer (conv1 + class_embedding), as opposed to a timm model."""
    return hasattr(vision, "conv1") and hasattr(vision, "class_embedding")


def adaptor_mlp(text_dim: int, hidden: int, embed_dim: int, layers: int) -> nn.Sequential:
    """LLM2CLIP-style projector from the frozen text encoder's space into the joint space."""
    mods: list[nn.Module] = [nn.LayerNorm(text_dim)]
    width = text_dim
    for _ in range(max(layers - 1, 0)):
        mods += [nn.Linear(width, hidden), nn.GELU()]
        width = hidden
    mods.append(nn.Linear(width, embed_dim))
    return nn.Sequential(*mods)


class ResidualBlock(nn.Module):
    """x + MLP(LN(x)), width x2: one block of LLM2CLIP's text adaptor. Attribute names and the
    Sequential indices (fn.0, fn.3) follow LLM2CLIP's checkpoint keys so its adaptor loads as is."""

    def __init__(self, dim: int, expansion: int = 2):
        super().__init__()
        # Dropout(0) only keeps the second Linear at index 3, where the checkpoint has it.
        self.fn = nn.Sequential(nn.Linear(dim, expansion * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(expansion * dim, dim))
        self.ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.ln(x))


def llm2clip_adaptor(text_dim: int, embed_dim: int, blocks: int = 4) -> nn.Sequential:
    """LLM2CLIP's adaptor from LLM2Vec features (4096 for Llama-3-8B) into the CLIP space."""
    return nn.Sequential(*[ResidualBlock(text_dim) for _ in range(blocks)], nn.LayerNorm(text_dim), nn.Linear(text_dim, embed_dim))


@dataclass
class Branches:
    """One batch's features, unnormalised, per branch of the paper's loss (`PixCLIPLoss`)."""

    main: torch.Tensor  # e_v: the mask-conditioned image embedding
    text: torch.Tensor  # e_t: the text embedding
    crop: torch.Tensor | None = None  # v_c: the crop branch's embedding (L_FC)
    local: torch.Tensor | None = None  # f'_v: region-pooled dense features of the all-ones-mask pass (L_LG)
    short: torch.Tensor | None = None  # the short texts' embeddings (MulCLIP's short-text branch)
    negatives: torch.Tensor | None = None  # (B, 1+K, E): each region's description, then its hard negatives
    negative_mask: torch.Tensor | None = None  # (B, 1+K): which of those texts exist
    negative_logit_scale: torch.Tensor | None = None  # the hard-negative branch's own temperature (log)
    part: torch.Tensor | None = None  # (P, E): each part's mask-conditioned embedding, on its region's image
    part_text: torch.Tensor | None = None  # (P, 2, E): its short and long texts' embeddings
    part_text_mask: torch.Tensor | None = None  # (P, 2): which of those texts exist


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
        visual_proj: nn.Module | None = None,
        adaptor_kind: str = "mlp",
    ):
        """`visual_proj`: the tower's pretrained projection (pooled width -> embed_dim); random if None."""
        super().__init__()
        self.open_clip_vit = is_open_clip_vit(vision)
        if self.open_clip_vit:
            if getattr(vision, "attn_pool", None) is not None:
                raise ValueError("open_clip towers with attentional pooling are not supported")
            vision.conv1 = MaskConv(vision.conv1)
            vision.output_tokens = True  # forward returns (pooled, ln_post'd patch tokens)
            width = vision.ln_post.normalized_shape[0]
            if vision.proj is not None:  # the CLIP projection becomes visual_proj (same weights)
                if visual_proj is None:
                    visual_proj = nn.Linear(width, vision.proj.shape[1], bias=False)
                    with torch.no_grad():
                        visual_proj.weight.copy_(vision.proj.T)
                vision.proj = None
        else:
            vision.patch_embed = MaskPatchEmbed(vision.patch_embed)
            width = vision.num_features
        self.visual = vision
        self.visual_proj = visual_proj if visual_proj is not None else nn.Linear(width, embed_dim, bias=False)
        embed_dim = self.visual_proj.weight.shape[0]
        if adaptor_kind == "llm2clip":
            self.text_adaptor = llm2clip_adaptor(text_dim, embed_dim, adaptor_layers)
        else:
            self.text_adaptor = adaptor_mlp(text_dim, adaptor_hidden, embed_dim, adaptor_layers)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.text_dim = text_dim
        self.adaptor_kind, self.adaptor_layers, self.adaptor_hidden = adaptor_kind, adaptor_layers, adaptor_hidden
        self.adaptor_pretrained = False

    @property
    def embed_dim(self) -> int:
        return int(self.visual_proj.weight.shape[0])

    def shape_settings(self) -> dict:
        """The `train:` settings that rebuild this model's shape (recorded in run.json, so that evaluation
        rebuilds a model whose widths came from a checkpoint file without that file)."""
        return {"embed_dim": self.embed_dim, "adaptor_kind": self.adaptor_kind,
                "adaptor_layers": self.adaptor_layers, "adaptor_hidden": self.adaptor_hidden}

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.visual, "num_prefix_tokens", 0))

    @property
    def mask_conv(self) -> nn.Conv2d:
        return self.visual.conv1.mask_proj if self.open_clip_vit else self.visual.patch_embed.mask_proj

    @property
    def grid_size(self) -> tuple[int, int]:
        if self.open_clip_vit:
            return tuple(self.visual.grid_size)
        return tuple(self.visual.patch_embed.grid_size)

    @property
    def patch_size(self) -> int:
        return int(self.mask_conv.kernel_size[0])

    def forward_visual(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embedding (B, E), projected, and dense patch tokens (B, P, C), not yet projected."""
        x = torch.cat([image, mask.to(image.dtype)], dim=1)
        if self.open_clip_vit:
            pooled, tokens = self.visual(x)  # tokens: patch tokens only, after ln_post
            return self.visual_proj(pooled), tokens
        tokens = self.visual.forward_features(x)
        pooled = self.visual.forward_head(tokens, pre_logits=True)
        return self.visual_proj(pooled), tokens[:, self.num_prefix_tokens :]

    def forward(
        self, image: torch.Tensor, mask: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embedding, dense tokens, text embedding), unnormalised: one call, so DDP sees it all."""
        emb, dense = self.forward_visual(image, mask)
        return emb, dense, self.encode_text(text_features, normalize=False)

    def branch_features(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        text_features: torch.Tensor,
        crop_image: torch.Tensor | None = None,
        crop_mask: torch.Tensor | None = None,
        local_tau: float | None = None,
        forward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
        short_text: torch.Tensor | None = None,
        negative_text: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
        part_mask: torch.Tensor | None = None,
        part_index: torch.Tensor | None = None,
        part_text: torch.Tensor | None = None,
        part_text_mask: torch.Tensor | None = None,
    ) -> Branches:
        """The three branches of one batch, as `PixCLIPLoss` compares them: the main pass (I, M), the
        crop pass (I', M') when a crop is given, and the all-ones-mask pass (I, 1) region-pooled with
        temperature `local_tau` when one is given. All passes go through one forward, so that DDP
        sees them all: `forward` is the module that runs it (the DDP wrapper in training; this model
        when None). Parts: `part_mask` (P, 1, H, W) on the image `part_index` (P,) names, in the same
        forward as the image's other masks; `part_text` (P, 2, D) their short and long texts."""
        forward = forward or self
        n = image.shape[0]
        parts = part_mask is not None
        p = part_mask.shape[0] if parts else 0
        # Short texts (B, D) and each region's 1+K texts (B, 1+K, D) go through the adaptor in the
        # same forward as the main texts, then are split off again.
        texts = [text_features]
        if short_text is not None:
            texts.append(short_text)
        if negative_text is not None:
            texts.append(negative_text.flatten(0, 1))
        if parts:
            texts.append(part_text.flatten(0, 1))
        images, masks = [image], [mask]
        if crop_image is not None:
            images.append(crop_image)
            masks.append(crop_mask)
        if local_tau is not None:
            images.append(image)
            masks.append(torch.ones_like(mask))
        if parts:  # index_select, not image[part_index]: no value-dependent indexing
            images.append(torch.index_select(image, 0, part_index))
            masks.append(part_mask.to(mask.dtype))
        emb, dense, text = forward(torch.cat(images), torch.cat(masks), torch.cat(texts))
        extra = {}
        if parts:
            extra["part"] = emb[emb.shape[0] - p:]  # the parts ride last: split them off first
            extra["part_text"] = text[text.shape[0] - 2 * p:].unflatten(0, (p, 2))
            extra["part_text_mask"] = part_text_mask.bool()
            emb, dense, text = emb[: emb.shape[0] - p], dense[: dense.shape[0] - p], text[: text.shape[0] - 2 * p]
        if short_text is not None:
            extra["short"] = text[n : 2 * n]
        if negative_text is not None:
            extra["negatives"] = text[-negative_text.shape[0] * negative_text.shape[1]:].unflatten(0, negative_text.shape[:2])
            extra["negative_mask"] = negative_mask.bool()
            extra["negative_logit_scale"] = self.negative_logit_scale
        text = text[:n]
        crop = emb[n : 2 * n] if crop_image is not None else None
        local = None
        if local_tau is not None:
            cover = patch_coverage(mask, self.patch_size)
            local = self.visual_proj(region_pool(dense[-n:], cover.to(dense.dtype), local_tau))
        return Branches(main=emb[:n], text=text, crop=crop, local=local, **extra)

    def add_negative_temperature(self, init: float) -> None:
        """The hard-negative branch's own learnable temperature (log scale), added only when the branch
        is on, so checkpoints of runs without it keep their exact state dict."""
        self.negative_logit_scale = nn.Parameter(torch.tensor(float(init)))

    def encode_image(self, image: torch.Tensor, mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb, _ = self.forward_visual(image, mask)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, text_features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The adaptor reads the frozen encoder's feature L2-normalised, as LLM2CLIP's `TextProj.forward`
        does (`l2_norm=True`, microsoft/LLM2CLIP `llm2clip/eva_clip/model.py`): its residual blocks are
        not scale-invariant, so a raw LLM2Vec mean (norm ~60) would land elsewhere in the joint space.
        Normalising here covers every caller (training, evaluation, scoring) whatever they pass."""
        emb = self.text_adaptor(F.normalize(text_features, dim=-1))
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
