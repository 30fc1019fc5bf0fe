"""Train / evaluation overlap audit (issue 26): which images of an evaluation set also appear in a
training output, found by a perceptual hash so that a resized or re-encoded copy still matches.

The hash is a 64-bit difference hash (dHash: the image in grayscale, resized to 9 x 8, one bit per
horizontally adjacent pair, set when the left pixel is brighter), written here with PIL and numpy.
No image-hashing library was added: the project takes no new dependencies, and dHash is a dozen lines
on what it already has (PIL, numpy). Two images match when their hashes differ in at most `threshold`
bits (Hamming distance; default `DEFAULT_THRESHOLD`). Limits of the method: a crop, flip or heavy
edit is not found; very flat images (one colour, tiny gradients) hash alike and can match each other,
so every match is reported with its distance and the training image's key to be checked by eye.

Training images are read as the trainer reads them: the output's dataset files through the store
(`train.data.load_rows`, images left encoded), decoded by `data.images.decode_array`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from annotate.train.benchmarks import (
    MaskRetrievalTask,
    ProposalReferringTask,
    ReferringTask,
    RegionTask,
    RetrievalTask,
    WinogroundTask,
    load_image,
)

HASH_BITS = 64
DEFAULT_THRESHOLD = 6  # of 64 bits; a resize + JPEG re-encode of one photo is typically 0-4 apart, unrelated photos ~32
METHOD = "dHash 64-bit (grayscale resized to 9x8 by PIL's LANCZOS, adjacent-pixel differences), Hamming distance"


def dhash(image) -> int:
    """The 64-bit dHash of an RGB/gray array or a PIL image, as an int (bit 63 the first comparison)."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    gray = np.asarray(im.convert("L").resize((9, 8), Image.LANCZOS), dtype=np.int16)
    bits = (gray[:, :-1] > gray[:, 1:]).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances (len(a), len(b)) of uint64 hashes."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64)[:, None], np.asarray(b, dtype=np.uint64)[None, :])
    return np.bitwise_count(x).astype(np.int64)


def train_hashes(train_out: str | Path) -> tuple[list[str], np.ndarray]:
    """(image keys, hashes) of every image of a training output (an `annotate run` --output folder),
    read through the store as the trainer reads them; rows without an image are skipped."""
    from annotate.data.images import decode_array
    from annotate.train.data import load_rows

    rows = load_rows(train_out).select_columns(["image_key", "image"])
    keys, hashes = [], []
    for row in rows:
        cell = row["image"]
        if not cell or not cell.get("bytes"):
            continue
        keys.append(str(row["image_key"]))
        hashes.append(dhash(decode_array(cell["bytes"])))
    return keys, np.array(hashes, dtype=np.uint64)


def task_images(task) -> list[Path]:
    """Every distinct image file an evaluation task reads, in first-seen order."""
    if isinstance(task, RegionTask):
        paths: Iterable[Path] = (p for p, _, _ in task.items)
    elif isinstance(task, ReferringTask):
        paths = (p for p, _, _ in task.images)
    elif isinstance(task, ProposalReferringTask):
        paths = (im[0] for im in task.images)
    elif isinstance(task, RetrievalTask):
        paths = task.images
    elif isinstance(task, MaskRetrievalTask):
        paths = (p for p, _, _ in task.items)
    elif isinstance(task, WinogroundTask):
        paths = (p for _, pair, _ in task.examples for p in pair)
    else:
        raise TypeError(f"no images known for {type(task).__name__}")
    return list(dict.fromkeys(Path(p) for p in paths))


def find_overlap(eval_paths: list[Path], keys: list[str], hashes: np.ndarray, threshold: int = DEFAULT_THRESHOLD,
                 chunk: int = 1024) -> list[dict]:
    """The evaluation images within `threshold` bits of some training image: for each, its nearest
    training image (key, distance), in the order of `eval_paths`."""
    if not 0 <= threshold < HASH_BITS:
        raise ValueError(f"threshold must be in [0, {HASH_BITS}), got {threshold}")
    ev = np.array([dhash(load_image(p)) for p in eval_paths], dtype=np.uint64)
    matches = []
    if len(hashes) == 0 or len(ev) == 0:
        return matches
    for start in range(0, len(ev), chunk):
        dist = hamming(ev[start : start + chunk], hashes)
        best = dist.argmin(axis=1)
        for i, j in enumerate(best):
            d = int(dist[i, j])
            if d <= threshold:
                matches.append({"eval_image": str(eval_paths[start + i]), "train_image_key": keys[j], "distance": d})
    return matches


def _relative(path: str, root: Path | None) -> str:
    if root is None:
        return path
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def audit_task(task, train_out: str | Path, threshold: int = DEFAULT_THRESHOLD, bench_dir: str | Path | None = None) -> dict:
    """The overlap report of one evaluation task against a training output: `count` evaluation images
    found in it, their `ids` (paths relative to the benchmark folder when given), and per match the
    training image's key and the distance (`matches`)."""
    keys, hashes = train_hashes(train_out)
    images = task_images(task)
    matches = find_overlap(images, keys, hashes, threshold)
    root = Path(bench_dir) if bench_dir is not None else None
    for m in matches:
        m["id"] = _relative(m["eval_image"], root)
    return {"method": METHOD, "threshold": threshold, "train_output": str(train_out), "train_images": len(keys),
            "eval_images": len(images), "count": len(matches), "ids": [m["id"] for m in matches], "matches": matches}


def exclude_images(task, images: set[str]):
    """The task without every item that reads one of `images` (paths as `audit_task` reports them in
    `eval_image`). The unit left out is the task's own: a region / mask-text item, a referring image
    with its expressions, a retrieval image with its captions, a Winoground example when either of
    its two images is listed."""
    hit = {str(Path(p)) for p in images}

    def out(p) -> bool:
        return str(Path(p)) in hit

    if isinstance(task, RegionTask):
        keep = [i for i, (p, _, _) in enumerate(task.items) if not out(p)]
        return replace(task, items=[task.items[i] for i in keep],
                       boxes=None if task.boxes is None else [task.boxes[i] for i in keep])
    if isinstance(task, (ReferringTask, ProposalReferringTask)):
        return replace(task, images=[im for im in task.images if not out(im[0])])
    if isinstance(task, RetrievalTask):
        keep = [i for i, p in enumerate(task.images) if not out(p)]
        return replace(task, images=[task.images[i] for i in keep], captions=[task.captions[i] for i in keep])
    if isinstance(task, MaskRetrievalTask):
        keep = [i for i, (p, _, _) in enumerate(task.items) if not out(p)]
        return replace(task, items=[task.items[i] for i in keep],
                       ids=[task.ids[i] for i in keep] if task.ids else [])
    if isinstance(task, WinogroundTask):
        return replace(task, examples=[ex for ex in task.examples if not any(out(p) for p in ex[1])])
    raise TypeError(f"cannot exclude images from {type(task).__name__}")


def task_size(task) -> int:
    """The number of evaluated units (items, images, examples) of a task."""
    for attr in ("items", "examples", "images"):
        if hasattr(task, attr):
            return len(getattr(task, attr))
    return 0
