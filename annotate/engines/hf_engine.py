"""transformers generation, for models vLLM does not serve (remote-code models without a vLLM port).

Requests are grouped by (sampling, has images) and generated in batches of `hf.batch_size` with left
padding. There is no constrained decoding here: with a JSON schema the output is only parsed (and
checked) afterwards. A batch that raises is retried one request at a time, so one bad input fails
alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from annotate.config import ModelConfig, SamplingConfig
from annotate.engines.base import ChatRequest, ChatResult, EngineDeadError
from annotate.engines.messages import InvalidMessageError, to_hf_messages
from annotate.engines.model_path import resolve_model_path
from annotate.engines.transformers_common import (
    end_ids,
    generate_kwargs,
    load_placement,
    read_generated,
    token_id,
    torch_dtype,
)
from annotate.engines.postprocess import error_result, finish

log = logging.getLogger(__name__)

# An error after which the device (and so the engine) serves nothing more: a CUDA error is sticky for
# the process, and an out-of-memory one leaves the allocator in doubt. Matched on the type and message.
DEVICE_ERROR_SIGNS = ("CUDA error", "CUDA out of memory", "out of memory", "OutOfMemoryError", "CUBLAS_STATUS",
                      "CUDNN_STATUS", "cuDNN error", "NCCL error", "device-side assert", "illegal memory access",
                      "AcceleratorError", "EngineDeadError")


def is_device_error(error: BaseException | str | None) -> bool:
    """An exception (or a result's error text) that leaves the engine unusable: the replica must go."""
    if error is None:
        return False
    if isinstance(error, EngineDeadError):
        return True
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return any(sign in text for sign in DEVICE_ERROR_SIGNS)


def raise_if_device_error(model_id: str, exc: BaseException) -> None:
    """Let a device error through as EngineDeadError (never swallowed into one request's result)."""
    if is_device_error(exc):
        raise EngineDeadError(f"{model_id}: device error: {type(exc).__name__}: {str(exc)[:400]}") from exc


def _as_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Processors' chat templates expect list content; wrap plain strings as one text part."""
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
        for m in messages
    ]


