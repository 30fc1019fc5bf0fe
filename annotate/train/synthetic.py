"""A generated benchmark that only a mask-aware model can solve, small enough to train on a CPU.

Each image holds several coloured shapes in distinct cells of a 3x3 grid; each region's mask selects
one shape and its text names colour, shape and position ("a red circle at the top left"). A model
that ignores the mask gives every region of an image the same embedding, so it cannot tell which of
the image's texts is meant.

Parts: every shape is split at its centre into two halves (top and bottom, or left and right, by a
hash of the shape), each a part record with a mask inside the shape's and texts naming the half, the
colour and the shape ("the top of a red circle"). The image is not changed by them (every run sees
the same scenes), and only a model that reads where the part mask lies within the object can tell a
shape's two halves apart: what the part branch (`train.use_parts`) trains.

Text side: a frozen random bag-of-words encoder (a fixed Gaussian vector per word, averaged). It
stands in for the frozen LLM: deterministic, instant, no download, and it carries exactly the words'
information, so whatever the model learns is on the vision side plus the trainable adaptor. The
MiniLM/HF path is exercised by `embed-text` on pipeline data instead.
"""

from __future__ import annotations

import hashlib

import numpy as np
from torch.utils.data import Dataset

from annotate.config import TrainConfig
from annotate.train.data import make_sample
from annotate.train.parts import PartSample

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
    "magenta": (210, 50, 210),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
TEXT_DIM = 64


def position_words(row: int, col: int) -> str:
    if (row, col) == (1, 1):
        return "in the center"
    if row == 1:
        return f"at the middle {COLS[col]}"
    if col == 1:
        return f"at the {ROWS[row]} center"
    return f"at the {ROWS[row]} {COLS[col]}"


