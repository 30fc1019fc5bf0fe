"""Builds the bundled sample shards (sample_data/grit/00000.tar, 00001.tar) from real photographs
that ship inside scikit-image, with GRIT-style json written by hand (captions, char spans, boxes that
frame the objects). Deterministic: same bytes on every run with the same Pillow/numpy.

    python -m annotate.data.sample sample_data/grit
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from annotate.data.masks import encode_rle

MAX_SIDE = 384
JPEG_QUALITY = 85

# Boxes are [x0, y0, x1, y1] in pixels of the downscaled image (sizes noted per image); they are
# normalised when written. Phrases must occur in the caption; the first occurrence is used.
SHARDS: dict[str, list[dict]] = {
    "00000": [
        {  # 384x384
            "name": "astronaut",
            "caption": "An astronaut in an orange flight suit smiles beside a model of the space shuttle "
            "and an American flag, holding her helmet.",
            "regions": [
                ("An astronaut in an orange flight suit", [14, 8, 276, 384], 0.78),
                ("a model of the space shuttle", [262, 0, 346, 216], 0.71),
                ("an American flag", [0, 0, 76, 384], 0.64),
                ("her helmet", [205, 255, 384, 384], 0.69),
            ],
        },
        {  # 384x256
            "name": "coffee",
            "caption": "A cup of espresso on a red saucer with a silver spoon, on a wooden table.",
            "regions": [
                ("A cup of espresso", [110, 10, 272, 190], 0.83),
                ("a red saucer", [48, 40, 308, 250], 0.74),
                ("a silver spoon", [205, 40, 272, 210], 0.58),
            ],
        },
        {  # 384x255
            "name": "chelsea",
            "caption": "Close-up of a tabby cat with green eyes and a pink nose.",
            "regions": [
                ("a tabby cat", [0, 0, 340, 255], 0.81),
                ("green eyes", [110, 68, 296, 142], 0.55),
                ("a pink nose", [195, 180, 255, 225], 0.62),
            ],
        },
        {  # 384x256
            "name": "rocket",
            "caption": "A rocket stands on the launch pad at dusk between two lightning towers.",
            "regions": [
                ("A rocket", [182, 75, 205, 246], 0.77),
                ("the launch pad", [150, 225, 240, 256], 0.41),
                ("two lightning towers", [100, 72, 286, 240], 0.52),
            ],
        },
    ],
    "00001": [
        {  # 384x384, grayscale
            "name": "camera",
            "caption": "A man in a dark coat looks through an old camera mounted on a tripod in a park.",
            "regions": [
                ("A man in a dark coat", [0, 45, 250, 384], 0.8),
                ("an old camera", [190, 95, 250, 160], 0.72),
                ("a tripod", [170, 135, 305, 384], 0.66),
            ],
        },
        {  # 384x303, grayscale; carries `seudo_masks` (thresholded coins)
            "name": "coins",
            "caption": "Rows of ancient silver coins on a black background; the largest coin shows a standing "
            "figure, and a worn coin sits at the bottom left.",
            "regions": [
                ("the largest coin", [303, 14, 366, 73], 0.74),
                ("a standing figure", [318, 18, 352, 70], 0.45),
                ("a worn coin", [16, 232, 77, 291], 0.6),
            ],
            "masks": "threshold",
        },
        {  # 384x259
            "name": "motorcycle",
            "caption": "A red motorcycle with chrome wheels parked in a cluttered garage.",
            "regions": [
                ("A red motorcycle", [45, 55, 356, 226], 0.86),
                ("chrome wheels", [262, 140, 352, 234], 0.57),
                ("a cluttered garage", [0, 0, 384, 259], 0.38),
            ],
        },
        {  # 384x335
            "name": "hubble_deep_field",
            "caption": "The Hubble deep field: thousands of distant galaxies, one bright orange galaxy near the centre right.",
            "regions": [
                ("one bright orange galaxy", [266, 168, 292, 194], 0.47),
                ("distant galaxies", [0, 0, 384, 335], 0.33),
            ],
        },
    ],
}


def load_photo(name: str) -> np.ndarray:
    """The named scikit-image photograph, downscaled so its longest side is <= MAX_SIDE."""
    import skimage.data

    arr = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    img = Image.fromarray(arr)
    scale = MAX_SIDE / max(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    return np.asarray(img)


def _threshold_masks(arr: np.ndarray, boxes: list[list[int]]) -> list[dict]:
    """Coins are bright on black: a fixed threshold inside each box is a good pseudo mask."""
    gray = arr if arr.ndim == 2 else arr.mean(axis=2)
    out = []
    for x0, y0, x1, y1 in boxes:
        m = np.zeros(gray.shape, bool)
        m[y0:y1, x0:x1] = gray[y0:y1, x0:x1] > 60
        out.append(encode_rle(m).model_dump())
    return out


def build_sample(spec: dict, key: str) -> tuple[bytes, dict]:
    arr = load_photo(spec["name"])
    h, w = arr.shape[:2]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=JPEG_QUALITY)
    caption = spec["caption"]
    entries = []
    for phrase, (x0, y0, x1, y1), score in spec["regions"]:
        start = caption.index(phrase)
        entries.append([start, start + len(phrase), round(x0 / w, 4), round(y0 / h, 4), round(x1 / w, 4), round(y1 / h, 4), score])
    meta = {
        "id": int(key),
        "url": f"https://scikit-image.org/docs/stable/api/skimage.data.html#{spec['name']}",
        "caption": caption,
        "width": w,
        "height": h,
        "noun_chunks": entries,
        "ref_exps": entries,
        "clip_similarity_vitb32": 0.32,
        "clip_similarity_vitl14": 0.3,
        "key": key,
        "status": "success",
    }
    if spec.get("masks") == "threshold":
        meta["seudo_masks"] = _threshold_masks(arr, [r[1] for r in spec["regions"]])
    return buf.getvalue(), meta


def build(out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard_no, (shard, specs) in enumerate(SHARDS.items()):
        path = out_dir / f"{shard}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, spec in enumerate(specs):
                key = f"{shard_no:05d}{i:04d}"
                image, meta = build_sample(spec, key)
                members = [(f"{key}.jpg", image), (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode()),
                           (f"{key}.txt", meta["caption"].encode())]
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build(Path(sys.argv[1] if len(sys.argv) > 1 else "sample_data/grit")):
        print(f"{p} {p.stat().st_size} bytes")
