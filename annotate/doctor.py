"""`annotate doctor`: the preflight before a long run (issue 22).

In order, each step the run's own:
  1. the load-time checkpoint check (engines/checkpoint_check.py: chat template, EOS ids, stop tokens,
     reasoning parser), before anything is deployed; a refusal is shown as the run would show it and
     nothing more is done;
  2. deploy (or find) every model of the chain, and the load-time token budgets (stages/budget.py,
     counted by the deployments: each stage's worst-case prompt, stop tokens known to the tokenizer),
     and the run's CPU admission check (executor/admission.py: its chain workers beside these models);
  3. a handful of real requests per stage, built from the first images of a shard through the stages'
     own code (`build_stage`, `run_stage_async` with a `ModelClient`), with the stage's own retries as a
     run makes them; every answer, retries included, is kept and shown.

It prints per stage the raw answers with their finish reason, the token they stopped on and their token
counts, the measured prompt/completion tokens beside the planner's per-region assumption, and what the
stage's rules made of each region. It fails (non-zero exit) on, each with what to change:
  * the checkpoint check's, the budget check's or (on a local cluster) the CPU admission check's refusal;
  * an answer cut by `max_tokens` (finish `length`);
  * an answer that stopped on a token or string that is none of the stage's effective stop tokens
    (its own and its model family's) nor the model's EOS ids: the engine stops where the pipeline file
    does not say (told only where the engine reports it, vLLM's `stop_reason`, and token ids are named
    only where the model folder is on this machine);
  * a stage whose regions fail above a share (after the stage's retries: what a run would fail);
  * a stage that no region reached (every region failed or was rejected before it): it was not checked;
  * a stage whose mean measured prompt exceeds the planner's assumption by a factor. The assumption is
    `annotate plan`'s per-region default (plan.make_plan, pipelines/throughput.yaml) where the plan has
    one for the stage and its model; otherwise the load-time worst-case prompt of the budget check, a
    bound, not an estimate (said so in the output).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from annotate.config import ENGINE_KINDS, ModelConfig, PipelineConfig, SamplingConfig
from annotate.data.records import ImageRecord
from annotate.engines.base import ChatRequest, ChatResult
from annotate.engines.checkpoint_check import Checkpoint, CheckpointError, check_checkpoints, read_checkpoint
from annotate.engines.conventions import effective_stop_tokens
from annotate.stages.batch import StageCounts, run_stage_async
from annotate.stages.breaker import advice
from annotate.stages.budget import StageBudget
from annotate.stages.chain import build_stage, chain_of

ChatOne = Callable[[ChatRequest], Awaitable[ChatResult]]
DEFAULT_PROMPT_FACTOR = 1.5


@dataclass
class Exchange:
    request_id: str
    text: str
    finish_reason: str | None
    stop_reason: int | str | None
    last_token: str  # what the answer stopped on, in words ("<|im_end|> (id 2)", "EOS", "max_tokens", ...)
    prompt_tokens: int
    completion_tokens: int
    error: str | None


@dataclass
class TokenAssumption:
    """What the planner assumes of one stage's request, and where that comes from."""

    prompt: float
    completion: float | None
    source: str


@dataclass
class StageCheck:
    stage: str
    model: str
    max_tokens: int
    counts: StageCounts
    exchanges: list[Exchange] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)  # per region: status, and error or the stored field
    assumption: TokenAssumption | None = None
    problems: list[str] = field(default_factory=list)

    def measured(self) -> tuple[float, int, float] | None:
        """(mean prompt, largest prompt, mean completion) tokens over the answers that counted them."""
        counted = [e for e in self.exchanges if e.prompt_tokens]
        if not counted:
            return None
        return (sum(e.prompt_tokens for e in counted) / len(counted), max(e.prompt_tokens for e in counted),
                sum(e.completion_tokens for e in counted) / len(counted))


@dataclass
class DoctorReport:
    preflight: list[str] = field(default_factory=list)  # load-time refusals: checkpoint check, token budgets
    notes: list[str] = field(default_factory=list)  # what the load-time checks checked
    stages: list[StageCheck] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return self.preflight + [p for s in self.stages for p in s.problems]

    @property
    def ok(self) -> bool:
        return not self.problems