class HfEngine:
    def __init__(self, model: ModelConfig, model_path: str | None = None):
        from transformers import AutoConfig

        self.config = model
        self.args = model.hf
        self.model_id = model.path
        self.model_path = model_path or resolve_model_path(model.path)
        trust = self.args.trust_remote_code
        started = time.perf_counter()
        self.placement, self.device = load_placement(self.args.device)
        hf_config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=trust)
        self.processor, self.tokenizer = self._load_processor(trust)
        self.model = self._load_model(hf_config, trust).eval()
        if not self.placement:
            self.model.to(self.device)
        self.multimodal = self.processor is not None and hasattr(self.processor, "image_processor")
        self.startup_s = time.perf_counter() - started
        log.info("transformers model %s up in %.1f s on %s", self.model_id, self.startup_s, self.device)

    def _load_processor(self, trust: bool):
        from transformers import AutoProcessor, AutoTokenizer

        processor = None
        try:
            processor = AutoProcessor.from_pretrained(self.model_path, trust_remote_code=trust)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.info("no processor for %s (%s); using the tokenizer alone", self.model_path, exc)
        tokenizer = getattr(processor, "tokenizer", None) or processor
        if tokenizer is None or not hasattr(tokenizer, "pad_token_id"):
            tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust)
            processor = None if processor is tokenizer else processor
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if processor is tokenizer:
            processor = None
        return processor, tokenizer

    def _load_model(self, hf_config, trust: bool):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        auto_map = getattr(hf_config, "auto_map", None) or {}
        vision = hasattr(hf_config, "vision_config") or "AutoModelForImageTextToText" in auto_map
        if "AutoModelForCausalLM" in auto_map and "AutoModelForImageTextToText" not in auto_map:
            vision = False  # remote-code VLMs (LLaVA-style ones) often register as causal LMs only
        order = [AutoModelForImageTextToText, AutoModelForCausalLM] if vision else [AutoModelForCausalLM, AutoModelForImageTextToText]
        kwargs = {"trust_remote_code": trust, "dtype": torch_dtype(self.args.dtype), **self.placement}
        errors = []
        for auto in order:
            try:
                return auto.from_pretrained(self.model_path, **kwargs)
            except (ValueError, KeyError) as exc:
                errors.append(f"{auto.__name__}: {exc}")
        raise ValueError(f"cannot load {self.model_path} with transformers: " + "; ".join(errors))

    # ----------------------------------------------------------------------------------- serving
    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        results: list[ChatResult | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[dict[str, Any]], list]]] = {}
        for i, req in enumerate(requests):
            try:
                messages, images = to_hf_messages(req.messages)
            except InvalidMessageError as exc:
                results[i] = error_result(req.request_id, "invalid_input", f"invalid messages: {exc}")
                continue
            if images and not self.multimodal:
                results[i] = error_result(req.request_id, "invalid_input", f"{self.model_id} takes no images")
                continue
            key = (req.sampling.model_dump_json(), bool(images))
            groups.setdefault(key, []).append((i, messages, images))
        size = self.args.batch_size
        for items in groups.values():
            for start in range(0, len(items), size):
                chunk = items[start:start + size]
                for i, result in self._run(requests, chunk):
                    results[i] = result
        return [r for r in results if r is not None]

    def _run(self, requests, chunk):
        started = time.perf_counter()
        try:
            generated = self._generate(requests[chunk[0][0]].sampling, chunk)
        except Exception as exc:  # noqa: BLE001 - isolate the request that broke the batch
            raise_if_device_error(self.model_id, exc)  # no request of this engine can succeed any more
            if len(chunk) == 1:
                kind = "invalid_input" if isinstance(exc, (ValueError, TypeError, IndexError)) else "internal"
                i = chunk[0][0]
                return [(i, error_result(requests[i].request_id, kind, f"{type(exc).__name__}: {str(exc)[:500]}",
                                         time.perf_counter() - started))]
            out = []
            for item in chunk:
                out.extend(self._run(requests, [item]))
            return out
        latency = time.perf_counter() - started
        out = []
        for (i, _, _), (text, finish_reason, n_prompt, n_completion) in zip(chunk, generated):
            req = requests[i]
            out.append((i, finish(req.request_id, text, finish_reason, json_schema=req.json_schema,
                                  reasoning_model=self.config.reasoning, prompt_tokens=n_prompt,
                                  completion_tokens=n_completion, latency_s=latency)))
        return out

    def _inputs(self, chunk):
        """The chat template and the processor over a chunk of (index, messages, images): model inputs."""
        use_processor = self.processor is not None and getattr(self.processor, "chat_template", None)
        templater = self.processor if use_processor else self.tokenizer
        conversations = [_as_parts(m) if use_processor else m for _, m, _ in chunk]
        prompts = [templater.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
        images = [img for _, _, imgs in chunk for img in imgs]
        if self.processor is not None and images:
            return self.processor(text=prompts, images=images, padding=True, return_tensors="pt")
        return self.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Prompt length as the model sees it (template applied, image tokens expanded by the processor)."""
        converted, images = to_hf_messages(messages)
        return int(self._inputs([(0, converted, images)])["input_ids"].shape[1])

    @property
    def max_model_len(self) -> int | None:
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    def _generate(self, sampling: SamplingConfig, chunk) -> list[tuple[str, str, int, int]]:
        import torch

        inputs = self._inputs(chunk).to(self.device)
        model_dtype = getattr(self.model, "dtype", None)
        if "pixel_values" in inputs and model_dtype is not None and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(model_dtype)
        ends = end_ids(self.model, self.tokenizer, sampling)
        gen_kwargs = generate_kwargs(sampling, ends, self.tokenizer)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **gen_kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        attention = inputs.get("attention_mask")
        results = []
        for row in range(len(chunk)):
            text, finish_reason, n = read_generated(output[row, prompt_len:].tolist(), ends, self.tokenizer, sampling)
            n_prompt = int(attention[row].sum()) if attention is not None else prompt_len
            results.append((text, finish_reason, n_prompt, n))
        return results

    def token_id(self, token: str) -> int | None:
        return token_id(self.tokenizer, token)

    def close(self) -> None:
        self.model = None
        import gc

        gc.collect()

    def __repr__(self) -> str:
        return f"HfEngine(model_id={self.model_id!r}, path={self.model_path!r}, device={getattr(self, 'device', None)!r})"
