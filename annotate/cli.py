"""The `annotate` command line. It only parses arguments and calls into the package."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import typer

DAMAGED_EXIT_CODE = 3  # some shard was read only in part: written with what was read, to be redone
BREAKER_EXIT_CODE = 4  # a stage failed systematically: the run stopped itself (stages/breaker.py)

app = typer.Typer(
    help="LongGRIT: annotate GRIT-20M regions with vision-language models; train PixCLIP on them.",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(help="Local model utilities (tiny random-weight models for CPU runs).", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("make-tiny")
def make_tiny(
    out_dir: str = typer.Argument(..., help="folder that receives one folder per tiny model"),
    force: bool = typer.Option(False, "--force", help="rebuild even when already built"),
) -> None:
    """Build the tiny random-weight models, no network: the CPU pipeline's (a Qwen2 text model, a LLaVA
    VLM, SAM) and replicas of the paper's architectures (InternVL2, Qwen2-Instruct, R1-distill Llama,
    Griffon-G for vLLM's out-of-tree model)."""
    from annotate.models.registry import build_all

    for kind, path in build_all(out_dir, force=force).items():
        typer.echo(f"{kind}\t{path}")


@app.command()
def version() -> None:
    """Print the package version."""
    from annotate import __version__

    typer.echo(__version__)


@app.command()
def prepare(
    input: str = typer.Option(..., "--input", help="folder holding NNNNN.tar / NNNNN.parquet shards"),
    shards: str = typer.Option(..., "--shards", help="shard ids, e.g. 0-99,120"),
    output: str = typer.Option(..., "--output", help="output folder (OUT/stages/prepare/*.parquet, manifest, README.md)"),
    config: str | None = typer.Option(None, "--config", help="pipeline YAML (default: built-in settings)"),
) -> None:
    """Run the data plane only: regions and masks, no captions (regions stay "pending").

    Writes the store `annotate run` uses: a run with the same --config and --output takes these shards
    as prepared. Shards already prepared are skipped. Exits with code 3 when a shard could be read
    only in part (what was read is written)."""
    from annotate.data.prepare import run_prepare

    if run_prepare(input, shards, output, config).get("damaged"):
        raise typer.Exit(DAMAGED_EXIT_CODE)


@app.command()
def run(
    stage: str = typer.Option("all", "--stage", help="object | validate | context | merge | all"),
    shards: str = typer.Option(..., "--shards", help="shard ids, e.g. 0-99,120,130-135"),
    input: str = typer.Option(..., "--input", help="folder holding NNNNN.tar / NNNNN.parquet GRIT shards"),
    output: str = typer.Option(..., "--output", help="output folder (dataset in OUT/data, stage outputs, manifest)"),
    config: str = typer.Option("pipelines/tiny.yaml", "--config", help="pipeline YAML"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster to join (default: start a local one)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="redo only regions a model stage failed"),
    verbose: bool = typer.Option(False, "--verbose", help="show Ray's, Serve's and vLLM's logs here, not in OUT/logs/"),
) -> None:
    """Annotate GRIT shards with the model chain on Ray; rerun the same command to resume.

    Exits with code 3, after finishing every other shard, when a shard could be read only in part."""
    from annotate.config import load_config
    from annotate.data.shards import parse_shard_spec
    from annotate.executor.runner import run_pipeline

    cfg, shard_ids = load_config(config), parse_shard_spec(shards)  # a bad argument is said on the terminal
    with _breaker_exit(), _quiet(output, verbose) as (console, log_path):
        summary = run_pipeline(cfg, input, output, shard_ids, stage=stage, retry_failed=retry_failed,
                               address=address, console=console)
    _print_run_summary(summary, log_path)
    if summary.shards_damaged:
        raise typer.Exit(DAMAGED_EXIT_CODE)