def first_items(cfg: PipelineConfig, input_dir: str | Path, shard_id: int, images: int, regions: int):
    """The first `images` images of a shard that have regions, each with at most `regions` regions, as
    (record, decoded image) pairs: what a chain worker holds."""
    from annotate.data.prepare import prepare_shard
    from annotate.data.shards import find_shards

    (ref,) = find_shards(Path(input_dir), [shard_id], cfg.data.shard_format)
    items: list[tuple[ImageRecord, object]] = []
    for prepared in prepare_shard(ref, cfg.data):
        record = prepared.record
        wanted = [r for r in record.regions if r.status == "pending"][:regions]
        if prepared.image is None or not wanted:
            continue
        record.regions = wanted
        items.append((record, prepared.image))
        if len(items) >= images:
            break
    return items


def token_assumptions(cfg: PipelineConfig, chain: tuple[str, ...], budgets: dict[str, StageBudget] | None = None,
                      notes: list[str] | None = None) -> dict[str, TokenAssumption]:
    """Per stage, the planner's tokens per request: `annotate plan`'s per-region default where the plan
    has the stage and knows its model, else the load-time worst-case prompt (a bound) where it was
    counted; stages with neither are left out. Why the plan has no figure goes to `notes`."""
    from annotate.plan import make_plan

    planned, why = {}, ""
    try:
        planned = {s.stage: s for s in make_plan(cfg, regions=1).stages}
    except (KeyError, ValueError) as exc:  # a model the throughput table does not know (tiny, local models)
        why = "annotate plan cannot plan this file"
        if notes is not None:
            notes.append(f"plan: no per-region token figures for this file ({str(exc).strip(chr(34) + chr(39))})")
    out = {}
    for name in chain:
        if name in planned:
            p = planned[name]
            out[name] = TokenAssumption(p.prompt_tokens, p.completion_tokens,
                                        "annotate plan's default per region (pipelines/throughput.yaml)")
        elif budgets and name in budgets:
            reason = why or "annotate plan has no default for this stage"
            out[name] = TokenAssumption(float(budgets[name].prompt_tokens), None,
                                        f"load-time worst-case prompt (stages/budget.py), a bound, not an estimate: "
                                        f"{reason}")
    return out


def last_token(result: ChatResult, sampling: SamplingConfig, model: ModelConfig,
               checkpoint: Checkpoint | None) -> tuple[str, str | None]:
    """What an answer stopped on, in words, and, when that is none of the stage's effective stop tokens,
    stop strings nor the model's EOS ids (as far as can be told), that token's name; else None."""
    if result.error is not None and result.finish_reason is None:
        return "no answer", None
    if result.finish_reason == "length":
        return "max_tokens (finish length)", None
    reason = result.stop_reason
    if reason is None:
        if ENGINE_KINDS[model.engine].vllm_stops:  # vLLM reports None for the tokenizer's EOS
            eos = f" ({', '.join(checkpoint.name(i) for i in checkpoint.eos_ids[:1])})" if checkpoint and \
                checkpoint.eos_ids else ""
            return f"EOS{eos}", None
        return f"not reported by the {model.engine} engine", None
    stops = effective_stop_tokens(sampling, model)
    if isinstance(reason, str):  # a stop string (vLLM reports the string it matched)
        if reason in sampling.stop or reason in stops:
            return f"stop string {reason!r}", None
        return f"stop string {reason!r}", reason
    # a token id: named and checked against the stage's stop ids (strings looked up in the model's
    # tokenizer) and the model's EOS ids, which vLLM also stops on (generation_config.json's among them)
    ints = {t for t in stops if isinstance(t, int)}
    if checkpoint is None:
        if reason in ints:
            return f"stop token id {reason}", None
        return f"token id {reason} (not named: the model folder is not on this machine)", None
    name = checkpoint.name(reason)
    allowed = ints | {i for i in map(checkpoint.token_id, stops) if i is not None}
    if not sampling.ignore_eos:
        allowed |= set(checkpoint.eos_ids)
    label = f"{name} (id {reason})"
    return label, (None if reason in allowed else name)


