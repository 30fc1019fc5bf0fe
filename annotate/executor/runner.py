"""Run the annotation chain (or one stage of it) over shards on Ray Data.

One streaming dataset over all pending shards: a read task per shard (the data plane) feeds one
actor pool per stage; each stage calls its model deployment. The driver consumes the stream and
writes each shard's output as soon as all of its images have arrived (then renames it into place
and appends its manifest line), so a run that dies loses only the shards in flight. A shard whose
input could be read only in part still goes through the chain with what was read, and is recorded
`damaged`, never finished: the run ends with an error naming it, and the next run tries it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import ray
from rich.console import Console

from annotate.cluster import ensure_ray
from annotate.config import PipelineConfig, QualityConfig
from annotate.data.shards import find_shards
from annotate.data.records import SCHEMA_VERSION
from annotate.data.store import (DAMAGED, FINAL, FINISHED, PREPARE, OutputStore, config_fingerprint, count_rows,
                                  damage_of, input_changed, prepare_fingerprint, read_columns,
                                  read_region_lists, write_json_atomic)
from annotate.data.writer import ShardWriter
from annotate.engines.checkpoint_check import check_checkpoints
from annotate.engines.result_cache import remove_shard
from annotate.executor.admission import check_cpus, cpu_need, ray_cpus
from annotate.executor.progress import ProgressDisplay, ProgressTracker
from annotate.executor.reader import ShardLedger, read_shard
from annotate.executor.relineage import RunLineage, lineage_counts, refuse_stale_deployments
from annotate.executor.shard_io import ROW_SHARD, ROW_TOTAL, row_to_record
from annotate.executor.workers import ChainWorker, SegmentWorker, StepSpec
from annotate.serving.apps import (SEGMENT_MODEL, ModelApp, ensure_apps, needed_models, replica_info, replicas,
                                   running_apps)
from annotate.serving.client import ModelClient
from annotate.stages.breaker import BreakerTripped, StageBreakers
from annotate.stages.budget import StageBudget, check_budgets
from annotate.stages.chain import (StageIO, chain_of, check_stages, finalize_record, is_retryable, stage_class, stage_io,
                                   stage_writing)
from annotate.stages.lineage import LineageKey
from annotate.stages.quality import write_near_duplicates

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    output_dir: Path
    stage: str
    output: str = FINAL  # what the run writes: a stage's output, or the dataset
    shards_written: dict[str, dict] = field(default_factory=dict)
    shards_skipped: list[str] = field(default_factory=list)
    # shard -> counts plus `damage` (why) and `samples_read`: read in part, written, not finished
    shards_damaged: dict[str, dict] = field(default_factory=dict)
    dashboard_url: str | None = None
    replicas: list[dict] = field(default_factory=list)  # where each model replica runs (app, node, pid)
    models_deployed: list[str] = field(default_factory=list)  # models this run had to load (others were running)
    processing_s: float | None = None  # from all deployments ready to the end (bench/pipeline_overhead.py)
    token_budgets: list[dict] = field(default_factory=list)  # each stage's worst case, counted at load time
    model_calls: dict[str, dict] = field(default_factory=dict)  # stage -> calls sent to its model, and replayed
    answers: dict[str, dict] = field(default_factory=dict)  # stage -> answers read, cleaned, retried, ruled out (why)
    failures: dict[str, dict] = field(default_factory=dict)  # stage -> failed regions by error kind
    stopped: dict | None = None  # why a stage's breaker stopped the run (stages/breaker.py), when it did
    # stage -> regions whose stored field was kept or is made again (its lineage changed), and which parts
    # of the lineage changed (stages/lineage.py), over the shards a finished dataset was reused for
    lineage: dict[str, dict] = field(default_factory=dict)


def _has_retryable_failures(path: Path) -> bool:
    return any(is_retryable(r["status"], r["error"]) for rs in read_region_lists(path) for r in rs)


def plan_work(cfg: PipelineConfig, store: OutputStore, input_dir: Path, shard_ids: list[int], io: StageIO,
              fingerprint: str, prepared_under: str, retry_failed: bool,
              lineage: Callable[[str], str] | None = None) -> tuple[list[dict], list[str]]:
    """Which shards this run must process, and from which stored input; the rest are finished.

    Only a shard output whose newest manifest line is `finished` under this config, with the file's
    checksum, counts as done. A `damaged` input (a stage output made from a shard read in part) is
    used by the next stage and its damage carried on; a damaged `prepare` is made again from the source.
    The `prepare` output is keyed by the data settings alone (`prepared_under`: `prepare_fingerprint`).

    `lineage(output)` is the digest of the chain's lineage keys through the stage that writes `output`
    (`RunLineage.of_output`); it is asked for only when a finished line keeps one to compare with (it reads
    the models' weights). A line of this config whose digest differs is not done (a model folder replaced
    under the same path). A stage output (not `prepare`, not the dataset) finished under another config
    with this digest was made from the same data, models, prompts and settings: it is done, and the next
    `--stage` takes it as input, so a new merge prompt does not redo object. In a whole-chain run, a
    dataset shard finished under another config, of this schema, whose prepared regions are still current,
    is the input instead of `prepare`: the read task clears only the fields whose lineage changed
    (`relineage`), and the chain makes those again.
    """
    input_name, output_name = io.reads, io.writes
    refs = find_shards(input_dir, shard_ids, cfg.data.shard_format)
    latest_out, latest_in = store.latest(output_name), store.latest(input_name)
    latest_prepare = latest_in if input_name == PREPARE else store.latest(PREPARE)

    def holding(line: dict | None, *states: str) -> dict | None:
        under = prepared_under if line and line.get("output") == PREPARE else fingerprint
        return line if line and store.is_current(line, under, *states) else None

    def same_lineage(line: dict | None, *states: str) -> dict | None:
        """A stage output's line of another config, made under this run's lineage through its stage."""
        if (lineage is None or line is None or line.get("output") in (PREPARE, FINAL) or line.get("lineage") is None
                or not store.is_current(line, line.get("config", ""), *states)):
            return None
        return line if line["lineage"] == lineage(line["output"]) else None

    def reusable(line: dict | None) -> bool:
        """A finished dataset shard of another config whose fields may be kept by lineage."""
        if not (lineage is not None and io.reads == PREPARE and output_name == FINAL and line is not None
                and store.is_current(line, line.get("config", ""), FINISHED)):
            return False
        versions = read_columns(store.output_path(FINAL, line["shard"]), ["schema_version"])
        return all(row["schema_version"] == SCHEMA_VERSION for row in versions)

    items, skipped = [], []
    for ref in refs:
        item = {"shard": ref.name, "shard_id": ref.shard_id, "source_path": str(ref.path),
                "source_format": ref.format, "needs_prepare": False, "retry_failed": False, "input": input_name,
                "damage": None, "relineage": False}
        if input_changed(latest_prepare.get(ref.name), ref.path):  # the source file was replaced since
            if input_name != PREPARE:
                raise RuntimeError(f"shard {ref.name}'s source {ref.path} changed since it was prepared; "
                                   "run all stages (`annotate run` without --stage) on it again")
            item["needs_prepare"] = True
            items.append(item)
            continue
        done = holding(latest_out.get(ref.name), FINISHED)
        if done and lineage is not None and done.get("lineage") is not None and done["lineage"] != lineage(output_name):
            done = None  # the same config, another lineage: a model folder replaced under the same path
        done = done or same_lineage(latest_out.get(ref.name), FINISHED)
        if done:
            if retry_failed and _has_retryable_failures(store.output_path(output_name, ref.name)):
                item.update(input=output_name, retry_failed=True)
                items.append(item)
            else:
                skipped.append(ref.name)
            continue
        if holding(latest_prepare.get(ref.name), FINISHED) and reusable(latest_out.get(ref.name)):
            item.update(input=FINAL, relineage=True, retry_failed=retry_failed)
            items.append(item)
            continue
        usable = (FINISHED,) if input_name == PREPARE else (FINISHED, DAMAGED)
        line = holding(latest_in.get(ref.name), *usable) or same_lineage(latest_in.get(ref.name), *usable)
        if line is None:
            if input_name != PREPARE:
                raise RuntimeError(
                    f"shard {ref.name} has no finished `{input_name}` output in {store.root}; "
                    f"run `annotate run --stage {stage_writing(input_name, chain_of(cfg))}` on it first"
                )
            item["needs_prepare"] = True
        elif line.get("state") == DAMAGED:
            item["damage"] = damage_of(line)
        items.append(item)
    return items, skipped


def run_pipeline(cfg: PipelineConfig, input_dir: str | Path, output_dir: str | Path, shard_ids: list[int],
                 stage: str = "all", retry_failed: bool = False, address: str | None = None,
                 console: Console | None = None) -> RunSummary:
    console = console or Console(stderr=True)
    io = stage_io(stage, chain_of(cfg))
    check_stages(cfg, io.stages)
    output_name, chain = io.writes, io.stages
    fingerprint = config_fingerprint(cfg)  # once per run: it reads every prompt file
    prepared_under = prepare_fingerprint(cfg)  # what planning and every read task key `prepare` outputs by
    lineage = RunLineage(cfg, announce=lambda message: console.print(message, highlight=False), console=console)
    store = OutputStore(Path(output_dir))
    summary = RunSummary(output_dir=store.root, stage=stage, output=io.writes)
    with store.lock(), ExitStack() as run_end:
        if removed := store.remove_stale_temporaries():
            console.print(f"removed {removed} half-written file(s) left by an interrupted run")
        items, summary.shards_skipped = plan_work(cfg, store, Path(input_dir), shard_ids, io, fingerprint, prepared_under,
                                                  retry_failed, lineage.of_output)
        for shard in summary.shards_skipped:  # model results kept for a shard are in its output now
            remove_shard(store.cache_root, shard)
        if summary.shards_skipped:
            console.print(f"{len(summary.shards_skipped)} shard(s) already finished: {', '.join(summary.shards_skipped)}")
        if not items:
            console.print("nothing to do")
            return summary
        keys, identities = lineage.keys, lineage.identities  # with work to do: the models' identities are needed
        records = store.run_records()  # once: what earlier runs into OUT were, for the counts and the refusal
        summary.lineage = lineage_counts(store, items, keys, records)
        for name, counts in summary.lineage.items():
            console.print(f"lineage: {name}: {counts['kept']} region(s) kept, {counts['recomputed']} to make again"
                          + (f" ({', '.join(counts['changed'])} changed)" if counts["changed"] else ""), highlight=False)
        # Each stage's model against its checkpoint's own files (template, EOS, stop tokens, reasoning),
        # here in the driver before any model is deployed or shard read: folders not on this machine
        # are skipped with a log line (engines/checkpoint_check.py).
        for note in check_checkpoints(cfg, chain):
            console.print(f"checkpoint: {note}")
        summary.dashboard_url = ensure_ray(cfg.run, address)
        if summary.dashboard_url:
            console.print(f"Ray dashboard: {summary.dashboard_url}")
        models = needed_models(cfg, chain)
        apps = ensure_apps(models, cfg.run, on_event=console.print)
        summary.models_deployed = [name for name, app in apps.items() if app.deployed_now]
        refuse_stale_deployments(records, identities, apps)
        summary.replicas = replica_info(apps)
        budgets = check_token_budgets(cfg, apps, chain)
        summary.token_budgets = [b.as_dict() for b in budgets]
        for budget in budgets:
            console.print(f"token budget: {budget.describe()}")
        workers = chain_worker_count(cfg, chain)
        admit_workers(cfg, chain, apps, address, warn=console.print)  # before a shard is read
        processing_started = time.perf_counter()
        tracker = ProgressTracker.remote()
        ledger = ShardLedger.remote()
        # This run's actors end with it, whichever way: a program that runs again (benchmarks, tests) must not carry them.
        run_end.callback(lambda: [ray.kill(actor) for actor in (tracker, ledger)])
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_shard, batch_size=1, batch_format="pyarrow", num_cpus=cfg.run.reader_cpus,
            compute=ray.data.TaskPoolStrategy(size=cfg.run.shards_in_flight) if cfg.run.shards_in_flight else None,
            fn_kwargs={"data": cfg.data, "store_root": str(store.root), "fingerprint": prepared_under,
                       "rows_per_batch": cfg.run.rows_per_batch, "ledger": ledger, "lineage": lineage.digests},
        )
        if SEGMENT_MODEL in apps and "object" in chain:  # the segment step: object masks from boxes
            ds = ds.map_batches(
                SegmentWorker, batch_size=cfg.segment.batch_images, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=cfg.run.batches_in_flight,
                                                   max_concurrent_calls_per_actor=cfg.run.batches_in_flight),
                num_cpus=cfg.run.chain_worker_cpus,
                fn_constructor_kwargs={"segment": cfg.segment, "app": apps[SEGMENT_MODEL], "data": cfg.data},
            )
        # The chain runs in one pool of workers: each model's in-flight cap is shared by them all.
        steps = [StepSpec(name, cfg.stages[name], apps[cfg.stages[name].model], cfg.models[cfg.stages[name].model],
                          keys[name], apps.get(SEGMENT_MODEL) if stage_class(name, cfg.stages[name].stage_class).uses_segment
                          else None) for name in chain]
        shares = {key: -(-apps[key].max_in_flight // workers) for key in {step.model_key for step in steps}}
        ds = ds.map_batches(
            ChainWorker, batch_size=max(cfg.stages[name].batch_size for name in chain), batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=cfg.run.batches_in_flight,
                                               max_concurrent_calls_per_actor=cfg.run.batches_in_flight),
            num_cpus=cfg.run.chain_worker_cpus,
            fn_constructor_kwargs={"steps": steps, "shares": shares, "data": cfg.data, "tracker": tracker,
                                   "cache_root": str(store.cache_root) if cfg.run.result_cache else None},
        )
        outputs = ShardOutputs(store, output_name, fingerprint, ledger,
                               {i["shard"]: i["damage"] for i in items if i["damage"]}, cfg.quality,
                               lineage.through(chain[-1]))
        breakers = StageBreakers(cfg.run.breaker, chain)
        display = ProgressDisplay(tracker, chain, len(items), console, breakers=breakers)
        tripped: BreakerTripped | None = None
        try:
            with display:
                outputs.write(ds, display)  # raises BreakerTripped when a stage fails systematically
        except BreakerTripped as exc:
            tripped = exc
        summary.model_calls, summary.answers, summary.failures = display.model_calls, display.answers, display.failures
        if tripped is not None:  # the run record says what was done and why it stopped
            trip = tripped.trip
            summary.stopped = {"stage": trip.stage, "kind": trip.kind, "failed": trip.failed, "seen": trip.seen,
                               "samples": list(trip.samples)}
            summary.shards_written, summary.shards_damaged = outputs.written, outputs.damaged
            _write_run_record(store, summary, cfg.name, fingerprint, keys, identities)
            raise tripped
        if breakers.trip is not None:  # tripped at the last look, with every shard through: say so, do not stop
            console.print(f"warning: stage {breakers.trip.stage!r} failed {breakers.trip.share:.0%} of its last "
                          f"regions with `{breakers.trip.kind}` errors; see `annotate status`", markup=False)
        for item in items:  # shards with no image at all produce no row, but still get an (empty) output
            input_path = store.output_path(item["input"], item["shard"])
            if item["shard"] not in outputs.committed and input_path.is_file() and count_rows(input_path) == 0:
                outputs.commit(store.writer(output_name, item["shard"]), item["shard"])
        summary.shards_written, summary.shards_damaged = outputs.written, outputs.damaged
        unfinished = [i["shard"] for i in items if i["shard"] not in outputs.committed]
        if unfinished:
            raise RuntimeError(f"shard(s) {', '.join(unfinished)} did not complete; rerun the same command to redo them")
        if output_name == FINAL:
            store.write_card(FINAL, config_fingerprint=fingerprint, pipeline=cfg.name)
            if cfg.quality is not None:
                console.print(f"near-duplicate clusters: {write_near_duplicates(store, cfg.quality)}")
        summary.processing_s = time.perf_counter() - processing_started
        _write_run_record(store, summary, cfg.name, fingerprint, keys, identities)
    return summary


def check_token_budgets(cfg: PipelineConfig, apps: dict[str, ModelApp], chain: tuple[str, ...]) -> list[StageBudget]:
    """Each stage's worst-case prompt, counted by its model's deployment; BudgetError when one does not
    fit or names an unknown stop token (stages/budget.py)."""
    clients = {name: ModelClient(apps[name], reasoning=False, max_in_flight=8)
               for name in {cfg.stages[stage].model for stage in chain}}
    return asyncio.run(check_budgets(cfg, chain, {n: c.count_tokens for n, c in clients.items()},
                                     {n: c.token_id for n, c in clients.items()}))


def admit_workers(cfg: PipelineConfig, chain: tuple[str, ...], apps: dict[str, ModelApp], address: str | None,
                  warn: Callable[[str], None]) -> None:
    """Ray waits silently for CPUs it cannot get: NotEnoughCpus on a local cluster that cannot hold the
    run's workers beside the models (`apps`, up), a warning through `warn` on a joined one."""
    others = sorted(set(running_apps()) - {app.app_name for app in apps.values()})
    segment_worker = cfg.segment is not None and "object" in chain
    check_cpus(cpu_need(cfg, chain_worker_count(cfg, chain), segment_worker),
               local=not (address or cfg.run.ray_address), others=others, warn=warn, resources=ray_cpus)