@app.command()
def serve(
    config: str = typer.Option("pipelines/tiny.yaml", "--config", help="pipeline YAML: its models are deployed"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster (default: a local one, kept until Ctrl-C)"),
    stop: bool = typer.Option(False, "--stop", help="stop this pipeline's model deployments instead"),
) -> None:
    """Start the pipeline's models as Ray Serve deployments that later runs reuse (or --stop them)."""
    import json

    from annotate.config import load_config
    from annotate.executor.services import serve_models

    typer.echo(json.dumps(serve_models(load_config(config), address, stop=stop), default=str))


@app.command()
def doctor(
    config: str = typer.Option(..., "--config", help="pipeline YAML of the run to check"),
    input: str = typer.Option("sample_data/grit", "--input", help="folder holding the GRIT shards"),
    shard: int = typer.Option(0, "--shard", help="the shard whose first images are asked about"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster to check on (default: a local one)"),
    images: int = typer.Option(2, "--images", min=1, help="images asked about"),
    regions: int = typer.Option(2, "--regions", min=1, help="regions per image"),
    max_failed: float = typer.Option(0.5, "--max-failed", min=0, max=1,
                                     help="share of a stage's regions that may fail before the check fails"),
    prompt_factor: float = typer.Option(1.5, "--prompt-factor", min=1,
                                        help="how far a stage's mean prompt may exceed the planner's assumption"),
    log_file: str | None = typer.Option(None, "--log-file",
                                        help="where Ray's, Serve's and vLLM's logs go (default: a new file in the temp folder)"),
    verbose: bool = typer.Option(False, "--verbose", help="show Ray's, Serve's and vLLM's logs here, not in the log file"),
) -> None:
    """Before a long run: the load-time checkpoint check, then deploy (or find) every model, count the
    token budgets, send a few real requests per stage from the first images of a shard through the
    stages' own code, and print each answer, its finish reason, the token it stopped on, its tokens beside
    the planner's assumption and what the rules made of it. Exits 1 on a load-time refusal, an answer cut
    by max_tokens or stopped on a token the stage does not name, too many failed regions, or prompts
    far above the plan."""
    from annotate.config import load_config
    from annotate.doctor import describe, run_doctor

    from annotate.console import doctor_log_path

    cfg = load_config(config)  # a bad file is said on the terminal, before anything is redirected
    log_path = None if verbose else (Path(log_file) if log_file else doctor_log_path())
    with _libraries_logging_to(log_path) as console:
        report = run_doctor(cfg, input, shard, address, images, regions, max_failed, prompt_factor,
                            on_event=lambda e: console.print(e, highlight=False, markup=False))
    typer.echo(describe(report))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def status(output: str = typer.Argument(..., help="the --output folder of a run")) -> None:
    """Per-shard and per-stage counts, rejection rate and tokens per region of a run."""
    from annotate.executor.report import print_status, status_report

    print_status(status_report(output))


@app.command()
def show(
    output: str = typer.Argument(..., help="the --output folder of a run"),
    html_dir: str | None = typer.Option(None, "--html-dir", help="gallery folder (default OUT/gallery)"),
    shards: str | None = typer.Option(None, "--shards", help="only these shards, e.g. 0-9 (default: all)"),
    max_images: int | None = typer.Option(None, "--max-images", min=1, help="at most this many images per shard page"),
    region: str | None = typer.Option(None, "--region", help="render only this region id (shard:image_key:index) ..."),
    png: str | None = typer.Option(None, "--png", help="... into this PNG file"),
    kept_parts_only: bool = typer.Option(
        False, "--kept-parts-only", help="with --png: leave out the parts the mask checks rejected (default: dashed)"),
) -> None:
    """Write a static HTML gallery of a run's output (regions drawn on their images, captions, status
    filters), or render one region and its parts to a PNG with --region ID --png FILE."""
    from annotate.gallery import write_gallery
    from annotate.show import RegionNotFound, render_region_png

    if (region is None) != (png is None):
        raise typer.BadParameter("--region and --png go together", param_hint="--region/--png")
    if region is not None:
        try:
            typer.echo(render_region_png(output, region, png, rejected_parts=not kept_parts_only))
        except RegionNotFound as e:
            raise typer.BadParameter(str(e), param_hint="--region") from None
        return
    from annotate.data.shards import parse_shard_spec

    try:
        gallery = write_gallery(output, html_dir, parse_shard_spec(shards) if shards else None, max_images)
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e), param_hint="OUTPUT") from None
    typer.echo(f"{len(gallery.pages)} shard page(s), {gallery.regions} regions: {gallery.index}")


