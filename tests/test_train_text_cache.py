"""Text-feature cache (memmap, fp16, keyed by region id) with the real MiniLM, and training on pipeline output."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from annotate.cli import app
from annotate.train.text_cache import EMB_FILE, HFTextEncoder, TextCache, iter_region_texts, write_text_cache

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cache_is_fp16_memmap_keyed_by_region(tmp_path):
    entries = [("fine:r1", "a red cup"), ("phrase:r1", "cup"), ("fine:r2", "a red cup"), ("image:i1", "a table")]
    cache = write_text_cache(entries, lambda ts: np.array([[len(t), 1.0 / 3] for t in ts]), tmp_path)
    assert (tmp_path / EMB_FILE).stat().st_size == 4 * 2 * 2  # 4 rows x 2 dims x fp16
    assert isinstance(cache.matrix, np.memmap) and cache.matrix.dtype == np.float16
    assert cache.get("fine:r1").tolist() == cache.get("fine:r2").tolist() == [9.0, np.float16(1 / 3)]
    assert "phrase:r1" in cache and "phrase:r2" not in cache and len(cache) == 4


def test_embed_text_with_minilm(pipeline_out, minilm_dir, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"train:\n  text_encoder: {minilm_dir}\n  text_pooling: mean\n")
    result = CliRunner().invoke(app, ["embed-text", "--data", str(pipeline_out), "--output", str(tmp_path / "cache"), "--config", str(cfg_file)])
    assert result.exit_code == 0, result.output
    cache = TextCache(tmp_path / "cache")
    keys = dict(iter_region_texts(pipeline_out))
    assert set(cache.keys) == set(keys) and cache.dim == 384
    assert "fine:astronaut-0" in cache and "image:coffee" in cache and "fine:astronaut-9" not in cache  # rejected
    direct = HFTextEncoder(str(minilm_dir))([keys["fine:coffee-1"]])[0]
    np.testing.assert_allclose(cache.get("fine:coffee-1"), direct, rtol=2e-3, atol=2e-3)
    # real encoder: a caption is closer to its own short text than to another image's
    e = {k: cache.get(k) / np.linalg.norm(cache.get(k)) for k in ("fine:chelsea-0", "object:chelsea-0", "object:coffee-0")}
    assert e["fine:chelsea-0"] @ e["object:chelsea-0"] > e["fine:chelsea-0"] @ e["object:coffee-0"]


def test_train_and_eval_on_pipeline_output(pipeline_out, tmp_path, tiny_train_cfg, monkeypatch):
    import datasets

    from annotate.train.data import RegionDataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")

    entries = list(iter_region_texts(pipeline_out))
    write_text_cache(entries, lambda ts: np.random.default_rng(len(ts)).standard_normal((len(ts), 24)), tmp_path / "cache")
    cfg = tiny_train_cfg.model_copy(update={"eval_fraction": 0.3, "batch_size": 2, "text_embed_cache": str(tmp_path / "cache")})
    ds = RegionDataset(pipeline_out, TextCache(tmp_path / "cache"), cfg, "train", cache_dir=str(tmp_path / "hf"))
    held = RegionDataset(pipeline_out, TextCache(tmp_path / "cache"), cfg, "eval", cache_dir=str(tmp_path / "hf"))
    assert len(ds) + len(held) == 9 and len(held) > 0  # 3 ok regions x 3 images, rejected ones skipped
    sample = ds[(0, 0)]
    assert sample["image"].shape == (3, 32, 32) and sample["crop_mask"].shape == (1, 32, 32)
    assert sample["text"].shape == (24,) and sample["text"].dtype == torch.float32
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("train:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in cfg.model_dump(mode="json").items()))
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--data", str(pipeline_out), "--output", str(run), "--config", str(cfg_file), "--max-steps", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", "--checkpoint", str(run), "--data", str(pipeline_out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["n_regions"] == len(held) and 0 <= metrics["m2t_r1"] <= 1
