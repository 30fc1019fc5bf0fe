"""A Gemma-2 language model with a separate CLIP vision tower and an MLP projector, LLaVA style.

The vision tower is loaded from the folder that `config.mm_vision_tower` names (as in LLaVA and
Griffon-G); `generate(input_ids, images=...)` splices each image's patch features in place of its
IMAGE_TOKEN_INDEX placeholder and generates from the embeddings.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, CLIPImageProcessor, CLIPVisionModel, Gemma2Config
from transformers import Gemma2ForCausalLM

from griffon.constants import IMAGE_TOKEN_INDEX


class GriffonGemma2Config(Gemma2Config):
    model_type = "gemma2_Griffon"


class CLIPVisionTower(nn.Module):
    def __init__(self, path: str, select_layer: int = -2):
        super().__init__()
        self.path = path
        self.select_layer = select_layer
        self.is_loaded = False

    def load_model(self) -> None:
        self.image_processor = CLIPImageProcessor.from_pretrained(self.path)
        self.vision_tower = CLIPVisionModel.from_pretrained(self.path)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    @property
    def num_patches(self) -> int:
        config = self.vision_tower.config
        return (config.image_size // config.patch_size) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(images.to(self.vision_tower.dtype), output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]  # patch features, CLS dropped


class GriffonGemma2ForCausalLM(Gemma2ForCausalLM):
    config_class = GriffonGemma2Config

    def __init__(self, config):
        super().__init__(config)
        self._vision_tower = CLIPVisionTower(config.mm_vision_tower)
        self.mm_projector = nn.Sequential(
            nn.Linear(config.mm_hidden_size, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size))

    def get_vision_tower(self) -> CLIPVisionTower:
        return self._vision_tower

    def _embed(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        ids = input_ids[0]
        spots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        text = self.get_input_embeddings()(ids.clamp(min=0))
        if not spots:
            return text[None]
        tower = self.get_vision_tower()
        features = self.mm_projector(tower(images).to(text.dtype))
        if len(spots) != features.shape[0]:
            raise ValueError(f"{len(spots)} image placeholders but {features.shape[0]} images")
        pieces, start = [], 0
        for spot, feature in zip(spots, features):
            pieces += [text[start:spot], feature]
            start = spot + 1
        pieces.append(text[start:])
        return torch.cat(pieces)[None]

    @torch.no_grad()
    def generate(self, input_ids=None, images=None, **kwargs):
        if input_ids is None or input_ids.shape[0] != 1:
            raise ValueError("this model generates for one prompt at a time")
        embeds = self._embed(input_ids, images)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return super().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


AutoConfig.register("gemma2_Griffon", GriffonGemma2Config, exist_ok=True)
AutoModelForCausalLM.register(GriffonGemma2Config, GriffonGemma2ForCausalLM, exist_ok=True)
