"""Joint image/mask transforms: whatever geometry touches the image touches the mask identically.

Image and mask are cut with the same window and resized by the same filter onto the same grid.
The full view is CLIP's preprocessing (shortest side resized, square centre crop), as EVA02-CLIP /
LLM2CLIP were trained with, instead of squashing the image to a square. One deviation: when the centre square
would keep less than half of the region's mask, the square window slides along the long side to
centre on the region (same scale as CLIP's, only the offset differs), so the text never describes
something cut out of the picture. The crop view (I', M') is a square window around the mask's box,
so it is not distorted either. No horizontal flip (it would contradict "left"/"right" in captions).
Views come out as uint8 from the loader (`raw=True`); `to_model_input` makes the model's floats.
"""

from __future__ import annotations

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

_MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
_STD = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)


def mask_box(mask: np.ndarray, margin: float = 0.0, min_side: int = 4) -> tuple[int, int, int, int]:
    """Tight box (x0, y0, x1, y1) of a mask, grown by `margin` of its size, clipped to the image."""
    h, w = mask.shape
    # Row/column projections instead of np.nonzero: 10x faster per sample in the loader (bench.train_overhead).
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if len(cols) == 0:
        return 0, 0, w, h
    x0, x1, y0, y1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    mx = max(margin * (x1 - x0), (min_side - (x1 - x0)) / 2, 0)
    my = max(margin * (y1 - y0), (min_side - (y1 - y0)) / 2, 0)
    return (
        int(max(0, np.floor(x0 - mx))),
        int(max(0, np.floor(y0 - my))),
        int(min(w, np.ceil(x1 + mx))),
        int(min(h, np.ceil(y1 + my))),
    )


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's Resize(size) + CenterCrop(size) on a uint8 (H, W, 3) image and a bool (H, W) mask,
    jointly: the same centre square of both, resized by the same filter. Returns uint8 tensors
    (3, size, size) and (1, size, size) (mask 0..255: edge pixels get fractional coverage);
    `to_model_input` turns them into the model's floats, on the model's device.

    The centre crop is taken first (in source pixels) and then resized, which is the same geometry as
    resize-then-crop and cheaper. OpenCV on uint8: area averaging when shrinking (antialiased, like
    CLIP's), bilinear when enlarging (small regions' crops). Against the float
    `F.interpolate(antialias=True)` of a stacked 4-channel tensor this cut the loader's CPU per sample
    several-fold (bench/train_loader.py, BENCHMARKS.md).
    """
    import cv2

    h, w = mask.shape
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    img = np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side])
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    img = cv2.resize(img, (size, size), interpolation=interp)
    return torch.from_numpy(img).permute(2, 0, 1), resize_mask(mask, size)


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """The mask half of `resize_pair`: uint8 (1, size, size), the same centre square and filter."""
    import cv2

    h, w = mask.shape
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    msk = np.asarray(mask[y0 : y0 + side, x0 : x0 + side], dtype=bool).view(np.uint8) * np.uint8(255)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return torch.from_numpy(cv2.resize(msk, (size, size), interpolation=interp))[None]


def masks_in_view(masks: list[np.ndarray], region_mask: np.ndarray, size: int) -> torch.Tensor:
    """Other masks of the image (a region's parts) cut from the window the region's own full view
    shows (`full_window` of its mask), so they line up with that view's image: uint8 (P, 1, size, size)."""
    x0, y0, x1, y1 = full_window(region_mask)
    out = torch.zeros((len(masks), 1, size, size), dtype=torch.uint8)
    for i, m in enumerate(masks):
        out[i] = resize_mask(m[y0:y1, x0:x1], size)
    return out


def to_model_input(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 views (loader output) -> normalised float image and [0, 1] mask, on their device (the
    GPU, in training: four times less to copy, and no float work on the loader's cores). Float
    inputs are returned as they are."""
    if image.dtype == torch.uint8:
        mean, std = _MEAN.to(image.device), _STD.to(image.device)
        image = (image.float() / 255.0 - mean) / std
    if mask.dtype == torch.uint8:
        mask = mask.float() / 255.0
    return image, mask


def _slide(lo: int, hi: int, side: int, limit: int) -> int:
    """Start of a `side`-long window centred on [lo, hi), kept inside [0, limit)."""
    return int(min(max((lo + hi) // 2 - side // 2, 0), max(limit - side, 0)))


def full_window(mask: np.ndarray, keep: float = 0.5) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the square the full view shows: CLIP's centre square, or the same square
    slid along the long side onto the region when the centre square keeps < `keep` of the mask."""
    h, w = mask.shape
    side = min(h, w)
    if h == w:
        return 0, 0, w, h
    long_axis = 0 if w > h else 1  # 0: slide along x
    profile = mask.sum(axis=long_axis)  # mask pixels per column (w > h) or per row
    total = float(profile.sum())
    start = (len(profile) - side) // 2
    if total > 0 and profile[start : start + side].sum() < keep * total:
        x0, y0, x1, y1 = mask_box(mask)
        lo, hi = (x0, x1) if long_axis == 0 else (y0, y1)
        start = _slide(lo, hi, side, len(profile))
    return (start, 0, start + side, h) if long_axis == 0 else (0, start, w, start + side)


def crop_window(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """The mask's box grown by `margin`, widened to a square (inside the image where it fits)."""
    h, w = mask.shape
    x0, y0, x1, y1 = mask_box(mask, margin)
    side = max(x1 - x0, y1 - y0)
    sx, sy = min(side, w), min(side, h)
    x0, y0 = _slide(x0, x1, sx, w), _slide(y0, y1, sy, h)
    return x0, y0, x0 + sx, y0 + sy


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """CLIP mean/std normalisation (EVA02-CLIP and LLM2CLIP use the OpenAI statistics)."""
    return (image - _MEAN) / _STD


def prepare_views(
    image: np.ndarray, mask: np.ndarray, size: int, crop_margin: float = 0.05, raw: bool = False
) -> dict[str, torch.Tensor]:
    """The model inputs of one sample: (I, M) as CLIP sees the image, and (I', M') the square crop
    around the mask.

    `image` is uint8 (H, W, 3), `mask` bool (H, W). By default image tensors are normalised and masks
    in [0, 1] (the model applies the mask normalisation itself); `raw=True` returns the uint8 views
    for `to_model_input` to convert later (what the training loader does).
    """
    image = np.asarray(image, dtype=np.uint8)
    views = {}
    for name, window in (("", full_window(mask)), ("crop_", crop_window(mask, crop_margin))):
        img, msk = _view(image, mask, window, size)
        if not raw:
            img, msk = to_model_input(img, msk)
        views[name + "image"], views[name + "mask"] = img, msk
    return views


def _view(image: np.ndarray, mask: np.ndarray, window: tuple[int, int, int, int], size: int):
    """Cut the window out of the uint8 / bool arrays, then CLIP-resize it (only kept pixels are touched)."""
    x0, y0, x1, y1 = window
    return resize_pair(image[y0:y1, x0:x1], mask[y0:y1, x0:x1], size)


def full_view(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the inference view (I, M) (normalised image, mask in [0, 1]): what evaluation needs."""
    return to_model_input(*_view(np.asarray(image, dtype=np.uint8), mask, full_window(mask), size))


def stretch_view(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole image and mask resized to size x size, aspect not kept: the reference evaluations'
    `transforms.Resize((224, 224))` (StuHude/PixCLIP `eval/Flickr30k/load_flickr.py`, `eval/Urban1k/
    load_urbank.py`, `eval/docci/load_docci.py`, `eval/COCO/mask_image_test.py`), which neither crops nor
    pads. PIL bicubic for the image (its interpolation), bilinear for the mask (Resize's default);
    normalised like `full_view`."""
    from PIL import Image

    img = np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((size, size), Image.BICUBIC))
    msk = np.asarray(Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).resize((size, size), Image.BILINEAR))
    return to_model_input(torch.from_numpy(img.copy()).permute(2, 0, 1), torch.from_numpy(msk.copy())[None])
