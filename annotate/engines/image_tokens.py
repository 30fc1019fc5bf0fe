"""Image tokens and vision-encoder FLOPs per image, from each model's own processing code.

Why here: `annotate plan` must count what the serving stack will send, and only `annotate.engines`
(with `annotate.serving`) may import vLLM. vLLM is imported on first use, not at import time (it
takes 20 s of CPU), and each image shape is counted once.

* InternVL2 (dynamic tiling): vLLM 0.32's own `InternVLProcessor.get_num_image_tokens`
  (vllm/transformers_utils/processors/internvl.py, which calls `get_internvl_target_ratios` and
  `calculate_internvl_targets`): the tile grid is the allowed (i, j), i*j <= max_tiles, whose ratio is
  closest to the image's aspect ratio, so a 4:3 crop becomes 4x3 = 12 tiles + 1 thumbnail whatever
  its size; plus `<img>` and `</img>` around each image (`get_image_repl`).
* Griffon-G (jefferyZhan/Griffon): every image is stretched to the tower's square input (1022 px,
  CLIP ViT-L/14: 73 x 73 patches) and its `conv_reduce` projector (Conv2d kernel 3, stride 2,
  padding 1) makes a 37 x 37 grid: 1,369 tokens, whatever the image's size or shape.
* Vision encoders (ViT) run over all their patch tokens (plus CLS), not the LM tokens they emit:
  InternViT-6B sees 1,025 tokens per 448-px tile that become 256 LM tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# Sources of the architecture figures below.
INTERNVL2_SOURCE = ("OpenGVLab/InternVL2-Llama3-76B config.json (vision_config: image_size 448, patch_size 14, "
                    "hidden_size 3200, intermediate_size 12800, num_hidden_layers 45; downsample_ratio 0.5, "
                    "max_dynamic_patch 12, use_thumbnail true, dynamic_image_size true)")
GRIFFON_SOURCE = ("jefferyZhan/Griffon: tower clip-vit-large-path14-336_to_1022 (ViT-L/14: hidden 1024, MLP 4096, "
                  "24 layers) at 1022 px, --mm_projector_type conv_reduce (griffon/model/multimodal_projector/"
                  "builder.py ConvProjector: Conv2d kernel 3, stride 2, padding 1); griffon/train/train.py "
                  "'prior = 37 # 1022 14'; images stretched to the square (griffon/eval/run_griffon.py)")


@dataclass(frozen=True)
class ViT:
    """A plain ViT's matmul and attention FLOPs (no biases, norms or softmax: under 1%)."""

    layers: int
    hidden: int
    mlp: int

    def flops(self, tokens: int) -> float:
        """Per image or tile: 2 FLOPs per weight per token (QKV+O = 4 h^2, MLP = 2 h m) plus the
        attention scores and their weighted sum, 2 x 2 t^2 h per layer."""
        weights = 4 * self.hidden ** 2 + 2 * self.hidden * self.mlp
        return float(self.layers * (2 * tokens * weights + 4 * tokens ** 2 * self.hidden))


@dataclass(frozen=True)
class InternVLTiling:
    tile: int = 448
    patch: int = 14
    downsample: float = 0.5
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True
    dynamic: bool = True
    vit: ViT = ViT(layers=45, hidden=3200, mlp=12800)  # InternViT-6B
    source: str = INTERNVL2_SOURCE

    @property
    def tokens_per_tile(self) -> int:
        """LM tokens per tile after pixel shuffle: (448/14)^2 x 0.5^2 = 256 (as vLLM's get_hf_processor)."""
        return int((self.tile // self.patch) ** 2 * self.downsample ** 2)

    @property
    def vit_tokens_per_tile(self) -> int:
        """Tokens InternViT runs over per tile: the patches plus CLS, (448/14)^2 + 1 = 1,025."""
        return (self.tile // self.patch) ** 2 + 1

    def tiles(self, width: int, height: int) -> int:
        """Tiles (thumbnail included) vLLM's InternVL processor makes of a width x height image."""
        return _internvl_tokens(self, int(width), int(height)) // self.tokens_per_tile

    def tokens(self, width: int, height: int) -> int:
        """Prompt tokens of one image: the tiles' tokens plus <img> and </img>."""
        return _internvl_tokens(self, int(width), int(height)) + 2

    def vit_flops(self, width: int, height: int) -> float:
        return self.tiles(width, height) * self.vit.flops(self.vit_tokens_per_tile)


class _IdsOnly:
    """The one tokenizer call InternVLProcessor's constructor makes; counting tokens needs no vocabulary."""

    @staticmethod
    def convert_tokens_to_ids(token: str) -> int:
        return 0


@functools.lru_cache(maxsize=65536)
def _internvl_tokens(t: InternVLTiling, width: int, height: int) -> int:
    from vllm.transformers_utils.processors.internvl import InternVLImageProcessor, InternVLProcessor

    processor = InternVLProcessor(
        InternVLImageProcessor(image_size=t.tile, min_dynamic_patch=t.min_tiles, max_dynamic_patch=t.max_tiles,
                               dynamic_image_size=t.dynamic, use_thumbnail=t.thumbnail),
        _IdsOnly(), image_seq_length=t.tokens_per_tile)
    return processor.get_num_image_tokens(image_width=width, image_height=height)


@dataclass(frozen=True)
class GriffonImage:
    image_size: int = 1022
    patch: int = 14
    vit: ViT = ViT(layers=24, hidden=1024, mlp=4096)  # CLIP ViT-L/14
    source: str = GRIFFON_SOURCE

    @property
    def grid(self) -> int:
        return self.image_size // self.patch  # 1022 / 14 = 73

    def tokens(self, width: int = 0, height: int = 0) -> int:
        """37^2 = 1,369 for every image: it is stretched to image_size square first. The side is the
        vLLM model's own `conv_out` (imported here: griffon_processing imports transformers)."""
        from annotate.engines.griffon_processing import conv_out

        return conv_out(self.grid) ** 2

    def tiles(self, width: int = 0, height: int = 0) -> int:
        return 1

    def vit_flops(self, width: int = 0, height: int = 0) -> float:
        return self.vit.flops(self.grid ** 2 + 1)  # 73^2 patches + CLS = 5,330 tokens


ImageProcessing = InternVLTiling | GriffonImage


def processing_for(kind: str, **overrides) -> ImageProcessing:
    """`internvl` or `griffon` (the throughput table's `image.processor`), published figures unless
    overridden (e.g. a table for the tiny replicas: `{processor: internvl, tile: 56}`)."""
    classes = {"internvl": InternVLTiling, "griffon": GriffonImage}
    if kind not in classes:
        raise ValueError(f"unknown image processor {kind!r}: {' or '.join(classes)}")
    if isinstance(overrides.get("vit"), dict):
        overrides["vit"] = ViT(**overrides["vit"])
    return classes[kind](**overrides)