def chain_worker_count(cfg: PipelineConfig, chain: tuple[str, ...]) -> int:
    """Chain workers: `run.chain_workers_per_replica` per replica of the chain's most replicated model
    (its autoscaling maximum when it autoscales); each worker sends to every model of the chain."""
    return max(replicas(cfg.models[cfg.stages[name].model]) for name in chain) * cfg.run.chain_workers_per_replica


def _write_run_record(store: OutputStore, summary: RunSummary, pipeline: str, fingerprint: str,
                      keys: dict[str, LineageKey], identities: dict[str, dict]) -> None:
    """OUT/runs/TIME.json: what one invocation did, where its model replicas ran, and the lineage keys and
    model identities it ran under (what the next run compares with)."""
    record = {"stage": summary.stage, "config": fingerprint, "pipeline": pipeline, "lineage": summary.lineage,
              "lineage_keys": {stage: {"digest": key.digest, "parts": key.parts} for stage, key in keys.items()},
              "model_identities": identities,
              "shards_written": summary.shards_written, "shards_skipped": summary.shards_skipped,
              "shards_damaged": summary.shards_damaged, "model_calls": summary.model_calls, "answers": summary.answers,
              "failures": summary.failures, "stopped": summary.stopped,
              "replicas": summary.replicas, "models_deployed": summary.models_deployed,
              "token_budgets": summary.token_budgets}
    stamp = time.strftime("%Y%m%dT%H%M%S")
    write_json_atomic(store.runs_dir / f"{stamp}-{os.getpid()}.json", record, indent=2, sort_keys=True)


