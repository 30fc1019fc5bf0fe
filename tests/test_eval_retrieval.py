"""Evaluation protocol: split by image, identical texts are one item, top-k in bounded chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from annotate.train.evaluate import chance_r1, chunked_topk, retrieval_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("chunk", [3, 7, 1000])
def test_chunked_topk_equals_dense(chunk):
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(50, 8, generator=g), torch.randn(33, 8, generator=g)
    want = (q @ gal.T).topk(10, dim=1)
    got = chunked_topk(q, gal, 10, chunk=chunk)
    assert got.shape == (50, 10)
    torch.testing.assert_close((q @ gal.T).gather(1, got), want.values)  # same scores, in order


def test_chunked_topk_never_builds_the_full_matrix(monkeypatch):
    """Every similarity block is at most chunk x chunk."""
    shapes = []
    real_topk = torch.Tensor.topk

    def spy(self, *args, **kwargs):
        shapes.append(tuple(self.shape))
        return real_topk(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", spy)
    chunked_topk(torch.randn(40, 4), torch.randn(40, 4), 5, chunk=8)
    assert shapes and max(a * b for a, b in shapes) <= 8 * (8 + 5)  # a block, or the running top-k merge


def test_identical_texts_are_one_item():
    """A perfect model (each mask embedding equals its text's) scores 1.0 even when two of four
    regions share a caption; the old region-keyed protocol gave 0.75."""
    texts = ["a red cup", "a red cup", "a dog", "a tree"]
    basis = {t: torch.nn.functional.one_hot(torch.tensor(i), 4).float() for i, t in enumerate(dict.fromkeys(texts))}
    txt = torch.stack([basis[t] for t in texts])
    img = txt.clone()
    res = retrieval_metrics(img, txt, texts, ks=(1, 5))
    assert res["m2t_r1"] == res["t2m_r1"] == 1.0 and res["n_texts"] == 3
    assert chance_r1(texts) == pytest.approx(1 / 3)
    # a model that swaps the dog and the tree fails exactly those
    img[2], img[3] = basis["a tree"], basis["a dog"]
    res = retrieval_metrics(img, txt, texts, ks=(1,))
    assert res["m2t_r1"] == 0.5 and res["t2m_r1"] == pytest.approx(1 / 3)


def test_split_is_by_image_and_duplicate_captions_share_an_id(tmp_path, tiny_train_cfg):
    pytest.importorskip("skimage.data")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench.train_data import write_pipeline_output

    from annotate.train.data import RegionDataset
    from annotate.train.text_cache import TextCache, iter_region_texts, write_text_cache

    data = write_pipeline_output(tmp_path / "out", side=32, copies=4)
    part = data / "data" / "part-00000.parquet"
    table = pq.read_table(part)
    rows = table.to_pylist()
    rows[0]["regions"][1]["fine_caption"] = rows[0]["regions"][0]["fine_caption"]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part)
    write_text_cache(list(iter_region_texts(data)), lambda ts: np.ones((len(ts), 4)), tmp_path / "cache")
    cfg = tiny_train_cfg.model_copy(update={"eval_fraction": 0.5})
    sets = {split: RegionDataset(data, TextCache(tmp_path / "cache"), cfg, split, cache_dir=str(tmp_path / "hf"))
            for split in ("train", "eval")}
    keys = {split: {r.image_key for r in ds.refs} for split, ds in sets.items()}
    assert keys["train"] and keys["eval"] and not keys["train"] & keys["eval"]
    assert len(sets["train"]) + len(sets["eval"]) == 12 * 3
    ds = next(d for d in sets.values() if any(r.region_id == rows[0]["regions"][1]["region_id"] for r in d.refs))
    i, j = (next(k for k, r in enumerate(ds.refs) if r.region_id == rows[0]["regions"][n]["region_id"]) for n in (0, 1))
    assert ds.text_id(i) == ds.text_id(j) == rows[0]["regions"][0]["fine_caption"]
