"""Griffon-G's config class and image processing, as its public code defines them (no vLLM here).

Facts, read in jefferyZhan/Griffon at 9866875e7d18:
  * ``griffon/model/language_model/griffon_gemma.py``: ``GriffonGemma2Config(Gemma2Config)`` with
    ``model_type = "gemma2_Griffon"``, registered with AutoConfig only when that package is imported;
    ``GriffonGemma2ForCausalLM`` = Gemma-2 + ``GriffonMetaModel`` (vision tower + ``mm_projector``)
    with its own ``lm_head`` Linear.
  * ``griffon/model/multimodal_encoder/clip_encoder.py``: the tower is transformers'
    ``CLIPVisionModel`` (``self.vision_tower``, so checkpoint names are
    ``model.vision_tower.vision_tower.vision_model.*``), features = ``hidden_states[mm_vision_select_layer]``
    with the CLS token dropped (``mm_vision_select_feature`` 'patch').
  * ``scripts/gemma2/{alignment,pretrain,sft}.sh``: tower ``clip-vit-large-path14-336_to_1022`` (README.md:
    a CLIP ViT-L/14 whose checkpoint is already at 1022 px: 1022 = 73 x 14, so 73^2 + 1 = 5330 position
    embeddings are stored, and ``CLIPVisionModel.from_pretrained`` uses them as they are; no
    interpolation at run time), ``--mm_projector_type conv_reduce``, ``--mm_vision_select_layer -2``,
    ``--image_aspect_ratio square``, ``--mm_use_im_start_end False --mm_use_im_patch_token False``.
  * ``griffon/model/multimodal_projector/builder.py`` ``ConvProjector``: ``conv`` = Conv2d(mm_hidden,
    hidden, kernel 3, stride 2, padding 1) on the patch grid, GELU, then ``linear`` = Linear(hidden,
    hidden): grid 73 -> 37, so one image is 37^2 = 1369 tokens (``griffon/train/train.py``: "prior = 37
    # 1022 14"; ``griffon/model/builder.py`` removes 1369 tokens for its "image-token" variant).
  * ``griffon/eval/run_griffon.py`` ``process_images``: ``transforms.Resize((s, s))`` (a stretch to the
    square, no padding; s = the image processor's shortest_edge), then ``CLIPImageProcessor.preprocess``
    (a no-op resize/crop at s, rescale 1/255, CLIP mean/std).
  * ``griffon/pyproject.toml`` pins ``transformers>=4.45``: that Gemma2Model.forward multiplies the whole
    ``inputs_embeds`` by sqrt(hidden_size), so the spliced image features are scaled as token embeddings are.
"""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, Gemma2Config

DEFAULT_IMAGE_TOKEN = "<image>"  # griffon/constants.py
IMAGE_TOKEN_INDEX = -200  # griffon/constants.py: the id tokenizer_image_token puts for each <image>
MODEL_TYPE = "gemma2_Griffon"
ARCHITECTURE = "GriffonGemma2ForCausalLM"

# CLIP ViT-L/14 (openai/clip-vit-large-patch14-336's config) at Griffon's 1022 px: what the published
# checkpoint's tower is when its config.json carries no `vision_config` of its own.
VIT_L14_1022: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
    image_size=1022, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768, num_channels=3)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class GriffonGemma2Config(Gemma2Config):
    """Griffon's config: Gemma-2's keys plus LLaVA's ``mm_*`` keys (kept as plain attributes), and a
    ``vision_config`` built from the checkpoint's ``vision_config`` dict or, absent one, ViT-L/14 at 1022.
    Module level, so that vLLM can pickle it to its engine-core process."""

    model_type = MODEL_TYPE

    def __init__(self, vision_config: dict | CLIPVisionConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(vision_config, CLIPVisionConfig):
            vision_config = vision_config.to_dict()
        self.vision_config = CLIPVisionConfig(**{**VIT_L14_1022, **(vision_config or {})})

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if isinstance(out.get("vision_config"), CLIPVisionConfig):
            out["vision_config"] = out["vision_config"].to_dict()
        return out


def register_config() -> None:
    """Let AutoConfig read ``model_type: gemma2_Griffon``. ``exist_ok``: this class replaces one that
    Griffon's own package registered in this process first."""
    from transformers import AutoConfig

    AutoConfig.register(MODEL_TYPE, GriffonGemma2Config, exist_ok=True)


def conv_out(size: int) -> int:
    """One side of ``conv_reduce``'s output grid: Conv2d(kernel 3, stride 2, padding 1)."""
    return (size + 2 * 1 - 3) // 2 + 1


def image_grid(config) -> int:
    """Patches per side of the tower's input (1022 / 14 = 73 for the published tower)."""
    vision = config.vision_config
    return vision.image_size // vision.patch_size


def num_image_tokens(config) -> int:
    """Tokens one image becomes: the projector's output grid (37^2 = 1369), not the 73^2 patches."""
    projector = getattr(config, "mm_projector_type", "conv_reduce")
    if projector != "conv_reduce":
        raise NotImplementedError(f"Griffon projector {projector!r}: only conv_reduce (Griffon-G's) is implemented")
    return conv_out(image_grid(config)) ** 2


def preprocess(images: list, image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """Pixel values as Griffon's run_griffon.process_images makes them: a stretch to ``image_size``
    square (torchvision's Resize on a PIL image is PIL's bilinear resize), rescale, CLIP normalisation."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for image in images:
        rgb = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        array = np.asarray(rgb, dtype=np.float32) / 255.0
        array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
        out.append(torch.from_numpy(array.transpose(2, 0, 1).copy()))
    return torch.stack(out) if out else torch.empty(0, 3, image_size, image_size)