@app.command()
def diff(
    out_a: str = typer.Argument(..., help="the --output folder of one run (A)"),
    out_b: str = typer.Argument(..., help="the --output folder of the run to compare with it (B)"),
    field: list[str] | None = typer.Option(None, "--field", help="compare only this region field (repeatable; "
                                           "default: every field a stage writes)"),
    examples: int = typer.Option(3, "--examples", min=0, help="examples shown per changed field"),
    json_path: str | None = typer.Option(None, "--json", help="also write the whole result (counts, examples) here"),
) -> None:
    """Per region field, how many regions the same, changed, or set on one side only, with examples, and
    the status transitions (e.g. ok -> failed): what a prompt change did, before training on it."""
    from annotate.diff import NoDataset, diff_outputs, print_diff, write_json

    try:
        result = diff_outputs(out_a, out_b, field, examples)
    except NoDataset as e:
        raise typer.BadParameter(str(e), param_hint="OUT_A/OUT_B") from None
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--field") from None
    print_diff(result)
    if json_path:
        typer.echo(f"full result: {write_json(result, json_path)}")


@app.command()
def export(
    output: str = typer.Argument(..., help="the --output folder of a run"),
    dest: str = typer.Argument(..., help="folder that receives annotations.json (and images/ with --images)"),
    fmt: str = typer.Option(..., "--format", help="the export format: coco (objects and PACO-style parts)"),
    images: bool = typer.Option(False, "--images", help="also write each exported image's bytes to DEST/images/"),
    all_statuses: bool = typer.Option(False, "--all-statuses", help="export every region, not only status ok"),
) -> None:
    """Write the finished shards' regions and their kept parts as COCO JSON (masks as RLE, parts linked
    to their object by obj_ann_id, captions as extra fields), readable by pycocotools."""
    from annotate.export import FORMATS, NoDataset, export_coco

    if fmt not in FORMATS:
        raise typer.BadParameter(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}", param_hint="--format")
    try:
        summary = export_coco(output, dest, images=images, statuses=None if all_statuses else ("ok",))
    except NoDataset as e:
        raise typer.BadParameter(str(e), param_hint="OUTPUT") from None
    if summary.skipped_shards:
        typer.echo(f"not finished, left out: {', '.join(summary.skipped_shards)}")
    typer.echo(f"{summary.images} image(s), {summary.objects} object(s), {summary.parts} part(s): {summary.annotations}")


@app.command()
def demo(
    output: str = typer.Option("out/demo", "--output", help="where the demo dataset goes"),
    config: str = typer.Option("pipelines/tiny.yaml", "--config", help="pipeline YAML"),
    verbose: bool = typer.Option(False, "--verbose", help="show Ray's, Serve's and vLLM's logs here, not in OUT/logs/"),
) -> None:
    """Run the whole chain on the bundled sample shards with the tiny CPU models."""
    from annotate.config import load_config
    from annotate.executor.runner import run_pipeline

    cfg = load_config(config)
    with _breaker_exit(), _quiet(output, verbose) as (console, log_path):
        summary = run_pipeline(cfg, "sample_data/grit", output, [0, 1], stage="all", console=console)
    _print_run_summary(summary, log_path)
    if summary.shards_damaged:
        raise typer.Exit(DAMAGED_EXIT_CODE)


@contextmanager
def _quiet(output: str, verbose: bool):
    """(console, log path): the libraries' output in OUT/logs/ unless --verbose (annotate/console.py)."""
    from annotate.data.store import OutputStore

    log_path = None if verbose else OutputStore(output).library_log_path()
    with _libraries_logging_to(log_path) as console:
        yield console, log_path


