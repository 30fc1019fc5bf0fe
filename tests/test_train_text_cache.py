"""Text-feature cache (memmap, fp16, keyed by region id) with the real MiniLM, and training on pipeline output."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from annotate.cli import app
from annotate.train.text_cache import EMB_FILE, HFTextEncoder, TextCache, iter_region_texts, text_hash, write_text_cache

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cache_is_fp16_memmap_keyed_by_text(tmp_path):
    entries = [("fine:r1", "a red cup"), ("phrase:r1", "cup"), ("fine:r2", "a red cup"), ("image:i1", "a table")]
    cache = write_text_cache(entries, lambda ts: np.array([[len(t), 1.0 / 3] for t in ts]), tmp_path)
    assert (tmp_path / EMB_FILE).stat().st_size == 3 * 2 * 2  # 3 distinct texts x 2 dims x fp16
    assert isinstance(cache.matrix, np.memmap) and cache.matrix.dtype == np.float16
    unit = np.array([9.0, 1 / 3]) / np.hypot(9.0, 1 / 3)  # rows are stored L2-normalised (the adaptor's input)
    assert cache.get("a red cup").tolist() == unit.astype(np.float16).tolist()
    assert "cup" in cache and "a blue cup" not in cache and len(cache) == 3
    assert cache.keys == [text_hash(t) for t in ("a red cup", "cup", "a table")]


def test_new_captions_never_get_old_features(pipeline_out, tmp_path, tiny_train_cfg):
    """A re-run that rewrites a caption: the region's new text is not in the old cache, so the region
    is left out (region-keyed, it was paired with the old caption's features)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from annotate.train.data import RegionDataset

    write_text_cache(list(iter_region_texts(pipeline_out)), lambda ts: np.ones((len(ts), 4)), tmp_path / "cache")
    rerun = tmp_path / "rerun"
    (rerun / "data").mkdir(parents=True)
    table = pq.read_table(pipeline_out / "data" / "part-00000.parquet")
    rows = table.to_pylist()
    changed = rows[0]["regions"][0]
    changed["fine_caption"] = "A completely different caption."
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), rerun / "data" / "part-00000.parquet")
    cfg = tiny_train_cfg.model_copy(update={"eval_fraction": 0.0})
    ds = RegionDataset(rerun, TextCache(tmp_path / "cache"), cfg, "train", cache_dir=str(tmp_path / "hf"))
    ids = {r.region_id for r in ds.refs}
    assert changed["region_id"] not in ids and len(ids) == 8
    assert all(ds.cache.get(r.caption) is not None for r in ds.refs)


def test_embed_text_with_minilm(pipeline_out, minilm_dir, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"train:\n  text_encoder: {minilm_dir}\n  text_pooling: mean\n")
    result = CliRunner().invoke(app, ["embed-text", "--data", str(pipeline_out), "--output", str(tmp_path / "cache"), "--config", str(cfg_file)])
    assert result.exit_code == 0, result.output
    cache = TextCache(tmp_path / "cache")
    keys = dict(iter_region_texts(pipeline_out))
    assert set(cache.keys) == {text_hash(t) for t in keys.values()} and cache.dim == 384
    assert keys["fine:astronaut-0"] in cache and keys["image:coffee"] in cache
    assert "fine:astronaut-9" not in keys  # the rejected region has no text to cache
    direct = HFTextEncoder(str(minilm_dir))([keys["fine:coffee-1"]])[0]
    direct = direct / np.linalg.norm(direct)
    np.testing.assert_allclose(cache.get(keys["fine:coffee-1"]), direct, rtol=2e-3, atol=2e-3)
    # real encoder: a caption is closer to its own short text than to another image's
    e = {k: cache.get(keys[k]) / np.linalg.norm(cache.get(keys[k])) for k in ("fine:chelsea-0", "object:chelsea-0", "object:coffee-0")}
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


def test_rows_are_stored_unit_and_format_1_caches_are_refused(tmp_path):
    """Rows are L2-normalised as stored (the adaptor's input, LLM2CLIP's TextProj); a cache written by the
    previous format (raw LLM2Vec means, no "format" key) cannot be told apart by its bytes, so it is refused."""
    cache = write_text_cache(["a red cup", "a dog", "zero"],
                             lambda ts: np.array([[60.0 * len(t), -3.0, 0.0] if t != "zero" else [0.0] * 3 for t in ts]),
                             tmp_path / "c")
    rows = np.stack([cache.get(t) for t in ("a red cup", "a dog")])
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3)
    assert cache.get("zero").tolist() == [0.0, 0.0, 0.0] and cache.meta["format"] == 2
    meta = json.loads((tmp_path / "c" / "keys.json").read_text())
    del meta["format"], meta["rows"]
    (tmp_path / "c" / "keys.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 1.*embed-text"):
        TextCache(tmp_path / "c")
