"""Benchmark inputs: copies of the bundled sample shards under new shard numbers.

The sample shards carry no SAM masks, so each copy's json gets a `seudo_masks` list (one COCO RLE per
`ref_exps` entry: the ellipse inscribed in the entry's box) so the `given` mask source has something
to read. The images and regions are the sample's, byte for byte: N shards are N/2 copies of each.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data" / "grit"


def _ellipse_rle(entry, width: int, height: int) -> dict:
    from pycocotools import mask as mask_utils

    x0, y0, x1, y1 = (float(v) for v in entry[2:6])
    cx, cy = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height
    rx, ry = max((x1 - x0) / 2 * width, 1.0), max((y1 - y0) / 2 * height, 1.0)
    yy, xx = np.mgrid[0:height, 0:width]
    m = (((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2) <= 1.0
    enc = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(s) for s in enc["size"]], "counts": enc["counts"].decode("ascii")}


def _with_masks(members: dict[str, bytes]) -> dict[str, bytes]:
    from PIL import Image, ImageOps

    out = dict(members)
    for name, data in members.items():
        if not name.endswith(".json"):
            continue
        stem = name[: -len(".json")]
        img_name = next((n for n in members if n.startswith(stem + ".") and not n.endswith((".json", ".txt"))), None)
        meta = json.loads(data)
        if img_name is None or not isinstance(meta.get("ref_exps"), list):
            continue
        w, h = ImageOps.exif_transpose(Image.open(io.BytesIO(members[img_name]))).size
        meta["seudo_masks"] = [_ellipse_rle(e, w, h) for e in meta["ref_exps"]]
        out[name] = json.dumps(meta).encode()
    return out


def _read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]


def make_shards(dest: str | Path, n: int, given_masks: bool = True, source: str | Path = SAMPLE_DIR) -> list[int]:
    """Write shards 00000..n-1 into `dest` (copies of the sample shards, cycled); return their ids.
    Existing files of the right name are kept (the content is deterministic)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    samples = sorted(Path(source).glob("*.tar"))
    if not samples:
        raise FileNotFoundError(f"no sample shards in {source}")
    prepared = []
    for s in samples:
        members = _read_tar(s)
        if given_masks:
            members = list(_with_masks(dict(members)).items())
        prepared.append(members)
    for i in range(n):
        path = dest / f"{i:05d}.tar"
        if path.exists():
            continue
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tf:
            for name, data in prepared[i % len(prepared)]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        tmp.replace(path)
    return list(range(n))