async def check_stages(cfg: PipelineConfig, items, chats: dict[str, ChatOne], model_ids: dict[str, str],
                       max_failed_share: float = 0.5, checkpoints: dict[str, Checkpoint] | None = None,
                       budgets: dict[str, StageBudget] | None = None,
                       prompt_factor: float = DEFAULT_PROMPT_FACTOR) -> DoctorReport:
    """Run the chain's stages in order over `items` (changed in place, as a run does), with each stage's
    retries, through `chats[model name]`; what each stage saw and what to fix. `checkpoints`: per model
    name, its folder as the checkpoint check read it (names stop token ids, knows its EOS ids);
    `budgets`: the load-time token budgets per stage (the planner's bound where it has no estimate)."""
    checkpoints = checkpoints or {}
    report = DoctorReport()
    chain = chain_of(cfg)
    assumptions = token_assumptions(cfg, chain, budgets, report.notes)
    for name in chain:
        stage_cfg = cfg.stages[name]
        model = cfg.models[stage_cfg.model]
        sampling = stage_cfg.sampling
        checkpoint = checkpoints.get(stage_cfg.model)
        stage = build_stage(name, stage_cfg, model_ids.get(stage_cfg.model, model.path), model)
        seen: list[ChatResult] = []
        chat = chats[stage_cfg.model]

        async def recorded(request: ChatRequest, chat=chat, seen=seen) -> ChatResult:
            result = await chat(request)
            seen.append(result)
            return result

        pixels = items if stage.prompt.images else [(record, None) for record, _ in items]
        counts = await run_stage_async(stage, pixels, recorded, cfg.data.crops, stage_cfg.max_attempts,
                                       stage_cfg.retry_temperature)
        check = StageCheck(name, stage_cfg.model, sampling.max_tokens, counts, assumption=assumptions.get(name))
        strays: dict[str, int] = {}
        for r in seen:
            label, stray = last_token(r, sampling, model, checkpoint)
            if stray is not None:
                strays[stray] = strays.get(stray, 0) + 1
            check.exchanges.append(Exchange(r.request_id, r.text, r.finish_reason, r.stop_reason, label,
                                            r.prompt_tokens, r.completion_tokens, r.error))
        for record, _ in items:
            for region in record.regions:
                if stage.writes and region.status != "failed" and getattr(region, stage.writes, None) is not None:
                    check.outcomes.append(f"{region.region_id}: {region.status}: {stage.writes} = "
                                          f"{_short(getattr(region, stage.writes))}")
                elif region.status == "failed" and region.error and region.error.startswith(f"{name}:"):
                    check.outcomes.append(f"{region.region_id}: failed: {region.error[:200]}")
        stops = ", ".join(map(str, effective_stop_tokens(sampling, model))) or "none"
        cut = [r for r in seen if r.finish_reason == "length"]
        if cut:
            what = _cut_advice(name, stage_cfg.model, sampling, model, checkpoint)
            check.problems.append(f"{name}: {len(cut)} of {len(seen)} answers cut by max_tokens "
                                  f"({sampling.max_tokens}, finish_reason length): {what}")
        for token, n in strays.items():
            check.problems.append(
                f"{name}: {n} of {len(seen)} answers stopped on {token}, which is none of the stage's stop tokens "
                f"({stops}), stop strings ({', '.join(sampling.stop) or 'none'}) nor model {stage_cfg.model}'s EOS "
                f"ids: the engine stops where the pipeline file does not say (a server default, generation_config). "
                f"If {token} ends the model's turn, add \"{token}\" to stages.{name}.sampling.stop_token_ids so every "
                "engine stops there; else find what makes the engine stop on it")
        asked = counts.regions_in
        if not asked:
            check.problems.append(f"{name}: not checked: no region reached it (every region failed or was rejected "
                                  "before it); fix the stages above, or ask about more with --images / --regions")
        if asked and counts.failed / asked > max_failed_share:
            kind, n = max(counts.failures_by_kind.items(), key=lambda kv: kv[1])
            check.problems.append(
                f"{name}: {counts.failed} of {asked} regions failed (most: {n} `{kind}`); check {advice(kind)}")
        if (problem := _token_problem(check, prompt_factor)) is not None:
            check.problems.append(problem)
        report.stages.append(check)
    return report


