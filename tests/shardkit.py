"""Helpers for tests that build real GRIT-style shards (webdataset tar and img2dataset parquet)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int = 96, height: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth RGB gradient with noise: compresses like a photo, deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    a = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), np.full_like(xx, 128)], -1)
    return np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)


def encode(img: Image.Image | np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(arr: np.ndarray | None = None, **kw) -> bytes:
    return encode(photo() if arr is None else arr, "JPEG", quality=90, **kw)


def jpeg_with_orientation(displayed: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose stored pixels, shown with EXIF `orientation`, look like `displayed`."""
    img = Image.fromarray(displayed)
    # Inverse of what exif_transpose applies for each orientation.
    inverse = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
    stored = img.transpose(inverse[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def png16(arr16: np.ndarray) -> bytes:
    img = Image.fromarray(arr16.astype(np.uint16))
    assert img.mode.startswith("I;16"), img.mode
    return encode(img, "PNG")


def meta(caption: str, ref_exps: list, key: str = "000000000", width: int = 96, height: int = 64, **extra) -> dict:
    """A GRIT-20M json row (the columns img2dataset writes)."""
    m = {
        "id": int(key) if key.isdigit() else 0,
        "url": f"https://example.invalid/{key}.jpg",
        "caption": caption,
        "width": width,
        "height": height,
        "noun_chunks": [list(e) if isinstance(e, (list, tuple)) else e for e in ref_exps],
        "ref_exps": [list(e) if isinstance(e, (list, tuple)) else e for e in ref_exps],
        "clip_similarity_vitb32": 0.3,
        "clip_similarity_vitl14": 0.3,
        "key": key,
        "status": "success",
    }
    m.update(extra)
    return m


def span(caption: str, phrase: str) -> tuple[int, int]:
    start = caption.index(phrase)
    return start, start + len(phrase)


def entry(caption: str, phrase: str, box, score: float = 0.9) -> list:
    """[char_start, char_end, x0, y0, x1, y1, score] with the box normalised."""
    cs, ce = span(caption, phrase)
    return [cs, ce, *box, score]


class Link(str):
    """A member payload that makes a symbolic link to this target."""


def write_tar(path: Path, members: list[tuple[str, bytes | None]], mode: str = "w") -> Path:
    """Members in order; a None payload makes a directory entry, a `Link` a symlink. Deterministic headers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if data is None or isinstance(data, Link):
                info.type, info.linkname = (tarfile.DIRTYPE, "") if data is None else (tarfile.SYMTYPE, str(data))
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, image: bytes | None, meta_: dict | None, txt: str | None = None) -> list:
    out = []
    if image is not None:
        out.append((f"{key}.jpg", image))
    if meta_ is not None:
        out.append((f"{key}.json", json.dumps(meta_, ensure_ascii=False).encode("utf-8")))
    if txt is not None:
        out.append((f"{key}.txt", txt.encode("utf-8")))
    return out


def write_parquet_shard(path: Path, rows: list[tuple[bytes | None, dict]], image_column: str = "jpg", **write_kw) -> Path:
    """img2dataset parquet: an image column (`jpg` bytes, or `image` as {bytes, path}) + json columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    for img, m in rows:
        row = dict(m)
        if image_column == "image":
            row["image"] = None if img is None else {"bytes": img, "path": None}
        else:
            row[image_column] = img
        out.append(row)
    box = pa.list_(pa.list_(pa.float64()))
    fields = [
        ("key", pa.string()), ("id", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
        ("width", pa.int64()), ("height", pa.int64()), ("noun_chunks", box), ("ref_exps", box),
        ("clip_similarity_vitb32", pa.float64()), ("clip_similarity_vitl14", pa.float64()), ("status", pa.string()),
    ]
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if image_column == "image" else pa.binary()
    schema = pa.schema([*fields, (image_column, img_type)])
    table = pa.Table.from_pylist([{name: r.get(name) for name in schema.names} for r in out], schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=2, **write_kw)
    return path
