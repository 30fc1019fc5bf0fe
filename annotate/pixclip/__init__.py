"""PixCLIP model library: model, loss and transforms. Importable without the trainer."""

from annotate.pixclip.loss import PixCLIPLoss, patch_coverage, region_pool
from annotate.pixclip.model import MaskPatchEmbed, PixCLIP, build_pixclip, create_vision
from annotate.pixclip.transforms import decode_rle, prepare_views

__all__ = [
    "MaskPatchEmbed",
    "PixCLIP",
    "PixCLIPLoss",
    "build_pixclip",
    "create_vision",
    "decode_rle",
    "patch_coverage",
    "prepare_views",
    "region_pool",
]