@contextmanager
def _libraries_logging_to(log_path: Path | None):
    """The quiet console (annotate/console.py), saying first where the libraries' logs go."""
    from annotate.console import library_logs_to

    with library_logs_to(log_path) as console:
        if log_path is not None:
            console.print(f"Ray, Serve and vLLM log to {log_path} (--verbose shows them here)", highlight=False)
        yield console


@contextmanager
def _breaker_exit():
    """A run its breaker stopped: its message, not a traceback, and exit code 4."""
    from annotate.stages.breaker import BreakerTripped

    try:
        yield
    except BreakerTripped as exc:
        typer.echo(f"\n{exc}", err=True)
        raise typer.Exit(BREAKER_EXIT_CODE) from None


def _print_run_summary(summary, log_path=None) -> None:

    typer.echo(f"\n{summary.stage}: wrote {len(summary.shards_written)} shard(s), "
               f"{len(summary.shards_skipped)} already finished")
    for shard, counts in sorted({**summary.shards_written, **summary.shards_damaged}.items()):
        typer.echo(f"  {shard}: {counts['images']} images, {counts['regions']} regions: ok {counts['ok']}, "
                   f"rejected {counts['rejected']}, failed {counts['failed']}, pending {counts['pending']}"
                   + ("  DAMAGED" if shard in summary.shards_damaged else ""))
    if summary.shards_damaged:
        from annotate.executor.runner import describe_damaged

        typer.echo("\n" + describe_damaged(summary.shards_damaged), err=True)
    from annotate.data.store import FINAL, OutputStore

    store = OutputStore(summary.output_dir)
    if summary.output == FINAL and store.dataset_files():
        typer.echo(f"\nDataset: {store.folder(FINAL)}  (card: {store.root / 'README.md'})\n"
                   f"Load it with:\n  from datasets import load_dataset\n"
                   f"  ds = load_dataset(\"{store.root}\", split=\"train\")")
    if log_path is not None:
        typer.echo(f"Library logs (Ray, Serve, vLLM): {log_path}")


@app.command()
def plan(
    regions: int = typer.Option(..., "--regions", min=1, help="regions entering the object stage"),
    config: str = typer.Option("pipelines/longgrit.yaml", "--config", help="pipeline YAML (models, GPUs per replica)"),
    gpu: str | None = typer.Option(None, "--gpu-type", "--gpu", help="GPU type in the throughput table (default: the pipeline's)"),
    from_run: str | None = typer.Option(None, "--from-run", help="a finished run's --output: measure tokens and reach, "
                                        "and check the prediction against them"),
    throughput: str | None = typer.Option(None, "--throughput", help="throughput table (default pipelines/throughput.yaml)"),
    sample_shards: int | None = typer.Option(None, "--sample-shards", min=1,
                                             help="read the first N shards of --input for the regions' crop shapes"),
    input_dir: str | None = typer.Option(None, "--input", help="shard folder for --sample-shards"),
    gpus: int | None = typer.Option(None, "--gpus", min=1, help="cluster size: balance replicas per model on N GPUs "
                                    "and print the `models:` snippet"),
) -> None:
    """Estimate busy and billed GPU-hours and the wall time for N regions; with --gpus, the balanced layout."""
    from annotate.plan import run_plan

    try:
        run_plan(config, regions, gpu, from_run, throughput, sample_shards, input_dir, gpus)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise typer.BadParameter(str(e)) from e


