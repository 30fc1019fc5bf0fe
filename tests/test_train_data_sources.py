"""Which regions train: box-fallback masks are skipped by default; at most one full-image sample per image."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def uneven_out(tmp_path_factory):
    """Images with 1, 2, 3 "ok" regions; each image's last one is a box fallback; a random text cache."""
    pytest.importorskip("skimage.data")
    from bench.train_data import write_pipeline_output

    from annotate.train.text_cache import iter_region_texts, write_text_cache

    root = tmp_path_factory.mktemp("uneven")
    data = write_pipeline_output(root / "out", side=48, copies=1, uneven=True)
    entries = list(iter_region_texts(data))
    write_text_cache(entries, lambda ts: np.random.default_rng(len(ts)).standard_normal((len(ts), 8)), root / "cache")
    return data, root / "cache", root / "hf"


def _dataset(uneven_out, cfg):
    from annotate.train.data import RegionDataset
    from annotate.train.text_cache import TextCache

    data, cache, hf = uneven_out
    return RegionDataset(data, TextCache(cache), cfg, "train", cache_dir=str(hf))


def test_box_fallback_masks_are_skipped_by_default(uneven_out, tiny_train_cfg):
    cfg = tiny_train_cfg.model_copy(update={"eval_fraction": 0.0})
    assert cfg.skip_mask_sources == ["box", "none"]
    kept = _dataset(uneven_out, cfg)
    everything = _dataset(uneven_out, cfg.model_copy(update={"skip_mask_sources": []}))
    assert len(everything) == 6 and len(kept) == 3  # 1 + 2 + 3 regions, one box per image
    box_ids = {r.region_id for r in everything.refs} - {r.region_id for r in kept.refs}
    assert box_ids == {"astronaut-0", "coffee-1", "chelsea-2"}


def test_at_most_one_full_image_sample_per_image_and_epoch(uneven_out, tiny_train_cfg):
    cfg = tiny_train_cfg.model_copy(update={"eval_fraction": 0.0, "skip_mask_sources": [], "full_image_ratio": 0.2})
    ds = _dataset(uneven_out, cfg)
    rows = [ref.row for ref in ds.refs]
    probs = np.array([[ds.full_prob(e, i) for i in range(len(ds))] for e in range(200)])
    for e in range(200):
        for row in set(rows):
            assert sum(probs[e, i] > 0 for i in range(len(ds)) if rows[i] == row) == 1
    # the overall share of full-image samples stays full_image_ratio (0.2 x 3 regions <= 1)
    assert probs.mean() == pytest.approx(0.2, abs=0.02)
    # end to end: with ratio 1, each image yields exactly one full-image sample per epoch
    ds = _dataset(uneven_out, cfg.model_copy(update={"full_image_ratio": 1.0}))
    for epoch in range(2):
        full = [bool(ds[(epoch, i)]["full"]) for i in range(len(ds))]
        for row in set(rows):
            assert sum(f for f, r in zip(full, rows) if r == row) == 1
