"""Image tokens from the models' own processing code and the region shapes they are counted over
(annotate/engines/image_tokens.py, annotate/plan/shapes.py); no engine is started."""

from __future__ import annotations

from pathlib import Path

import pytest

from annotate.config import CropConfig, load_config
from annotate.engines.image_tokens import GriffonImage, InternVLTiling, ViT
from annotate.plan.shapes import default_shapes, region_shape, shapes_from_shards

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_data" / "grit"


@pytest.mark.parametrize("size, tiles", [
    ((1024, 768), 13),   # 4:3 is (4, 3) exactly: 12 tiles + thumbnail, whatever the size
    ((100, 75), 13),     # a small 4:3 crop is upscaled to the same 13 tiles
    ((400, 400), 1),     # square, area < 0.5 x 448^2 x 4: (1, 1), no thumbnail
    ((1024, 1024), 10),  # square, area > 0.5 x 448^2 x 9: (3, 3) + thumbnail
    ((1024, 512), 3),    # 2:1, area < 0.5 x 448^2 x 8: (2, 1) + thumbnail
    ((600, 1000), 7),    # 0.6 is nearest 2/3: (2, 3) + thumbnail
])
def test_internvl_tiles_from_vllms_processor(size, tiles):
    """Counts worked out by hand from InternVL's find_closest_aspect_ratio; the code asks vLLM's."""
    t = InternVLTiling()
    assert t.tokens_per_tile == 256 and t.vit_tokens_per_tile == 1025
    assert t.tiles(*size) == tiles
    assert t.tokens(*size) == tiles * 256 + 2  # + <img> and </img>


def test_vision_encoder_flops():
    """InternViT-6B per tile: 45 x (2 x 1025 x (4 x 3200^2 + 2 x 3200 x 12800) + 4 x 1025^2 x 3200)
    = 11.94 TFLOP, a third of what its 256 tokens cost the 70B LM (256 x 2 x 70e9 = 35.8 TFLOP)."""
    t = InternVLTiling()
    assert t.vit.flops(1025) == pytest.approx(11.94e12, rel=1e-3)
    assert t.vit_flops(1024, 768) == pytest.approx(13 * 11.94e12, rel=1e-3)
    assert 0.3 < t.vit.flops(1025) / (256 * 2 * 70e9) < 0.36
    g = GriffonImage()
    assert g.vit_flops() == ViT(24, 1024, 4096).flops(73 * 73 + 1) == pytest.approx(6.01e12, rel=1e-3)


def test_griffon_image_tokens_and_the_model_code_agree():
    """1022 / 14 = 73 patches a side; Conv2d(3, stride 2, pad 1) -> 37; 37^2 = 1,369 at any size.
    engines/griffon_processing.py (the vLLM model's own count) must say the same."""
    from annotate.engines.griffon_processing import GriffonGemma2Config, conv_out, num_image_tokens

    g = GriffonImage()
    assert g.grid == 73 and conv_out(73) == 37
    assert g.tokens(1024, 768) == g.tokens(50, 900) == 1369
    assert num_image_tokens(GriffonGemma2Config()) == g.tokens()


def test_region_shape_is_the_crop_the_prompt_sends():
    crops = CropConfig(margin=0.1, max_side=1024)
    s = region_shape(1000, 800, [100, 100, 400, 300], crops)  # box 400x300 + 10% a side: 480 x 360
    assert s.crop == (480, 360) and s.image == (1000, 800)
    big = region_shape(4000, 3000, [0, 0, 4000, 3000], crops)  # fitted in max_side, aspect kept
    assert big.crop == (1024, 768) and big.image == (1024, 768)
    assert s.size_of("crop_mask") == s.crop and s.size_of("highlighted") == s.image
    with pytest.raises(ValueError):
        s.size_of("thumbnail")


def test_sample_shards_give_the_regions_prepare_gives():
    """--sample-shards reads the shards through annotate.data and keeps the regions prepare would
    send to the object stage (pending ones), cropped around their masks' tight boxes as the run crops."""
    from annotate.data.masks import decode_rle
    from annotate.data.prepare import prepare_shard
    from annotate.data.shards import find_shards

    data = load_config(REPO / "pipelines" / "longgrit.yaml").data
    shapes = shapes_from_shards(SAMPLES, 2, data)
    expected = [region_shape(p.record.width, p.record.height, r.bbox, data.crops, decode_rle(r.mask).astype(bool))
                for shard in find_shards(SAMPLES, [0, 1]) for p in prepare_shard(shard, data)
                for r in p.record.regions if r.status == "pending"]
    assert expected and [s.crop for s in shapes.shapes] == [s.crop for s in expected]
    assert "2 shard(s)" in shapes.source
    with pytest.raises(FileNotFoundError):
        shapes_from_shards(REPO / "prompts", 1, data)


def test_default_shapes_are_symmetric_in_aspect():
    spec = {"aspect_median": 1.0, "aspect_log_sigma": 0.6, "steps": 61, "crop_long_side": 512, "image": [1024, 768]}
    shapes = default_shapes(spec, CropConfig())
    crops = [s.crop for s in shapes.shapes]
    assert len(crops) == 61 and crops[30] == (512, 512) and crops[0] == crops[-1][::-1]
    assert "ASSUMED" in shapes.source


def test_a_table_can_describe_other_tiles():
    """A throughput file for the tiny replicas overrides the published figures: 56-px tiles of
    (56/14)^2 x 0.5^2 = 4 tokens, as annotate/models/tiny_paper.py builds them."""
    from annotate.engines.image_tokens import processing_for
    from annotate.models.tiny_paper import INTERNVL_IMAGE_SIZE, INTERNVL_TOKENS_PER_TILE

    tiny = processing_for("internvl", tile=INTERNVL_IMAGE_SIZE, vit={"layers": 2, "hidden": 64, "mlp": 128})
    assert tiny.tokens_per_tile == INTERNVL_TOKENS_PER_TILE
    assert tiny.tiles(1024, 768) == 13 and tiny.vit.layers == 2
    with pytest.raises(ValueError, match="unknown image processor"):
        processing_for("qwen2_vl")