@app.command("train")
def train_cmd(
    output: str = typer.Option(..., "--output", help="run folder (checkpoints/, run.json)"),
    data: str | None = typer.Option(None, "--data", help="pipeline output OUT (OUT/data/*.parquet)"),
    synthetic: bool = typer.Option(False, "--synthetic", help="train a small PixCLIP on the synthetic benchmark"),
    config: str | None = typer.Option(None, "--config", help="pipeline YAML; its `train` section is used"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="stop after this many optimizer steps"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run's latest checkpoint"),
    text_cache: str | None = typer.Option(None, "--text-cache", help="embed-text output (default: train.text_embed_cache)"),
    workers: int | None = typer.Option(None, "--workers", min=1, help="train on N Ray Train workers with DDP"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster to train on (RUN and --data on shared storage)"),
    gpu: bool = typer.Option(False, "--gpu", help="one GPU per Ray Train worker (NCCL); default CPU workers (gloo)"),
    cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker", help="CPUs each Ray Train worker reserves"),
    max_failures: int = typer.Option(0, "--max-failures", help="restart the workers this often, from the newest checkpoint"),
) -> None:
    """Train PixCLIP (L_CL + a*L_FC + b*L_LG) on pipeline output or on the synthetic benchmark."""
    from annotate.train.commands import run_train

    typer.echo(run_train(output, data, synthetic, config, max_steps, resume, text_cache,
                         workers, address, gpu, cpus_per_worker, max_failures))


@app.command("eval")
def eval_cmd(
    checkpoint: str | None = typer.Option(None, "--checkpoint", help="run folder or one of its checkpoints "
                                          "(needed by all but --make-benchmark)"),
    data: str | None = typer.Option(None, "--data", help="pipeline output OUT: M2T/T2M retrieval on exactly the regions of "
                                    "its frozen benchmark (OUT/benchmarks/longgrit-N.json) when it has one, else on the "
                                    "images whose key hashes into train.eval_fraction"),
    synthetic: bool = typer.Option(False, "--synthetic", help="evaluate on the synthetic benchmark"),
    zero_shot: str | None = typer.Option(None, "--zero-shot", help="zero-shot classification JSON (see evaluate.py); "
                                         "samples are decoded --batch-size at a time"),
    output: str | None = typer.Option(None, "--output", help="results JSON (default RUN/eval.json)"),
    task: str | None = typer.Option(None, "--task", help="a paper benchmark: imagenet-s, coco-instances, refcoco, "
                                    "refcoco+, refcocog, flickr30k, coco-retrieval, sharegpt4v, urban1k, docci, refsav "
                                    "(Table 5, on the refsav_1000.jsonl list you supply: the paper's list is not published), "
                                    "winoground (Table 10), rec-refcoco-{val,testA,testB}, rec-refcoco+-{val,testA,testB}, "
                                    "rec-refcocog-{val,test} (ReCLIP's REC on detector proposals with given SAM masks); each "
                                    "follows the reference script's protocol (written into the result's `protocol`; BENCHMARKS 14)"),
    bench_dir: str | None = typer.Option(None, "--bench-dir", help="the benchmark's local copy, in its published layout"),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="images embedded (and, for --task and --zero-shot, "
                                   "decoded and held) at a time; scores do not depend on it"),
    make_benchmark: str | None = typer.Option(None, "--make-benchmark", metavar="OUT", help=(
        "freeze a LongGRIT-N evaluation split of pipeline output OUT into OUT/benchmarks/longgrit-N.json (no model "
        "needed): trainable regions (status ok, fine caption, mask; box/none mask fallbacks left out), whole images "
        "in a --seed'ed order until --n regions (the last image cut to make exactly N), recorded by region id. "
        "Then `eval --data OUT` scores exactly those N, and `train --data OUT` never trains on their images "
        "(retrain after freezing). One per output; the same data, --n and --seed give the same file")),
    n: int = typer.Option(2000, "--n", min=1, help="--make-benchmark: regions in the split (the gallery size)"),
    seed: int = typer.Option(0, "--seed", help="--make-benchmark: the seed of the image order"),
    audit_overlap: str | None = typer.Option(None, "--audit-overlap", metavar="TRAIN_OUT", help=(
        "with --task: before evaluating, find the benchmark's images that also appear in training output TRAIN_OUT "
        "(an `annotate run` --output) by a 64-bit perceptual hash (dHash) within --overlap-threshold bits; the "
        "count, ids and matched training keys go into the result's `overlap`. Without --checkpoint: the audit alone")),
    exclude_overlap: bool = typer.Option(False, "--exclude-overlap", help="with --audit-overlap: leave the overlapping "
                                         "images out of the evaluated set (a Winoground example when either image overlaps)"),
    overlap_threshold: int = typer.Option(6, "--overlap-threshold", min=0, max=63, help="--audit-overlap: the largest "
                                          "Hamming distance (of 64 bits) counted as the same image"),
) -> None:
    """Mask<->text retrieval R@1/5/10, zero-shot region classification, one paper benchmark (--task), or
    freeze a LongGRIT-N evaluation split of a pipeline output (--make-benchmark)."""
    from annotate.train.commands import run_eval

    if audit_overlap or exclude_overlap:
        import json

        if not task or not bench_dir:
            raise typer.BadParameter("--audit-overlap / --exclude-overlap need --task and --bench-dir")
        if exclude_overlap and not audit_overlap:
            raise typer.BadParameter("--exclude-overlap needs --audit-overlap TRAIN_OUT")
        from annotate.train.commands import cpu_threads
        from annotate.train.eval_tasks import audit_and_exclude, evaluate_task
        from annotate.train.evaluate import print_table

        cpu_threads()
        if not checkpoint:  # the audit alone
            from annotate.train.benchmarks import read_task

            _, res = audit_and_exclude(read_task(task, bench_dir), audit_overlap, bench_dir, False, overlap_threshold)
            print(json.dumps(res, indent=2))
            if output:
                with open(output, "w") as f:
                    json.dump(res, f, indent=2)
            return
        res = evaluate_task(checkpoint, task, bench_dir, output, batch_size, audit_overlap, exclude_overlap,
                            overlap_threshold)
        print(json.dumps(res, indent=2))
        print_table({k: v for k, v in res.items() if k != "overlap"})
        over = res["overlap"]
        left = f", left out ({over['units_evaluated']} of {over['units_before']} evaluated)" if exclude_overlap else ""
        typer.echo(f"overlap with {audit_overlap}: {over['count']} of {over['eval_images']} images{left}", err=True)
        return
    if not make_benchmark and not checkpoint:
        raise typer.BadParameter("--checkpoint is needed (all but --make-benchmark evaluate a model)")
    run_eval(checkpoint, data, synthetic, zero_shot, output, task, bench_dir, batch_size, make_benchmark, n, seed)


@app.command("embed-text")
def embed_text_cmd(
    data: str = typer.Option(..., "--data", help="pipeline output OUT"),
    output: str = typer.Option(..., "--output", help="text-feature cache folder"),
    config: str | None = typer.Option(None, "--config", help="pipeline YAML (train.text_encoder, text_pooling)"),
) -> None:
    """Encode every caption once with the frozen text encoder into a memory-mapped fp16 cache."""
    from annotate.train.commands import run_embed_text

    typer.echo(f"{run_embed_text(data, output, config)} texts cached in {output}")


@app.command()
def score(
    output: str = typer.Argument(..., help="the --output folder of a run"),
    checkpoint: str = typer.Option(..., "--checkpoint", help="a PixCLIP training run folder (or one checkpoint in it)"),
    text_cache: str | None = typer.Option(None, "--text-cache", help="`annotate embed-text` of OUTPUT (default: the run's)"),
) -> None:
    """Write a PixCLIP checkpoint's region-text score of every described region to
    OUTPUT/quality/region_text_scores.parquet (a side file; shard files are not changed)."""
    import json

    from annotate.train.commands import run_score

    typer.echo(json.dumps(run_score(output, checkpoint, text_cache), indent=2))


@app.command("ablation")
def ablation_cmd(
    output: str = typer.Option(..., "--output", help="folder for the runs and ablation.md"),
    max_steps: int | None = typer.Option(None, "--max-steps", help="optimizer steps per row"),
    config: str | None = typer.Option(None, "--config", help="pipeline YAML (default: synthetic preset)"),
    branches: bool = typer.Option(False, "--branches",
                                  help="the short-text, hard-negative and part branches on top of the full loss instead"),
) -> None:
    """Loss ablation (L_CL; +L_LG; +L_LG+L_FC), or with --branches what the short-text, hard-negative
    and part branches add, on the synthetic benchmark, as a markdown table."""
    from annotate.train.commands import run_ablation

    typer.echo(run_ablation(output, max_steps, config, branches=branches))


if __name__ == "__main__":
    app()
