"""Proof that PixCLIP learns to use the mask: synthetic shapes, where a mask-blind model cannot win."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from annotate.cli import app
from annotate.train.synthetic import SyntheticDataset, render_scene, synthetic_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scene_regions_are_distinct_shapes():
    image, regions = render_scene(np.random.default_rng(0), 48, n_shapes=3)
    assert image.shape == (48, 48, 3) and len(regions) == 3
    assert len({r["fine"] for r in regions}) == 3  # distinct cells, so distinct position words
    masks = np.stack([r["mask"] for r in regions])
    assert masks.any(axis=(1, 2)).all() and masks.sum(0).max() == 1  # non-empty, non-overlapping


def test_synthetic_training_beats_mask_blind_and_chance(tmp_path):
    """~300 steps of a depth-2, width-64 ViT on 32 px scenes, L_CL only (the branch under test)."""
    run = tmp_path / "run"
    cfg = synthetic_config(
        image_size=32,
        vision_kwargs=dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0),
        batch_size=32, max_steps=300, use_fc=False, use_lg=False, log_every=100, checkpoint_every=1000,
    )
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("train:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in cfg.model_dump(mode="json").items()))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--synthetic", "--output", str(run), "--config", str(cfg_file)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", "--checkpoint", str(run), "--synthetic"])
    assert res.exit_code == 0, res.output
    m = json.loads((run / "eval.json").read_text())
    for key in ("m2t_r1", "m2t_r5", "m2t_r10", "t2m_r1", "t2m_r5", "t2m_r10", "m2t_r1_mask_zeroed", "chance_r1"):
        assert key in m
    print(json.dumps(m))
    assert m["m2t_r1"] > 0.3 and m["t2m_r1"] > 0.3
    assert m["m2t_r1"] > 3 * m["m2t_r1_mask_zeroed"] and m["m2t_r1"] > 2 * m["m2t_r1_mask_ones"]
    assert m["m2t_r1"] > 20 * m["chance_r1"]
    assert m["m2t_r5"] >= m["m2t_r1"] and m["m2t_r10"] >= m["m2t_r5"]


def test_ablation_table_small(tmp_path, tiny_train_cfg):
    from annotate.train.commands import run_ablation

    over = {k: getattr(tiny_train_cfg, k) for k in ("vision_kwargs", "image_size", "embed_dim", "adaptor_hidden", "batch_size")}
    table = run_ablation(tmp_path, max_steps=3, log=lambda _: None, **over)
    rows = [line for line in table.splitlines() if line.startswith("| L_CL")]
    assert [r.split("|")[1].strip() for r in rows] == ["L_CL", "L_CL + L_LG", "L_CL + L_LG + L_FC"]
    assert (tmp_path / "ablation.md").read_text() == table
    results = json.loads((tmp_path / "ablation.json").read_text())
    assert set(results) == {"L_CL", "L_CL + L_LG", "L_CL + L_LG + L_FC"}


def test_zero_shot_json_format(tmp_path, tiny_train_cfg, minilm_dir):
    """The documented zero-shot JSON: classes, template, samples of (image, RLE mask, label)."""
    from PIL import Image

    from annotate.train.evaluate import load_zero_shot_json, zero_shot
    from annotate.pixclip.build import build_pixclip
    from annotate.train.text_cache import HFTextEncoder

    image, regions = render_scene(np.random.default_rng(1), 32)
    Image.fromarray(image).save(tmp_path / "scene.png")
    samples = []
    for r in regions:
        enc = mask_utils.encode(np.asfortranarray(r["mask"].astype(np.uint8)))
        samples.append({"image": "scene.png", "mask": {"size": [32, 32], "counts": enc["counts"].decode()}, "label": r["short"].split()[-1]})
    classes = ["circle", "square", "triangle"]
    (tmp_path / "zs.json").write_text(json.dumps({"classes": classes, "template": "a photo of a {}.", "samples": samples}))
    items, cls, template = load_zero_shot_json(tmp_path / "zs.json")
    assert cls == classes and len(items) == 3 and items[0][1].shape == (32, 32)
    feats = HFTextEncoder(str(minilm_dir))([template.format(c) for c in cls])
    res = zero_shot(build_pixclip(tiny_train_cfg, 384).eval(), items, cls, feats, 32)
    assert 0 <= res["zs_top1"] <= res["zs_top5"] == 1.0 and res["zs_classes"] == 3