def _cut_advice(stage: str, model_name: str, sampling: SamplingConfig, model: ModelConfig,
                checkpoint: Checkpoint | None) -> str:
    raise_it = f"raise stages.{stage}.sampling.max_tokens"
    end = checkpoint.turn_end if checkpoint is not None else None
    if end is None or end.token is None:
        return (f"{raise_it}, or check the model's stop tokens (a stop token the model never emits lets it run on; "
                "the model folder is not on this machine, so its end of turn is not known here)")
    covered = end.token_id in {i for i in map(checkpoint.token_id, effective_stop_tokens(sampling, model)) if i is not None} \
        or (not sampling.ignore_eos and end.token_id in checkpoint.eos_ids)
    if covered:
        return (f"model {model_name}'s turns end with {end.token} (id {end.token_id}), which the stage stops on: the "
                f"answers are longer than max_tokens; {raise_it} (or shorten what the prompt asks for)")
    return (f"model {model_name}'s turns end with {end.token} (id {end.token_id}), which the stage does not stop on: "
            f"add \"{end.token}\" to stages.{stage}.sampling.stop_token_ids")


def _token_problem(check: StageCheck, factor: float) -> str | None:
    measured, assumed = check.measured(), check.assumption
    if measured is None or assumed is None or not assumed.prompt:
        return None
    mean, _, _ = measured
    if mean <= factor * assumed.prompt:
        return None
    if assumed.source.startswith("annotate plan"):
        change = (f"`annotate plan` underestimates this stage's GPU-hours (about x{mean / assumed.prompt:.1f} on "
                  f"prefill): set default_tokens.{check.stage}.text in pipelines/throughput.yaml (image tokens come from "
                  "the models' own processors: plan with --sample-shards N on your input), or plan with --from-run "
                  "OUT after a short run; if the prompt should not be this long, check crops.max_side, the stage's "
                  "prompt and the model's image tiling")
    else:
        change = ("the load-time budget check under-counts this stage's prompt, so a region may not fit max_model_len "
                  "at run time: raise run.budget_caption_words / run.budget_phrase_words (stages/budget.py)")
    return (f"{check.stage}: measured prompt {mean:,.0f} tokens per request, above {factor:g} x the assumed "
            f"{assumed.prompt:,.0f} ({assumed.source}): {change}")


def _short(value, n: int = 160) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[:n] + "..."


def preflight_checkpoints(cfg: PipelineConfig, chain: tuple[str, ...]) -> tuple[list[str], list[str],
                                                                                 dict[str, Checkpoint]]:
    """The run's load-time checkpoint check: (refusals, notes, per model name its checkpoint as read)."""
    read: list[tuple[ModelConfig, Checkpoint]] = []

    def reading(model: ModelConfig, folder: Path) -> Checkpoint:
        checkpoint = read_checkpoint(model, folder)
        read.append((model, checkpoint))
        return checkpoint

    try:
        notes = check_checkpoints(cfg, chain, read=reading)
    except CheckpointError as exc:
        return [str(exc)], [], {}
    by_name = {name: cp for name, m in cfg.models.items() for model, cp in read if model is m}
    return [], notes, by_name


