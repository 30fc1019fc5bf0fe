"""PixCLIP training loop: three branches on one batch, AdamW with per-part learning rates, resumable.

Checkpoints (RUN/checkpoints/step_XXXXXXX/) hold model.safetensors (weights) and train_state.pt
(optimizer, scheduler, step, epoch position: tensors and plain values only, read back with
weights_only=True); RUN/checkpoints/latest names the newest complete one and is swapped in atomically.
RUN/run.json records the config and text dimension so `evaluate` can rebuild the model. Data
randomness depends only on (seed, epoch, index) and the sampler can start mid-epoch, so `--resume`
continues exactly where the run stopped.

Distributed: under torchrun (WORLD_SIZE > 1) or Ray Train (`distributed.py`, which sets up the process
group itself) the model is wrapped in DDP, the sampler is sharded by rank, and the loss gathers
features across ranks (open_clip's ClipLoss / gather_features). At the end the ranks check that
their weights are still identical.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from annotate.config import TrainConfig
from annotate.pixclip.build import build_pixclip
from annotate.pixclip.loss import PixCLIPLoss, clamp_logit_scale
from annotate.pixclip.model import PixCLIP
from annotate.pixclip.transforms import to_model_input
from annotate.train.data import EpochSampler
from annotate.train.job import TrainJob
from annotate.train.parts import collate_parts, part_arguments

RUN_FILE = "run.json"
RESULT_FILE = "train_result.json"  # the last call's final step and losses
_print = functools.partial(print, flush=True)


def param_groups(model: PixCLIP, cfg: TrainConfig) -> list[dict]:
    """Mask conv at lr_mask_conv, adaptor at lr_adaptor, the rest at lr_other.

    lr_adaptor unset: lr_other when a trained adaptor is loaded (the paper inherits LLM2CLIP's), else
    lr_mask_conv, since a random adaptor at the paper's 1e-7 would stay random.

    Weight decay applies to weight matrices/kernels/embeddings only: not to biases, norm gains or the
    temperature (open_clip's rule: parameters with fewer than 2 dims, plus logit_scale).
    """
    trained = cfg.adaptor_checkpoint or getattr(model, "adaptor_pretrained", False)
    adaptor = cfg.lr_adaptor or (cfg.lr_other if trained else cfg.lr_mask_conv)
    lrs = {"mask_conv": cfg.lr_mask_conv, "adaptor": adaptor, "other": cfg.lr_other}
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "mask_conv" if "mask_proj" in name else "adaptor" if name.startswith("text_adaptor") else "other"
        decay = p.ndim >= 2 and "logit_scale" not in name
        buckets.setdefault((part, decay), []).append((name, p))
    groups = []
    for (part, decay), items in sorted(buckets.items()):
        groups.append(
            {
                "name": f"{part}{'' if decay else '_no_decay'}",
                "params": [p for _, p in items],
                "param_names": [n for n, _ in items],
                "lr": lrs[part],
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
        )
    return groups


def warmup_cosine(warmup: int, total: int):
    """LR multiplier: linear warmup to 1, then cosine to 0 at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _dist_info() -> tuple[int, int]:
    """(rank, world size), starting the process group under torchrun. torchrun starts one process per
    GPU but leaves every process on cuda:0; NCCL's object collectives (`all_gather_object`) use the
    current device, so without `set_device(LOCAL_RANK)` all ranks land on GPU 0 (duplicate-GPU error or
    hang). Ray Train sets the device itself and hands over an initialised group, so it is not touched."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    def __init__(self, cfg: TrainConfig, model: PixCLIP, dataset, output: str | Path, device: str | None = None):
        self.cfg, self.dataset, self.output = cfg, dataset, Path(output)
        self.rank, self.world = _dist_info()
        local_gpu = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if self.world > 1 else "cuda"
        self.device = torch.device(device or (local_gpu if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.ddp = self.model
        if self.world > 1:
            ids = [self.device.index or 0] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.loss_fn = PixCLIPLoss(cfg.alpha_fc, cfg.beta_lg, cfg.use_fc, cfg.use_lg, self.rank, self.world,
                                   cfg.short_weight, cfg.hard_negative_weight, cfg.part_weight)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), betas=(0.9, 0.98), eps=1e-6)
        groups = [dataset.group(i) for i in range(len(dataset))] if cfg.group_by_image else None
        self.sampler = EpochSampler(len(dataset), cfg.seed, True, self.rank, self.world, groups)
        self.steps_per_epoch = len(self.sampler) // (cfg.batch_size * cfg.grad_accum_steps)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} samples is less than one batch of {cfg.batch_size}")
        self.check_ranks_agree()
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(min(cfg.warmup_steps, self.total_steps), self.total_steps)
        )
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        bf16 = cfg.amp_bf16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        # bf16 autocast on GPUs that support it; on CPU it is slow and changes numerics, so fp32.
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    # ------------------------------------------------------------------ one step
    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The loss of one batch: the three branches, and the short-text, hard-negative and part ones when
        their texts are in the batch (the model assembles the branches, through DDP)."""
        cfg = self.cfg
        image, mask = to_model_input(batch["image"], batch["mask"])  # uint8 from the loader -> floats here
        crop_image, crop_mask = to_model_input(batch["crop_image"], batch["crop_mask"]) if cfg.use_fc else (None, None)
        with self.autocast:
            branches = self.model.branch_features(
                image, mask, batch["text"], crop_image, crop_mask, local_tau=cfg.lg_tau if cfg.use_lg else None,
                forward=self.ddp, short_text=batch.get("short_text"), negative_text=batch.get("negative_text"),
                negative_mask=batch.get("negative_mask"), **part_arguments(batch))
        return self.loss_fn.of_branches(branches, self.model.logit_scale)

    # ------------------------------------------------------------------ loop
    def loader(self) -> DataLoader:
        """The DataLoader over the sampler, built once per `fit` (not per epoch): with workers > 0 and
        persistent_workers they stay alive across epochs. Each pass calls iter() on it after
        `sampler.set_epoch`, and the sampler's iterator is made in this process at that moment, so the
        epoch and start position still change every pass (samples depend only on (seed, epoch, index),
        so a resumed run is unaffected by which worker loads what)."""
        workers = loader_workers(self.cfg, self.device)
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            persistent_workers=bool(self.cfg.persistent_workers and workers > 0),
            drop_last=True,
            collate_fn=collate_parts,
            pin_memory=self.device.type == "cuda",
        )

    def fit(self, max_steps: int | None = None, log=_print) -> dict:
        """Train until `max_steps` (or the config's total) optimizer steps; returns the last losses.

        Host syncs: losses stay on the device and are summed there; they are read (`float`) only at log
        steps (the logged losses are the mean over the micro-batches since the previous log) and once at
        the end (the returned dict: the last micro-batch's losses). Under DDP with gradient accumulation,
        all micro-batches but a step's last run under `no_sync()`, so gradients are all-reduced once
        per optimizer step."""
        cfg, last = self.cfg, {}
        stop = min(max_steps or self.total_steps, self.total_steps)
        accum = cfg.grad_accum_steps
        self.model.train()
        t0 = time.time()
        loader = self.loader()
        window: dict[str, list] = {}  # loss name -> [sum on the device, micro-batches] since the last log
        try:
            while self.step < stop:
                self._next_epoch_if_done()
                # Gradients never cross a pass over the loader: an epoch's leftover micro-batches (fewer
                # than `accum`) must not reach the next epoch's first step.
                self.optimizer.zero_grad(set_to_none=True)
                self.sampler.set_epoch(self.epoch, self.step_in_epoch * cfg.batch_size * accum)
                micro = 0
                for batch in loader:
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                    micro += 1
                    with self._grad_sync(micro % accum == 0):
                        out = self.losses(batch)
                        (out["total"] / accum).backward()
                    last = {k: v.detach() for k, v in out.items()}
                    for k, v in last.items():
                        acc = window.setdefault(k, [torch.zeros_like(v), 0])
                        acc[0] += v
                        acc[1] += 1
                    if micro % accum:
                        continue
                    self.optimizer.step()
                    clamp_logit_scale(self.model.logit_scale)
                    if cfg.use_hard_negatives:
                        clamp_logit_scale(self.model.negative_logit_scale)
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    self.step_in_epoch += 1
                    if self.step % cfg.log_every == 0 or self.step == stop:
                        if self.rank == 0:
                            means = {k: float(total) / n for k, (total, n) in window.items()}
                            rec = {"step": self.step, "epoch": self.epoch, **means, "s": round(time.time() - t0, 1)}
                            rec["logit_scale"] = float(self.model.logit_scale.detach().exp())
                            log(json.dumps(rec))
                        window = {}
                    self._next_epoch_if_done()  # an epoch's last step is saved as the next epoch's start
                    if self.step % cfg.checkpoint_every == 0 or self.step == stop:
                        self.save()
                    if self.step >= stop or self.step_in_epoch == 0:
                        break
                self._next_epoch_if_done()
        finally:
            _shutdown_workers(loader)
        self.check_replicas_in_sync()
        return {k: float(v) for k, v in last.items()}

    def _grad_sync(self, sync: bool):
        """DDP's `no_sync()` for a micro-batch whose gradient is only accumulated (forward and backward
        both inside it, as DDP requires); the step's last micro-batch all-reduces the summed gradients."""
        if sync or self.ddp is self.model:
            return nullcontext()
        return self.ddp.no_sync()

    def _next_epoch_if_done(self) -> None:
        """Move to the next epoch once this one has all its steps. Also run after `load`: a checkpoint
        written on an epoch's last step (by older versions, as (epoch, steps_per_epoch)) would otherwise
        start the sampler at the epoch's end, where the leftover samples (fewer than batch_size x
        grad_accum_steps, but possibly a whole micro-batch) were fed forward and their gradient added to
        the next epoch's first step: a resumed run then differed from an uninterrupted one."""
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def check_ranks_agree(self) -> None:
        """Fail fast, with the numbers, when ranks would run different step counts (they would
        otherwise deadlock or mismatch collectives mid-epoch): e.g. ranks that see different data."""
        if self.world == 1:
            return
        mine = (len(self.dataset), self.steps_per_epoch)
        every = [None] * self.world
        dist.all_gather_object(every, mine)
        if len(set(every)) > 1:
            raise RuntimeError(f"ranks disagree on (samples, steps per epoch): {every}")

    def check_replicas_in_sync(self) -> None:
        """Every rank must hold the same weights after DDP training; a silent divergence (a rank that
        skipped an all-reduce, a non-deterministic op outside DDP) would otherwise only show up as a
        worse model."""
        if self.world == 1:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().double().flatten().cpu() for p in self.model.parameters()])
            digest = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=flat.dtype)).sum()])
        digests = [torch.zeros_like(digest) for _ in range(self.world)]
        dist.all_gather_object(digests, digest)
        spread = max(float((d - digests[0]).abs().max()) for d in digests)
        if spread > 1e-6 * float(digests[0].abs().max() + 1):
            raise RuntimeError(f"DDP replicas diverged: rank weight digests {[d.tolist() for d in digests]}")

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """Write step_XXXXXXX/ whole and durable, then move `latest` to it in one step.

        train_state.pt holds only tensors and plain Python values (the optimizer's and scheduler's own
        state dicts, ints), so `load` reads it with weights_only=True: a checkpoint copied from elsewhere
        cannot run code when resumed."""
        if self.rank != 0:
            return None
        path = self.output / "checkpoints" / f"step_{self.step:07d}"
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}, path / "model.safetensors")
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": int(self.step),
            "epoch": int(self.epoch),
            "step_in_epoch": int(self.step_in_epoch),
        }
        torch.save(state, path / "train_state.pt")
        for name in ("model.safetensors", "train_state.pt"):
            _fsync_file(path / name)
        _point_latest(path)
        return path

    def load(self, path: str | Path) -> None:
        path = Path(path)
        self.model.load_state_dict(load_file(path / "model.safetensors", device=str(self.device)))
        state = torch.load(path / "train_state.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self._next_epoch_if_done()


LOADER_MS_PER_SAMPLE = 5.0  # loader CPU per sample: 3.1-3.4 ms at 224 px on a loaded core (BENCHMARKS.md 8), with margin
FAST_STEP_MS = 100.0  # the fastest step auto keeps fed: half an H100 step of EVA02-B/16 at batch 128


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """`train.num_workers`, with "auto" resolved per rank.

    A rank needs batch_size x LOADER_MS_PER_SAMPLE / step time workers to load a batch per step; auto
    provisions for a FAST_STEP_MS step (batch 128: 7 workers), but takes no more than the cores this
    rank has (its CPU affinity split over LOCAL_WORLD_SIZE ranks) less one for the rank's own process,
    and on a CPU-only run less the intra-op threads instead, since the model runs on the same cores (a
    2-core box with one thread: 1 worker). A fixed number is used as given."""
    if cfg.num_workers != "auto":
        return int(cfg.num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    spare = cores // local - (1 if device.type == "cuda" else torch.get_num_threads())
    needed = math.ceil(cfg.batch_size * LOADER_MS_PER_SAMPLE / FAST_STEP_MS)
    return max(0, min(needed, spare))


def _shutdown_workers(loader: DataLoader) -> None:
    """Stop a persistent loader's workers now rather than whenever the loader is garbage-collected
    (an exception's traceback can keep it alive)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()  # pylint: disable=protected-access
    loader._iterator = None  # pylint: disable=protected-access


LATEST = "latest"  # RUN/checkpoints/latest: the name of the newest complete checkpoint folder


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _point_latest(checkpoint: Path) -> None:
    """Make RUN/checkpoints/latest name `checkpoint`, atomically: the name goes to a temporary file,
    is fsynced, and os.replace swaps it in. A crash at any moment leaves either the old pointer or the
    new one, never an empty or torn file (a resume would otherwise find no checkpoint and start over);
    the folder is fsynced so the swap itself survives a power loss."""
    from annotate.data.writer import fsync_dir

    folder = checkpoint.parent
    tmp = folder / f".{LATEST}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(checkpoint.name)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / LATEST)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(folder)


def latest_checkpoint(run: str | Path) -> Path | None:
    pointer = Path(run) / "checkpoints" / LATEST
    return pointer.parent / pointer.read_text().strip() if pointer.exists() else None


def cpu_threads(limit: int | None = None) -> None:
    """Intra-op threads on a CPU: at most `limit`, by default half the cores.

    Small models on a small, shared CPU: extra intra-op threads mostly spin (measured 6x slower with
    2 threads than 1 on a loaded 2-core box).
    """
    if not torch.cuda.is_available():
        limit = limit or max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(max(1, min(torch.get_num_threads(), limit)))


def run_record(cfg: TrainConfig, model: PixCLIP, text_dim: int, source: dict) -> dict:
    """run.json: the config with the shape actually built (a width or adaptor read from a checkpoint
    file included), so that `evaluate.load_run` rebuilds the same model without that file."""
    return {"config": {**cfg.model_dump(mode="json"), **model.shape_settings()}, "text_dim": text_dim, **source}


def train(job: TrainJob, log=_print, device: str | None = None) -> dict:
    """`annotate train`: on a pipeline output (with its text cache) or on the synthetic benchmark."""
    cfg, output = job.cfg, job.output
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if job.synthetic:
        from annotate.train.synthetic import TEXT_DIM, SyntheticDataset

        dataset, text_dim = SyntheticDataset(cfg, n_images=SYNTHETIC_TRAIN_IMAGES, seed=1), TEXT_DIM
        source = {"synthetic": True}
    else:
        from annotate.train.data import RegionDataset
        from annotate.train.text_cache import TextCache

        cache_path = job.text_cache or cfg.text_embed_cache
        if not cache_path or not Path(cache_path).exists():
            raise FileNotFoundError("no text cache: run `annotate embed-text` first (or pass --text-cache)")
        cache = TextCache(cache_path)
        dataset, text_dim = RegionDataset(job.data, cache, cfg, "train"), cache.dim
        source = {"synthetic": False, "data_dir": str(job.data), "text_cache": str(cache_path)}
        if dataset.benchmark is not None:  # its images were left out; `annotate eval` checks this
            source["benchmark"] = {"name": dataset.benchmark.name, "sha256": dataset.benchmark.digest}
    model = build_pixclip(cfg, text_dim)
    run_meta = run_record(cfg, model, text_dim, source)
    trainer = Trainer(cfg, model, dataset, output, device)
    if trainer.rank == 0:
        (output / RUN_FILE).write_text(json.dumps(run_meta, indent=2))
    else:
        log = _silent
    ckpt = latest_checkpoint(output) if job.resume else None
    if job.resume and ckpt is None:
        log(f"--resume: no checkpoint under {output}, starting from scratch")
    if ckpt is not None:
        trainer.load(ckpt)
        log(f"resumed from {ckpt} at step {trainer.step}")
    last = trainer.fit(job.max_steps or cfg.max_steps, log=log)
    result = {"step": trainer.step, "world_size": trainer.world, "checkpoint": str(latest_checkpoint(output)), **last}
    if trainer.rank == 0:
        (output / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result


def _silent(*_args, **_kwargs) -> None:
    """The log of ranks other than 0: one line per event, not one per rank."""


SYNTHETIC_TRAIN_IMAGES = 4000
