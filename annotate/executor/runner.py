"""Run the annotation chain (or one stage of it) over shards on Ray Data.

One streaming dataset over all pending shards: a read task per shard (the data plane) feeds one
actor pool per stage; each stage calls its model deployment. The driver consumes the stream and
writes each shard's output as soon as all of its images have arrived (then renames it into place
and appends its manifest line), so a run that dies loses only the shards in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from rich.console import Console

from annotate.config import PipelineConfig, RunConfig
from annotate.data.shards import find_shards
from annotate.data.writer import ShardWriter, write_dataset_card
from annotate.executor.layout import FINAL, MODEL_STAGE_PREFIXES, STAGE_IO, OutputLock, RunLayout
from annotate.executor.progress import ProgressDisplay, ProgressTracker
from annotate.executor.shard_io import ROW_SHARD, ROW_TOTAL, count_rows, row_to_record
from annotate.executor.reader import read_shard
from annotate.executor.workers import SegmentWorker, StageWorker, finalize_record
from annotate.serving.apps import SEGMENT_MODEL, ModelApp, ensure_apps, needed_models, replica_info, replicas
from annotate.serving.client import ModelClient
from annotate.stages.budget import StageBudget, check_budgets

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    output_dir: Path
    stage: str
    shards_written: dict[str, dict] = field(default_factory=dict)
    shards_skipped: list[str] = field(default_factory=list)
    dashboard_url: str | None = None
    replicas: list[dict] = field(default_factory=list)  # where each model replica runs (app, node, pid)
    models_deployed: list[str] = field(default_factory=list)  # models this run had to load (others were running)
    processing_s: float | None = None  # from all deployments ready to the end (bench/pipeline_overhead.py)
    token_budgets: list[dict] = field(default_factory=list)  # each stage's worst case, counted at load time


def ensure_ray(run: RunConfig, address: str | None = None) -> str | None:
    """Join the cluster at `address` (or the config's), or start a local one; return the dashboard URL.

    A local cluster's dashboard binds to `run.dashboard_host` (127.0.0.1 unless configured).
    """
    if not ray.is_initialized():
        address = address or run.ray_address
        kwargs: dict = {"namespace": "longgrit", "log_to_driver": run.log_to_driver}
        if address:
            kwargs["address"] = address
        else:
            kwargs.update(include_dashboard=True, dashboard_host=run.dashboard_host, num_cpus=run.num_cpus)
            if run.dashboard_port is not None:
                kwargs["dashboard_port"] = run.dashboard_port
        ray.init(**kwargs)
        ray.data.DataContext.get_current().enable_progress_bars = False  # we draw our own (rich)
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    return f"http://{url}" if url and not url.startswith("http") else url


def _has_retryable_failures(path: Path) -> bool:
    regions = pq.read_table(path, columns=["regions"]).column("regions").to_pylist()
    return any(
        r["status"] == "failed" and (r["error"] or "").startswith(MODEL_STAGE_PREFIXES) for rs in regions for r in rs or []
    )


def plan_work(cfg: PipelineConfig, layout: RunLayout, input_dir: Path, shard_ids: list[int], stage: str,
              retry_failed: bool) -> tuple[list[dict], list[str]]:
    """Which shards this run must process, and from which stored input; the rest are finished."""
    input_name, output_name, _ = STAGE_IO[stage]
    fingerprint = cfg.fingerprint()
    refs = find_shards(input_dir, shard_ids, cfg.data.shard_format)
    finished_out = layout.finished(output_name, fingerprint)
    finished_in = layout.finished(input_name, fingerprint)
    items, skipped = [], []
    for ref in refs:
        item = {"shard": ref.name, "shard_id": ref.shard_id, "source_path": str(ref.path),
                "source_format": ref.format, "needs_prepare": False, "retry_failed": False, "input": input_name}
        if ref.name in finished_out:
            if retry_failed and _has_retryable_failures(layout.output_path(output_name, ref.name)):
                item.update(input=output_name, retry_failed=True)
                items.append(item)
            else:
                skipped.append(ref.name)
            continue
        if ref.name not in finished_in:
            if input_name != "prepare":
                previous = next(s for s, io in STAGE_IO.items() if io[1] == input_name)
                raise RuntimeError(
                    f"shard {ref.name} has no finished `{input_name}` output in {layout.root}; "
                    f"run `annotate run --stage {previous}` on it first"
                )
            item["needs_prepare"] = True
        items.append(item)
    return items, skipped


def run_pipeline(cfg: PipelineConfig, input_dir: str | Path, output_dir: str | Path, shard_ids: list[int],
                 stage: str = "all", retry_failed: bool = False, address: str | None = None,
                 console: Console | None = None) -> RunSummary:
    console = console or Console(stderr=True)
    if stage not in STAGE_IO:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_IO)}")
    input_name, output_name, chain = STAGE_IO[stage]
    missing = [s for s in chain if s not in cfg.stages]
    if missing:
        raise ValueError(f"the pipeline file defines no stage {', '.join(missing)} (needed by --stage {stage})")
    layout = RunLayout(root=Path(output_dir))
    summary = RunSummary(output_dir=layout.root, stage=stage)
    with OutputLock(layout.root):
        if removed := layout.remove_stale_temporaries():
            console.print(f"removed {removed} half-written file(s) left by an interrupted run")
        items, summary.shards_skipped = plan_work(cfg, layout, Path(input_dir), shard_ids, stage, retry_failed)
        if summary.shards_skipped:
            console.print(f"{len(summary.shards_skipped)} shard(s) already finished: {', '.join(summary.shards_skipped)}")
        if not items:
            console.print("nothing to do")
            return summary
        summary.dashboard_url = ensure_ray(cfg.run, address)
        if summary.dashboard_url:
            console.print(f"Ray dashboard: {summary.dashboard_url}")
        models = needed_models(cfg, chain)
        apps = ensure_apps(models, cfg.run, on_event=console.print)
        summary.models_deployed = [name for name, app in apps.items() if app.deployed_now]
        summary.replicas = replica_info(apps)
        budgets = check_token_budgets(cfg, apps, chain)
        summary.token_budgets = [b.as_dict() for b in budgets]
        for budget in budgets:
            console.print(f"token budget: {budget.describe()}")
        processing_started = time.perf_counter()
        tracker = ProgressTracker.remote()
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_shard, batch_size=1, batch_format="pyarrow", num_cpus=cfg.run.reader_cpus,
            compute=ray.data.TaskPoolStrategy(size=cfg.run.shards_in_flight) if cfg.run.shards_in_flight else None,
            fn_kwargs={"data": cfg.data, "layout_root": str(layout.root), "fingerprint": cfg.fingerprint(),
                       "rows_per_batch": cfg.run.rows_per_batch},
        )
        if SEGMENT_MODEL in apps:
            ds = ds.map_batches(
                SegmentWorker, batch_size=cfg.segment.batch_images, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=cfg.run.batches_in_flight),
                num_cpus=cfg.run.stage_worker_cpus, max_concurrency=cfg.run.batches_in_flight,
                fn_constructor_kwargs={"segment": cfg.segment, "app": apps[SEGMENT_MODEL], "data": cfg.data},
            )
        workers = stage_worker_counts(cfg, chain)
        for name in chain:
            stage_cfg = cfg.stages[name]
            model = cfg.models[stage_cfg.model]
            # The model's in-flight cap is shared by every stage worker that calls it.
            app = apps[stage_cfg.model]
            share = -(-app.max_in_flight // sum(n for s, n in workers.items() if cfg.stages[s].model == stage_cfg.model))
            ds = ds.map_batches(
                StageWorker, batch_size=stage_cfg.batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=workers[name],
                                                   max_tasks_in_flight_per_actor=cfg.run.batches_in_flight),
                num_cpus=cfg.run.stage_worker_cpus, max_concurrency=cfg.run.batches_in_flight,
                fn_constructor_kwargs={"stage_name": name, "stage": stage_cfg, "app": apps[stage_cfg.model],
                                       "reasoning": model.reasoning, "max_in_flight": share, "data": cfg.data,
                                       "tracker": tracker, "cache_root": str(layout.cache_root)},
            )
        with ProgressDisplay(tracker, chain, len(items), console) as display:
            summary.shards_written = _write_outputs(ds, layout, output_name, cfg.fingerprint(), display)
        for item in items:  # shards with no image at all produce no row, but still get an (empty) output
            if item["shard"] not in summary.shards_written and count_rows(layout.output_path(item["input"], item["shard"])) == 0:
                writer = ShardWriter(layout.output_path(output_name, item["shard"]), expected_rows=0)
                summary.shards_written[item["shard"]] = _commit(writer, layout, output_name, item["shard"], cfg.fingerprint())
        unfinished = [i["shard"] for i in items if i["shard"] not in summary.shards_written]
        if unfinished:
            raise RuntimeError(f"shard(s) {', '.join(unfinished)} did not complete; rerun the same command to redo them")
        if output_name == FINAL:
            write_dataset_card(layout.root, config_fingerprint=cfg.fingerprint(), pipeline=cfg.name)
        summary.processing_s = time.perf_counter() - processing_started
        _write_run_record(layout, summary, cfg)
    return summary


def check_token_budgets(cfg: PipelineConfig, apps: dict[str, ModelApp], chain: tuple[str, ...]) -> list[StageBudget]:
    """Each stage's worst-case prompt, counted by its model's deployment; BudgetError when one does not
    fit or names an unknown stop token (stages/budget.py)."""
    clients = {name: ModelClient(apps[name], reasoning=False, max_in_flight=8)
               for name in {cfg.stages[stage].model for stage in chain}}
    return asyncio.run(check_budgets(cfg, chain, {n: c.count_tokens for n, c in clients.items()},
                                     {n: c.token_id for n, c in clients.items()}))


def stage_worker_counts(cfg: PipelineConfig, chain: tuple[str, ...]) -> dict[str, int]:
    """Stage workers per stage: `run.stage_workers_per_replica` per replica of the stage's model (its
    autoscaling maximum when it autoscales)."""
    return {name: replicas(cfg.models[cfg.stages[name].model]) * cfg.run.stage_workers_per_replica for name in chain}


def _write_run_record(layout: RunLayout, summary: RunSummary, cfg: PipelineConfig) -> None:
    """OUT/runs/TIME.json: what one invocation did and where its model replicas ran."""
    runs = layout.root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    record = {"stage": summary.stage, "config": cfg.fingerprint(), "pipeline": cfg.name,
              "shards_written": summary.shards_written, "shards_skipped": summary.shards_skipped,
              "replicas": summary.replicas, "models_deployed": summary.models_deployed,
              "token_budgets": summary.token_budgets}
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (runs / f"{stamp}-{os.getpid()}.json").write_text(json.dumps(record, indent=2, sort_keys=True))


def _commit(writer: ShardWriter, layout: RunLayout, output: str, shard: str, fingerprint: str) -> dict:
    """Rename the shard's output into place, then append its manifest line; returns its counts."""
    stats = writer.commit()
    layout.record_finished({"output": output, "shard": shard, "config": fingerprint, "sha256": stats.sha256, **stats.summary()})
    return stats.summary()


def _write_outputs(ds, layout: RunLayout, output: str, fingerprint: str, display: ProgressDisplay) -> dict[str, dict]:
    writers: dict[str, ShardWriter] = {}
    written: dict[str, dict] = {}
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            assert isinstance(batch, pa.Table)
            for row in batch.to_pylist():
                shard = row[ROW_SHARD]
                if shard in written:
                    log.warning("dropping a repeated row of finished shard %s (image %s)", shard, row["image_key"])
                    continue
                record = row_to_record(row)
                if output == FINAL:
                    finalize_record(record)
                writer = writers.get(shard)
                if writer is None:
                    writer = writers[shard] = ShardWriter(layout.output_path(output, shard), row[ROW_TOTAL])
                if not writer.add(record):
                    log.warning("dropping a repeated row for image %s of shard %s", record.image_key, shard)
                if writer.complete:
                    written[shard] = _commit(writer, layout, output, shard, fingerprint)
                    del writers[shard]
                    display.shard_done()
    finally:
        for writer in writers.values():
            writer.abort()
    return written