def run_doctor(cfg: PipelineConfig, input_dir: str | Path, shard_id: int = 0, address: str | None = None,
               images: int = 2, regions: int = 2, max_failed_share: float = 0.5,
               prompt_factor: float = DEFAULT_PROMPT_FACTOR,
               on_event: Callable[[str], None] = print) -> DoctorReport:
    """The checkpoint check; then deploy (or find) the chain's models, count their token budgets and
    check every stage on the first images of a shard."""
    chain = chain_of(cfg)
    refused, notes, checkpoints = preflight_checkpoints(cfg, chain)
    if refused:  # as the run refuses: before anything is deployed or read
        return DoctorReport(preflight=refused)
    items = first_items(cfg, input_dir, shard_id, images, regions)
    if not items:
        raise ValueError(f"shard {shard_id} of {input_dir} has no image with regions to ask about")

    from annotate.cluster import ensure_ray
    from annotate.executor.admission import NotEnoughCpus
    from annotate.executor.runner import admit_workers, check_token_budgets
    from annotate.serving.apps import ensure_apps, needed_models
    from annotate.serving.client import ModelClient
    from annotate.stages.budget import BudgetError

    ensure_ray(cfg.run, address)
    models = {n: m for n, m in needed_models(cfg, chain).items() if n in cfg.models}  # no SAM: not a chat model
    apps = ensure_apps(models, cfg.run, on_event=on_event)
    preflight: list[str] = []
    budgets: dict[str, StageBudget] = {}
    try:
        budgets = {b.stage: b for b in check_token_budgets(cfg, apps, chain)}
        notes += [f"token budget: {b.describe()}" for b in budgets.values()]
    except BudgetError as exc:
        preflight.append(str(exc))
    try:  # the run's own workers beside these models: what `annotate run` would refuse or warn about
        admit_workers(cfg, chain, apps, address, warn=notes.append)
    except NotEnoughCpus as exc:
        preflight.append(str(exc))

    async def main() -> DoctorReport:
        chats = {}
        for name, app in apps.items():
            deadline = max(cfg.stages[s].request_deadline_s() for s in chain if cfg.stages[s].model == name)
            chats[name] = ModelClient(app, cfg.models[name].reasoning, max_in_flight=8, deadline_s=deadline).chat
        return await check_stages(cfg, items, chats, {n: a.model_id for n, a in apps.items()}, max_failed_share,
                                  checkpoints, budgets, prompt_factor)

    report = asyncio.run(main())
    report.preflight, report.notes = preflight, notes + report.notes
    return report


def describe(report: DoctorReport, answers_per_stage: int = 3) -> str:
    """The report as text: the load-time checks, then per stage raw answers with finish reason, last
    token and tokens, measured tokens beside the planner's, what the rules made of each region, and the
    problems with what to change."""
    lines = [n if n.startswith(("token budget", "plan")) else f"checkpoint: {n}" for n in report.notes]
    lines += [f"PROBLEM {p}" for p in report.preflight]
    for check in report.stages:
        c = check.counts
        lines.append(f"== {check.stage} (model {check.model}, max_tokens {check.max_tokens}): {c.regions_in} regions, "
                     f"{len(check.exchanges)} answers, {c.done} done ({c.rejected} rejected), {c.failed} failed"
                     + (f" {dict(c.failures_by_kind)}" if c.failures_by_kind else ""))
        for ex in check.exchanges[:answers_per_stage]:
            what = f"error: {ex.error[:200]}" if ex.error else repr(_short(ex.text, 300))
            lines.append(f"  answer {ex.request_id}: finish {ex.finish_reason}, last token {ex.last_token}, tokens "
                         f"{ex.prompt_tokens} prompt + {ex.completion_tokens} completion: {what}")
        measured, assumed = check.measured(), check.assumption
        if measured is not None:
            mean, top, completion = measured
            vs = (f" vs assumed {assumed.prompt:,.0f}"
                  + (f" / {assumed.completion:,.0f}" if assumed.completion is not None else "")
                  + f" ({assumed.source})") if assumed else " (no planner assumption for this stage)"
            lines.append(f"  tokens per request: prompt {mean:,.0f} (max {top:,}) / completion {completion:,.0f}{vs}")
        lines += [f"  region {o}" for o in check.outcomes[:answers_per_stage]]
        lines += [f"  PROBLEM {p}" for p in check.problems]
    lines.append("doctor: all stages answered as they should" if report.ok
                 else f"doctor: {len(report.problems)} problem(s); fix them before a long run")
    return "\n".join(lines)