def describe_damaged(damaged: dict[str, dict]) -> str:
    """The message a run with damaged shards ends with: which, why, and what to do."""
    lines = [f"{len(damaged)} damaged shard(s): read only in part, written with what was read, not recorded as finished:"]
    lines += [f"  {shard}: {info['damage']} ({info['samples_read']} samples read)" for shard, info in sorted(damaged.items())]
    lines.append("Replace these input files (e.g. download them again) and rerun the same command: "
                 "only they are redone.")
    return "\n".join(lines)


class ShardOutputs:
    """The driver's side of a run: writes each shard's output once all its images arrived, and is the
    one writer of the manifest (its own lines, and the `prepare` lines read tasks hand over)."""

    def __init__(self, store: OutputStore, output: str, fingerprint: str, ledger, damage: dict[str, dict],
                 quality: QualityConfig | None = None, lineage: str | None = None):
        self.store, self.output, self.fingerprint, self.ledger = store, output, fingerprint, ledger
        self.lineage = lineage  # the lineage digest through the run's last stage, kept in each line
        self.quality = quality  # the quality record, written with the dataset (FINAL) only
        self.damage = dict(damage)  # shard -> {damage, samples_read}, from its input's line or its read task
        self.written: dict[str, dict] = {}
        self.damaged: dict[str, dict] = {}

    @property
    def committed(self) -> set[str]:
        return set(self.written) | set(self.damaged)

    def record_prepared(self) -> None:
        """Write the manifest lines of `prepare` outputs made by read tasks since the last call."""
        for line in ray.get(self.ledger.drain.remote()):
            self.store.record(line)
            if line.get("state") == DAMAGED:
                self.damage[line["shard"]] = damage_of(line)

    def commit(self, writer: ShardWriter, shard: str) -> None:
        """Rename the shard's output into place, then append its manifest line."""
        self.record_prepared()
        damage = self.damage.get(shard)
        self.store.commit(writer, self.output, shard, self.fingerprint, damage, self.lineage)
        if damage:
            self.damaged[shard] = {**writer.stats.summary(), **damage}
        else:
            self.written[shard] = writer.stats.summary()
        remove_shard(self.store.cache_root, shard)  # after its manifest line: its model results are in the output now

    def write(self, ds, display: ProgressDisplay) -> None:
        """Consume the stream, committing each shard once complete. A tripped breaker stops it: the
        iteration is closed (Ray Data shuts its operators down), shards in flight are aborted, never
        recorded; committed ones stay; `BreakerTripped` goes up to the command."""
        writers: dict[str, ShardWriter] = {}
        batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        try:
            for batch in batches:
                assert isinstance(batch, pa.Table)
                self.record_prepared()  # prepare outputs made so far are kept even when the run stops here
                display.raise_if_tripped()
                for row in batch.to_pylist():
                    shard = row[ROW_SHARD]
                    if shard in self.committed:
                        log.warning("dropping a repeated row of finished shard %s (image %s)", shard, row["image_key"])
                        continue
                    record = row_to_record(row)
                    if self.output == FINAL:
                        finalize_record(record, self.quality)
                    writer = writers.get(shard)
                    if writer is None:
                        writer = writers[shard] = self.store.writer(self.output, shard, row[ROW_TOTAL])
                    if not writer.add(record):  # the same image again: a read task that Ray ran twice
                        log.info("dropping a repeated row for image %s of shard %s", record.image_key, shard)
                    if writer.complete:
                        # A fresh look first (the tracker already holds every count of this shard's rows):
                        # no shard is recorded as finished once its stages are known to fail systematically.
                        display.raise_if_tripped(look=True)
                        self.commit(writers.pop(shard), shard)
                        display.shard_done()
            self.record_prepared()
        finally:
            close = getattr(batches, "close", None)
            if close is not None:  # ends Ray Data's streaming executor now, not at garbage collection
                try:
                    close()
                except Exception as exc:  # noqa: BLE001 - stopping is best effort; the error in flight wins
                    log.warning("closing the dataset iterator: %s", exc)
            for writer in writers.values():
                writer.abort()