def render_scene(rng: np.random.Generator, size: int, n_shapes: int = 3) -> tuple[np.ndarray, list[dict]]:
    """One image (size, size, 3) uint8 and its regions: [{mask, fine, short}]."""
    image = rng.integers(0, 50, size=(size, size, 3)).astype(np.uint8)
    cell = size / 3
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    regions = []
    for c in rng.choice(9, size=n_shapes, replace=False):
        row, col = divmod(int(c), 3)
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        r = cell * rng.uniform(0.28, 0.42)
        cx = (col + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        dx, dy = xx - cx, yy - cy
        if shape == "circle":
            mask = dx**2 + dy**2 <= r**2
        elif shape == "square":
            mask = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
        else:  # upward triangle
            mask = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
        image[mask] = COLORS[color]
        regions.append({"mask": mask, "fine": f"a {color} {shape} {position_words(row, col)}", "short": f"a {color} {shape}",
                        "negatives": hard_negatives(color, shape, row, col),
                        "parts": shape_parts(mask, color, shape, position_words(row, col))})
    return image, regions


PART_SPLITS = ((("top", "bottom"), 0), (("left", "right"), 1))  # (names, axis the halves are cut along)


def shape_parts(mask: np.ndarray, color: str, shape: str, place: str) -> list[dict]:
    """The shape's two halves, cut at its centre of mass (no random draw: the scene stays as it was):
    [{name, mask, short, long}]."""
    h = int.from_bytes(hashlib.sha1(f"{color}{shape}{place}".encode()).digest()[:4], "big")
    (first, second), axis = PART_SPLITS[h % len(PART_SPLITS)]
    coords = np.indices(mask.shape)[axis]
    centre = coords[mask].mean() if mask.any() else mask.shape[axis] / 2
    halves = ((first, mask & (coords < centre)), (second, mask & (coords >= centre)))
    return [{"name": name, "mask": half, "short": f"the {name} of a {color} {shape}",
             "long": f"the {name} half of a {color} {shape} {place}"} for name, half in halves if half.any()]


NEGATIVES_PER_REGION = 8


def hard_negatives(color: str, shape: str, row: int, col: int) -> list[tuple[str, str]]:
    """(edit type, text): single-attribute edits of the region's text, as the `negatives` stage makes
    of a description: a colour, the shape (object swap) or the position (relation) changed. Types
    alternate, and the choice follows from the region alone, so the list is the same every epoch."""
    place = position_words(row, col)
    colours = [("colour", f"a {c} {shape} {place}") for c in COLORS if c != color]
    shapes = [("object", f"a {color} {s} {place}") for s in SHAPES if s != shape]
    cells = sorted({position_words(r, c) for r in range(3) for c in range(3)} - {place})
    h = int.from_bytes(hashlib.sha1(f"{color}{shape}{row}{col}".encode()).digest()[:4], "big")
    cells = cells[h % len(cells):] + cells[: h % len(cells)]
    relations = [("relation", f"a {color} {shape} {p}") for p in cells]
    mixed = [item for group in zip(colours, relations, shapes + colours[len(shapes):]) for item in group]
    return list(dict.fromkeys(mixed))[:NEGATIVES_PER_REGION]


def image_caption(regions: list[dict]) -> str:
    return "an image with " + " and ".join(r["fine"] for r in regions)


class BagOfWordsEncoder:
    """Frozen text encoder for the synthetic task: mean of fixed random word vectors."""

    def __init__(self, dim: int = TEXT_DIM, seed: int = 0):
        self.dim, self.seed, self.table = dim, seed, {}

    def word(self, w: str) -> np.ndarray:
        if w not in self.table:
            h = int.from_bytes(hashlib.sha1(f"{self.seed}:{w}".encode()).digest()[:8], "big")
            self.table[w] = np.random.default_rng(h).standard_normal(self.dim).astype(np.float32)
        return self.table[w]

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.stack([np.mean([self.word(w) for w in t.lower().split()], axis=0) for t in texts])


class SyntheticDataset(Dataset):
    """Regions of `n_images` generated scenes; scene i comes from (seed, i) only."""

    def __init__(self, cfg: TrainConfig, n_images: int, seed: int, train: bool = True, n_shapes: int = 3):
        self.cfg, self.train, self.n_shapes = cfg, train, n_shapes
        self.encoder = BagOfWordsEncoder(TEXT_DIM, cfg.seed)
        self.scenes = [render_scene(np.random.default_rng([seed, i]), cfg.image_size, n_shapes) for i in range(n_images)]

    def __len__(self) -> int:
        return len(self.scenes) * self.n_shapes

    def text_id(self, idx: int) -> str:
        return self.scenes[idx // self.n_shapes][1][idx % self.n_shapes]["fine"]

    def group(self, idx: int) -> int:
        return idx // self.n_shapes

    def __getitem__(self, key) -> dict:
        epoch, idx = key if isinstance(key, tuple) else (0, key)
        image, regions = self.scenes[idx // self.n_shapes]
        region = regions[idx % self.n_shapes]
        text, full = region["fine"], False
        if self.train:
            rng = np.random.default_rng([self.cfg.seed, epoch, idx])
            if rng.random() < self.cfg.full_image_ratio:
                text, full = image_caption(regions), True
            elif rng.random() < self.cfg.short_text_ratio:
                text = region["short"]
        extra = {}
        if self.cfg.use_short:  # the summary: the region's short text
            extra["short"] = self.encoder([region["short"]])[0]
        if self.cfg.use_hard_negatives:
            extra["description"] = self.encoder([region["fine"]])[0]
            extra["negatives"] = list(self.encoder([t for _, t in region["negatives"]]))
        if self.cfg.use_parts and self.train:
            extra["parts"] = [PartSample(p["mask"], *self.encoder([p["short"], p["long"]])) for p in region["parts"]]
        return make_sample(image, region["mask"], self.encoder([text])[0], full, self.cfg, **extra)

    def whole_images(self) -> list[tuple[np.ndarray, str]]:
        """(image, whole-image caption) pairs, for the full-image retrieval column of the ablation."""
        return [(img, image_caption(regs)) for img, regs in self.scenes]


def synthetic_config(**overrides) -> TrainConfig:
    """A small PixCLIP trained from scratch: tiny timm ViT (32 px, patch 8 -> 4x4 tokens, depth 2, width 64).

    Sized so that 300 steps with all three branches take a few minutes on one CPU core (a 48 px,
    depth-3, width-96 variant reached only ~15% M2T R@1 in 300 steps; this one ~50%). Learning rates
    are far above the paper's fine-tuning values because nothing is pretrained here.
    """
    base = dict(
        vision_source="timm",
        vision_model="vit_base_patch16_224",
        vision_kwargs=dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0),
        image_size=32,
        embed_dim=64,
        adaptor_layers=2,
        adaptor_hidden=128,
        lr_mask_conv=2e-3,
        lr_other=1e-3,
        lr_adaptor=1e-3,
        weight_decay=1e-2,
        warmup_steps=20,
        max_steps=300,
        batch_size=32,
        amp_bf16=False,
        num_workers=0,
        checkpoint_every=200,
        log_every=25,
        lg_tau=0.5,
    )
    base.update(overrides)
    return TrainConfig(**base)
