"""Griffon-G (``GriffonGemma2ForCausalLM``, model_type ``gemma2_Griffon``) as an out-of-tree vLLM model.

Built from vLLM 0.32's own parts, as its LLaVA model is: vLLM's CLIP vision model for the tower,
its Gemma-2 for the language model, LLaVA-style multimodal processing (one ``<image>`` placeholder
replaced by the projector's token count) and a ``WeightsMapper`` from the published checkpoint's
names, so that checkpoint loads unchanged. Architecture facts, with their paths in jefferyZhan/Griffon,
are in ``griffon_processing.py``; what this file adds:

  * Checkpoint names (``GriffonGemma2ForCausalLM`` = Gemma-2 with ``GriffonMetaModel`` mixed into
    ``model``): ``model.vision_tower.vision_tower.vision_model.*`` (CLIPVisionTower wraps transformers'
    CLIPVisionModel), ``model.mm_projector.conv.{weight,bias}`` and ``model.mm_projector.linear.{weight,bias}``
    (``ConvProjector``), ``model.{embed_tokens,layers,norm}.*`` (Gemma-2), ``lm_head.weight`` (its own
    Linear; dropped when the config ties it to the embeddings, as vLLM's Gemma-2 does).
  * ``prepare_inputs_labels_for_multimodal`` (griffon/model/griffon_arch.py) splices each image's 1369
    projected features where ``tokenizer_image_token`` (griffon/mm_utils.py) left IMAGE_TOKEN_INDEX
    (-200) for ``<image>``; here the processor expands ``<image>`` to that many placeholder tokens and
    vLLM scatters the features over them. The features are scaled by sqrt(hidden_size) as Griffon's
    transformers (>= 4.45) scaled all ``inputs_embeds`` (vLLM's Gemma-2 scales only token embeddings).
  * Visual-prompt counting (``unshared_visual_encoder``: ``prompt_visual_encoder``/``prompt_projector``,
    ``<region>`` images) is not implemented; those weights are skipped.

``register()`` is the vLLM general plugin (entry point ``longgrit_griffon`` in pyproject.toml): vLLM
calls it in every process that builds an engine, the engine-core process included.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    get_layer_index,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

from annotate.engines import griffon_processing as gp

CLASS_PATH = "annotate.engines.griffon_vllm:GriffonGemma2ForCausalLM"


def register() -> None:
    """vLLM general plugin: the config class for ``gemma2_Griffon`` and the model class, once per process."""
    from vllm import ModelRegistry

    gp.register_config()
    try:  # vLLM re-registers the classes it lists before every config load: ours wins over a later one
        from vllm.transformers_utils.config import _CONFIG_REGISTRY

        _CONFIG_REGISTRY[gp.MODEL_TYPE] = gp.GriffonGemma2Config
    except (ImportError, TypeError):  # an internal of vLLM 0.32; AutoConfig alone still works
        pass
    if gp.ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(gp.ARCHITECTURE, CLASS_PATH)


class GriffonProcessingInfo(BaseProcessingInfo):
    """Image-token arithmetic from the config; no HF processor exists for Griffon (it preprocesses in
    its own code), so none is loaded."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_hf_processor(self, **kwargs: object):
        raise NotImplementedError("Griffon-G has no Hugging Face processor; GriffonMultiModalProcessor preprocesses")

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": set()}

    def get_num_image_tokens(self) -> int:
        return gp.num_image_tokens(self.get_hf_config())

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}

    def get_image_size(self) -> int:
        return self.get_hf_config().vision_config.image_size

    def get_image_token_id(self) -> int:
        """The id of ``<image>``: one token of the deployment's tokenizer (Griffon's own code splits the
        text on the string instead, so a real checkpoint's tokenizer must have it added)."""
        ids = self.get_tokenizer().encode(gp.DEFAULT_IMAGE_TOKEN, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"Griffon-G on vLLM needs {gp.DEFAULT_IMAGE_TOKEN!r} as one token of the tokenizer; "
                             f"it encodes to {ids}")
        return ids[0]


class GriffonDummyInputsBuilder(BaseDummyInputsBuilder[GriffonProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return gp.DEFAULT_IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions):
        size = self.info.get_image_size()
        return {"image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image"))}


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):  # CHW or HWC uint8
        image = image.cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.transpose(1, 2, 0)
    return Image.fromarray(image)


