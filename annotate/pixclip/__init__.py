"""PixCLIP model library: model, loss and transforms. Importable without the trainer."""

from annotate.pixclip.build import build_pixclip
from annotate.pixclip.loss import PixCLIPLoss, patch_coverage, region_pool
from annotate.pixclip.model import MaskConv, MaskPatchEmbed, PixCLIP, create_vision
from annotate.pixclip.open_clip_models import from_open_clip
from annotate.data.masks import decode_rle  # the data plane's one RLE decoder, part of this library's API
from annotate.pixclip.transforms import prepare_views

__all__ = [
    "MaskConv",
    "MaskPatchEmbed",
    "PixCLIP",
    "PixCLIPLoss",
    "build_pixclip",
    "create_vision",
    "decode_rle",
    "from_open_clip",
    "patch_coverage",
    "prepare_views",
    "region_pool",
]
