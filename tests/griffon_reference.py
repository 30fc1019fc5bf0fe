"""A plain torch/transformers forward pass of Griffon-G, the reference the vLLM model is tested against.

It follows jefferyZhan/Griffon's own inference path, step by step, with transformers' modules and none
of vLLM's (nor annotate.engines.griffon_*):
  * prompt: the ``gemma_instruct`` conversation (griffon/conversation.py) with ``<image>\\n`` + query as
    the user's message (griffon/eval/run_griffon.py), tokenized by ``tokenizer_image_token``
    (griffon/mm_utils.py, copied below): the text split on ``<image>``, each chunk tokenized
    alone, IMAGE_TOKEN_INDEX (-200) between them, one BOS kept;
  * pixels: ``transforms.Resize((s, s))`` then the folder's ``CLIPImageProcessor`` (run_griffon.process_images);
  * features: transformers' ``CLIPVisionModel``, ``hidden_states[mm_vision_select_layer][:, 1:]``
    (multimodal_encoder/clip_encoder.py), then ``ConvProjector`` (multimodal_projector/builder.py);
  * ``prepare_inputs_labels_for_multimodal`` (model/griffon_arch.py): token embeddings with each -200
    replaced by the image's features; transformers >= 4.45's Gemma2Model (Griffon's pin) multiplied
    all of ``inputs_embeds`` by sqrt(hidden_size): transformers 5 scales inside ``embed_tokens``
    instead, so the features are scaled here by hand;
  * transformers' ``Gemma2ForCausalLM`` (eager attention, as griffon/model/builder.py loads it).
Weights are read from the checkpoint folder by their published names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

IMAGE_TOKEN_INDEX = -200
ROLES = ("<start_of_turn>user\n", "<start_of_turn>model\n")  # gemma_instruct
SEP = "<end_of_turn>\n"


def griffon_prompt(query: str, n_images: int = 1) -> str:
    """conv_templates['gemma_instruct'] with one user message and the model's open turn."""
    return ROLES[0] + "<image>\n" * n_images + query + SEP + ROLES[1]


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    """griffon/mm_utils.py tokenizer_image_token, as published."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


class ConvProjector(nn.Module):
    """multimodal_projector/builder.py ConvProjector."""

    def __init__(self, inchannel: int, outchannel: int):
        super().__init__()
        self.conv = nn.Conv2d(inchannel, outchannel, stride=2, kernel_size=3, padding=1)
        self.linear = nn.Linear(outchannel, outchannel)
        self.hidden = outchannel
        self.gelu = nn.GELU()

    def forward(self, x):
        B, N, C = x.shape
        HW = int(math.sqrt(N))
        x = x.permute(0, 2, 1).reshape(-1, C, HW, HW)
        out = self.gelu(self.conv(x))
        out = out.reshape(B, self.hidden, -1).permute(0, 2, 1)
        return self.linear(out)


class GriffonReference:
    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file
        from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, Gemma2Config,
                                  Gemma2ForCausalLM)

        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        self.cfg = cfg
        weights = load_file(str(folder / "model.safetensors"))

        def take(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

        self.tower = CLIPVisionModel(CLIPVisionConfig(**cfg["vision_config"], attn_implementation="eager")).eval()
        _load(self.tower, take("model.vision_tower.vision_tower.vision_model."))
        self.projector = ConvProjector(cfg["mm_hidden_size"], cfg["hidden_size"]).eval()
        _load(self.projector, take("model.mm_projector."))
        text = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "vision_config")}
        self.lm = Gemma2ForCausalLM(Gemma2Config(**text, attn_implementation="eager")).eval()
        lm_weights = {k: v for k, v in weights.items() if k.startswith(("model.embed_tokens.", "model.layers.",
                                                                         "model.norm.", "lm_head."))}
        _load(self.lm, lm_weights)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.image_processor = CLIPImageProcessor.from_pretrained(folder)
        self.select_layer = cfg["mm_vision_select_layer"]

    def pixels(self, image):
        from torchvision import transforms

        size = self.image_processor.size["shortest_edge"]
        resized = transforms.Resize((size, size))(image.convert("RGB"))
        return self.image_processor.preprocess(resized, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def image_features(self, image) -> torch.Tensor:
        out = self.tower(self.pixels(image), output_hidden_states=True)
        patches = out.hidden_states[self.select_layer][:, 1:]
        return self.projector(patches)[0]

    def input_ids(self, query: str) -> list[int]:
        return tokenizer_image_token(griffon_prompt(query), self.tokenizer)

    @torch.no_grad()
    def embeds(self, ids: list[int], features: torch.Tensor) -> torch.Tensor:
        """Token embeddings (scaled by embed_tokens) with each -200 replaced by the scaled features."""
        scale = torch.tensor(self.cfg["hidden_size"] ** 0.5, dtype=features.dtype)
        parts, chunk = [], []
        for token in ids + [None]:
            if token is None or token == IMAGE_TOKEN_INDEX:
                if chunk:
                    parts.append(self.lm.get_input_embeddings()(torch.tensor(chunk)))
                    chunk = []
                if token is not None:
                    parts.append(features * scale)
            else:
                chunk.append(token)
        return torch.cat(parts)[None]

    @torch.no_grad()
    def generate(self, image, query: str, steps: int) -> tuple[list[int], torch.Tensor, int]:
        """Greedy tokens (no stop), the first step's logits, and the prompt length the LM sees."""
        features = self.image_features(image)
        embeds = self.embeds(self.input_ids(query), features)
        prompt_len = embeds.shape[1]
        tokens, first = [], None
        for _ in range(steps):  # whole-sequence forwards: no cache to get wrong
            logits = self.lm(inputs_embeds=embeds).logits[0, -1]
            first = logits if first is None else first
            token = int(logits.argmax())
            tokens.append(token)
            embeds = torch.cat([embeds, self.lm.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        return tokens, first, prompt_len


def _load(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{type(module).__name__}: missing {missing}, unexpected {unexpected}")