class GriffonMultiModalProcessor(BaseMultiModalProcessor[GriffonProcessingInfo]):
    """Pixels as Griffon's run_griffon.process_images makes them; ``<image>`` -> N placeholder tokens."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = hf_data.get("images", [])
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        pixels = gp.preprocess([_to_pil(image) for image in images], self.info.get_image_size())
        return BatchFeature({"pixel_values": pixels})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        token = self.info.get_image_token_id()
        count = self.info.get_num_image_tokens()
        return [PromptReplacement(modality="image", target=[token], replacement=[token] * count)]


class GriffonConvProjector(nn.Module):
    """Griffon's ``ConvProjector`` (``conv_reduce``): patch grid -> Conv2d(3, stride 2, pad 1) -> GELU ->
    Linear. Replicated on every tensor-parallel rank (a few hundred MB at most for the 27B model)."""

    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.conv = nn.Conv2d(vision_hidden, text_hidden, kernel_size=3, stride=2, padding=1)
        self.linear = nn.Linear(text_hidden, text_hidden)
        self.act = nn.GELU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, patches, channels = features.shape
        side = int(round(patches ** 0.5))
        if side * side != patches:
            raise ValueError(f"conv_reduce needs a square patch grid, got {patches} patches")
        grid = features.permute(0, 2, 1).reshape(batch, channels, side, side)
        out = self.act(self.conv(grid))
        return self.linear(out.flatten(2).permute(0, 2, 1))


def checkpoint_mapper(tied: bool) -> WeightsMapper:
    """The published checkpoint's names onto this model's modules (order matters: "model." comes last)."""
    return WeightsMapper(
        orig_to_new_substr={".position_ids": None},
        orig_to_new_prefix={
            "model.vision_tower.vision_tower.": "vision_tower.",
            "model.mm_projector.": "mm_projector.",
            "model.prompt_visual_encoder.": None,  # visual-prompt counting: not implemented
            "model.prompt_projector.": None,
            "model.": "language_model.model.",
            "lm_head.": None if tied else "lm_head.",  # tied: Gemma-2's logits use embed_tokens
        })


@MULTIMODAL_REGISTRY.register_processor(GriffonMultiModalProcessor, info=GriffonProcessingInfo,
                                        dummy_inputs=GriffonDummyInputsBuilder)
class GriffonGemma2ForCausalLM(nn.Module, SupportsMultiModal):
    """Tensor parallelism as vLLM's CLIP and Gemma-2 provide it; pipeline parallelism is not declared
    (untested here)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return gp.DEFAULT_IMAGE_TOKEN  # the chat path writes "<image>\n{text}", as Griffon's conversation does
        raise ValueError("Griffon-G takes images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        # The checkpoint names no image token id, and an <image> added to a Gemma-2 tokenizer lies past
        # the embedding table: mask every placeholder out of the token-embedding lookup.
        self._has_oov_mm_tokens = True
        select = getattr(config, "mm_vision_select_layer", -2)
        if getattr(config, "mm_vision_select_feature", "patch") != "patch":
            raise NotImplementedError("Griffon-G selects patch features (CLS dropped)")
        gp.num_image_tokens(config)  # refuses projectors other than conv_reduce
        with self._mark_tower_model(vllm_config, "image"):
            # Only the layers up to the selected one are built: hidden_states[-2] is layer 23's output.
            self.vision_tower = CLIPVisionModel(
                config.vision_config, quant_config=None, require_post_norm=False,
                num_hidden_layers_override=get_layer_index(select, config.vision_config.num_hidden_layers),
                prefix=maybe_prefix(prefix, "vision_tower"))
            self.mm_projector = GriffonConvProjector(config.vision_config.hidden_size, config.hidden_size)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config, architectures=["Gemma2ForCausalLM"],
                prefix=maybe_prefix(prefix, "language_model"))
        if not self.tied:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
            self.logits_processor = LogitsProcessor(config.vocab_size, soft_cap=config.final_logit_softcapping)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        tower = self.vision_tower
        features = tower(pixel_values.to(tower.dtype), feature_select_strategy="default")  # CLS dropped
        embeds = self.mm_projector(features)
        normalizer = self.language_model.model.normalizer
        return embeds * normalizer.to(embeds.dtype)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor | IntermediateTensors:
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.tied:
            return self.language_model.compute_logits(hidden_states)
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=checkpoint_mapper(self.tied))
