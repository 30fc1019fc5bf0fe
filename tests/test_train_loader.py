"""The training loader's cheaper path: uint8 views converted on the model's device, images decoded
without needless copies; the result is the same as the float path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from annotate.pixclip.transforms import prepare_views, to_model_input

pytestmark = pytest.mark.usefixtures("one_thread")


def test_uint8_views_convert_to_the_float_views():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    mask = np.zeros((60, 90), dtype=bool)
    mask[10:40, 50:80] = True
    raw = prepare_views(image, mask, 32, raw=True)
    ref = prepare_views(image, mask, 32)
    assert raw["image"].dtype == raw["mask"].dtype == raw["crop_image"].dtype == torch.uint8
    for a, b in (("image", "mask"), ("crop_image", "crop_mask")):
        img, msk = to_model_input(raw[a][None], raw[b][None])  # a batch, as the trainer converts it
        torch.testing.assert_close(img[0], ref[a])
        torch.testing.assert_close(msk[0], ref[b])
    assert ref["mask"].min() == 0 and ref["mask"].max() == 1


def _jpeg(array: np.ndarray, orientation: int | None) -> dict:
    im = Image.fromarray(array)
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return {"bytes": buf.getvalue()}


def test_decode_keeps_exif_rotation():
    from annotate.data.images import decode_array  # the trainer's decoder

    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :10] = 255  # white left edge
    plain = decode_array(_jpeg(array, None)["bytes"])
    assert plain.shape == (20, 40, 3) and plain.dtype == np.uint8 and plain[:, :5].mean() > 200
    rotated = decode_array(_jpeg(array, 6)["bytes"])  # "rotate 90 CW to view": the white edge goes to the top
    assert rotated.shape == (40, 20, 3) and rotated[:5].mean() > 200 and rotated[-5:].mean() < 50
    gray = decode_array(_png_gray()["bytes"])  # a grayscale PNG comes back as RGB
    assert gray.shape == (8, 8, 3)


def _png_gray() -> dict:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(buf, format="PNG")
    return {"bytes": buf.getvalue()}


def test_loader_bench_small():
    pytest.importorskip("skimage.data")
    from bench.train_loader import main

    res = main(["--samples", "12", "--size", "32", "--side", "64"])
    assert res["samples"] == 12 and res["ms_per_sample"] > 0
    assert res["samples_per_s_per_core"] == pytest.approx(1e3 / res["ms_per_sample"], rel=1e-2)


def test_decode_falls_back_to_pil():
    """A format OpenCV does not read (GIF here) still decodes, through PIL."""
    from annotate.data.images import decode_array  # the trainer's decoder

    buf = io.BytesIO()
    Image.fromarray(np.full((6, 9, 3), 200, dtype=np.uint8)).save(buf, format="GIF")
    out = decode_array(buf.getvalue())
    assert out.shape == (6, 9, 3) and abs(int(out.mean()) - 200) < 8
