"""DDP on real data: images carry different numbers of regions, yet every rank runs the same steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from annotate.train.data import EpochSampler
from ranks import run_ranks

WORLD = 2


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_epochs_have_equal_length_on_uneven_groups(world):
    """Groups of 1..7 samples: each rank's shard has the same length in every epoch, shards are
    disjoint, groups stay whole except at the cut, and little is dropped."""
    rng = np.random.default_rng(world)
    sizes = rng.integers(1, 8, size=40)
    groups = np.repeat(np.arange(len(sizes)), sizes).tolist()
    n = len(groups)
    samplers = [EpochSampler(n, seed=3, rank=r, world_size=world, groups=groups) for r in range(world)]
    for epoch in range(4):
        shards = []
        for s in samplers:
            s.set_epoch(epoch)
            shards.append([i for _, i in s])
        assert len({len(x) for x in shards}) == 1 and len(shards[0]) == len(samplers[0])
        flat = [i for x in shards for i in x]
        assert len(flat) == len(set(flat))  # disjoint
        assert n - len(flat) <= world * sizes.max()  # at most a group per rank dropped
        for x in shards:  # a group's samples are contiguous in a rank's order
            for g in {groups[i] for i in x}:
                pos = [k for k, i in enumerate(x) if groups[i] == g]
                assert pos == list(range(pos[0], pos[0] + len(pos)))
    # resuming mid-epoch continues the same shard
    full = samplers[0]
    full.set_epoch(2)
    whole = [i for _, i in full]
    full.set_epoch(2, start=3)
    assert [i for _, i in full] == whole[3:] and len(full) == len(whole) - 3


def _rank_main(rank: int, init_file: str, data: str, cache: str, hf_cache: str, cfg_json: str, out: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from annotate.config import TrainConfig
        from annotate.pixclip.build import build_pixclip
        from annotate.train.data import RegionDataset
        from annotate.train.text_cache import TextCache
        from annotate.train.trainer import Trainer

        cfg = TrainConfig.model_validate_json(cfg_json)
        ds = RegionDataset(data, TextCache(cache), cfg, "train", cache_dir=hf_cache)
        torch.manual_seed(cfg.seed)
        trainer = Trainer(cfg, build_pixclip(cfg, TextCache(cache).dim), ds, out, device="cpu")
        seen = []
        for epoch in range(3):
            trainer.sampler.set_epoch(epoch)
            seen.append(sorted(ds.refs[i].region_id for _, i in trainer.sampler))
        trainer.fit(log=lambda _: None)  # raises if the ranks' weights diverged
        results[rank] = {"step": trainer.step, "epoch": trainer.epoch, "per_epoch": trainer.steps_per_epoch,
                         "n": len(ds), "seen": seen}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_gloo_ranks_train_on_uneven_pipeline_output(tmp_path, tiny_train_cfg):
    """Pipeline output with 1, 2, 3, 1, 2, 3 usable regions per image, grouped by image and sharded
    over two gloo ranks, trains for three epochs; before the fix the ranks computed different step
    counts and stopped with a collective mismatch."""
    from bench.train_data import write_pipeline_output

    from annotate.train.text_cache import iter_region_texts, write_text_cache

    data = write_pipeline_output(tmp_path / "out", side=48, copies=2, uneven=True)
    entries = list(iter_region_texts(data))
    write_text_cache(entries, lambda ts: np.random.default_rng(len(ts)).standard_normal((len(ts), 16)), tmp_path / "cache")
    # 12 regions, largest image 3: epoch_length (12 - 3) // 2 = 4 per rank = 2 steps of 2; 6 steps = 3 epochs.
    # Seed 1: dealing images round-robin (the old sampler) gives rank 0 5 regions and rank 1 7 in epoch 0.
    # skip_mask_sources []: keep each image's box-fallback region too, so the images hold 1, 2, 3 regions.
    cfg = tiny_train_cfg.model_copy(update={"seed": 1, "eval_fraction": 0.0, "skip_mask_sources": [], "batch_size": 2,
                                            "max_steps": 6, "checkpoint_every": 100, "warmup_steps": 1, "num_workers": 0})
    results = run_ranks(_rank_main, WORLD, str(tmp_path / "pg"), str(data), str(tmp_path / "cache"),
                        str(tmp_path / "hf"), cfg.model_dump_json(), str(tmp_path / "run"))
    a, b = results[0], results[1]
    assert a["n"] == b["n"] == 12
    assert a["per_epoch"] == b["per_epoch"] == 2
    assert a["step"] == b["step"] == 6 and a["epoch"] == b["epoch"] == 3
    for e in range(3):
        assert len(a["seen"][e]) == len(b["seen"][e]) == 4 and not set(a["seen"][e]) & set(b["seen"][e])
    assert a["seen"][0] != a["seen"][1] or a["seen"][1] != a["seen"][2]  # reshuffled across epochs
