"""`annotate eval --make-benchmark OUT --n N`: a LongGRIT-N split frozen by region id, chosen by image
and seeded; `eval --data OUT` scores exactly it and `train --data OUT` never sees its images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from annotate.cli import app
from annotate.data.records import is_trainable
from annotate.data.store import OutputStore, read_columns
from annotate.train.frozen import load_benchmark, make_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def out12(tmp_path_factory):
    """12 images x 3 trainable regions (+ 1 rejected each), 32 px."""
    pytest.importorskip("skimage.data")
    from bench.train_data import write_pipeline_output

    return write_pipeline_output(tmp_path_factory.mktemp("frozen") / "out", side=32, copies=4)


def _fresh(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _regions(out):
    rows = [row for p in OutputStore(out).dataset_files() for row in read_columns(p, ["image_key", "regions"])]
    return {r["region_id"]: (row["image_key"], r) for row in rows for r in row["regions"]}


def test_deterministic_by_image_recorded_by_id(out12, tmp_path):
    a, b = _fresh(out12, tmp_path / "a"), _fresh(out12, tmp_path / "b")
    info = make_benchmark(a, n=7, seed=3)
    make_benchmark(b, n=7, seed=3)
    path = OutputStore(a).benchmarks_dir / "longgrit-7.json"
    assert info["benchmark"] == str(path) and info["regions"] == 7 and info["images"] == 3
    assert path.read_text() == (OutputStore(b).benchmarks_dir / "longgrit-7.json").read_text()
    spec = json.loads(path.read_text())
    assert len(spec["region_ids"]) == len(set(spec["region_ids"])) == 7 and spec["seed"] == 3
    regions = _regions(a)
    chosen = [regions[rid] for rid in spec["region_ids"]]
    assert all(is_trainable(r) for _, r in chosen)
    assert {key for key, _ in chosen} == set(spec["images"])
    # whole images, in the recorded order; only the last one may be cut
    per_image = [sum(key == k for key, _ in chosen) for k in spec["images"]]
    assert per_image == [3, 3, 1]
    # re-running is a no-op; another seed chooses other images; a second benchmark is refused
    assert make_benchmark(a, n=7, seed=3) == info
    c = _fresh(out12, tmp_path / "c")
    assert json.loads(make_benchmark(c, n=7, seed=4) and (OutputStore(c).benchmarks_dir / "longgrit-7.json").read_text())["images"] != spec["images"]
    with pytest.raises(ValueError, match="differs"):
        make_benchmark(a, n=7, seed=4)
    with pytest.raises(ValueError, match="already frozen"):
        make_benchmark(a, n=5, seed=3)
    with pytest.raises(ValueError, match="fewer than"):
        make_benchmark(_fresh(out12, tmp_path / "d"), n=37)


def test_box_fallbacks_and_rejected_regions_are_never_chosen(tmp_path):
    pytest.importorskip("skimage.data")
    from bench.train_data import write_pipeline_output

    out = write_pipeline_output(tmp_path / "out", side=32, copies=4, uneven=True)
    make_benchmark(out, n=12)  # 12 images keep 1-3 ok regions, the last a box: 4 x (0 + 1 + 2) eligible
    regions = _regions(out)
    chosen = [regions[rid][1] for rid in load_benchmark(out).region_ids]
    assert len(chosen) == 12 and all(r["mask_source"] == "given" and r["status"] == "ok" for r in chosen)


def test_region_dataset_splits_on_the_frozen_benchmark(out12, tmp_path, tiny_train_cfg):
    from annotate.train.data import RegionDataset
    from annotate.train.text_cache import TextCache, iter_region_texts, write_text_cache

    out = _fresh(out12, tmp_path / "out")
    write_text_cache(list(iter_region_texts(out)), lambda ts: np.ones((len(ts), 4)), tmp_path / "cache")
    make_benchmark(out, n=8, seed=0)  # 3 images, the last cut to 2 regions
    frozen = load_benchmark(out)
    cfg = tiny_train_cfg.model_copy(update={"eval_fraction": 0.5})  # ignored while a benchmark exists
    sets = {split: RegionDataset(out, TextCache(tmp_path / "cache"), cfg, split, cache_dir=str(tmp_path / "hf"))
            for split in ("train", "eval")}
    assert {r.region_id for r in sets["eval"].refs} == frozen.region_ids
    train_images = {r.image_key for r in sets["train"].refs}
    assert not train_images & frozen.images and len(train_images) == 12 - 3
    assert len(sets["train"]) == 36 - 9  # the cut image's third region is in neither split


def test_train_leaves_it_out_and_eval_uses_exactly_it(out12, tmp_path, tiny_train_cfg, monkeypatch):
    import datasets

    from annotate.train.text_cache import iter_region_texts, write_text_cache

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    out = _fresh(out12, tmp_path / "out")
    entries = list(iter_region_texts(out))
    write_text_cache(entries, lambda ts: np.random.default_rng(len(ts)).standard_normal((len(ts), 24)), tmp_path / "cache")
    cfg = tiny_train_cfg.model_copy(update={"batch_size": 2, "text_embed_cache": str(tmp_path / "cache")})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("train:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in cfg.model_dump(mode="json").items()))
    runner = CliRunner()

    def train(run):
        res = runner.invoke(app, ["train", "--data", str(out), "--output", str(run), "--config", str(cfg_file), "--max-steps", "1"])
        assert res.exit_code == 0, res.output
        return json.loads((run / "run.json").read_text())

    assert "benchmark" not in train(tmp_path / "before")  # trained before the split was frozen
    res = runner.invoke(app, ["eval", "--make-benchmark", str(out), "--n", "10", "--seed", "1"])
    assert res.exit_code == 0, res.output
    frozen = load_benchmark(out)
    regions = _regions(out)
    texts = {regions[rid][1]["fine_caption"] for rid in frozen.region_ids}
    assert train(tmp_path / "after")["benchmark"] == {"name": "longgrit-10", "sha256": frozen.digest}
    for run, clean in ((tmp_path / "after", True), (tmp_path / "before", False)):
        res = runner.invoke(app, ["eval", "--checkpoint", str(run), "--data", str(out), "--batch-size", "3"])
        assert res.exit_code == 0, res.output
        m = json.loads((run / "eval.json").read_text())
        assert m["n_regions"] == 10 and m["benchmark"] == "longgrit-10" and m["benchmark_excluded_from_training"] is clean
        assert m["n_texts"] == len(texts) and m["chance_r1"] == pytest.approx(1 / len(texts))  # copies share captions
    # a listed region the data lacks is an error, never a smaller gallery
    spec = json.loads(frozen.path.read_text())
    spec["region_ids"][0] = "no-such-region"
    frozen.path.write_text(json.dumps(spec))
    res = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "after"), "--data", str(out)])
    assert res.exit_code != 0 and "no-such-region" in str(res.exception)
    res = runner.invoke(app, ["eval", "--data", str(out)])
    assert res.exit_code != 0 and "--checkpoint" in res.output
