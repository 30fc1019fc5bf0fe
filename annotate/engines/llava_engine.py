"""Models published in the LLaVA code base (Griffon-G, LLaVA-1.5...), which neither vLLM nor
transformers' Auto classes can load: the model's own package builds the prompt and the model.

What it does, in the order the published inference scripts do it (Griffon's `run_griffon.py`):
import the package (it registers its config and model classes), load the causal LM and its separate
CLIP vision tower, write the prompt with the package's conversation template (`<image>` markers
before the text, one per image), turn it into ids with `tokenizer_image_token` (each marker becomes
IMAGE_TOKEN_INDEX), preprocess the images with the tower's processor, and call
`model.generate(input_ids, images=...)`. When the package's pins conflict with ours, the model's
replicas run in a prebuilt environment of their own (`models.*.runtime_env`).

Prompts go one at a time: the LLaVA code base's multimodal `generate` is written for one prompt
(Griffon's scripts never batch), so a replica's throughput comes from its replicas, not batching.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from annotate.config import ModelConfig, SamplingConfig
from annotate.engines.base import ChatRequest, ChatResult
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
from annotate.engines.hf_engine import raise_if_device_error
from annotate.engines.postprocess import error_result, finish

log = logging.getLogger(__name__)


def _import_class(spec: str):
    """`module:Class` (or `module.Class`) -> the class."""
    module, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    return getattr(importlib.import_module(module), name)


class LlavaEngine:
    def __init__(self, model: ModelConfig, model_path: str | None = None):
        from transformers import AutoConfig, AutoTokenizer

        assert model.llava is not None
        self.config, self.args = model, model.llava
        self.model_id = model.path
        self.model_path = model_path or resolve_model_path(model.path)
        started = time.perf_counter()
        code = self.args.code_path
        if code is not None:
            code = str(Path(resolve_model_path(code)).resolve())
            if code not in sys.path:
                sys.path.insert(0, code)
        importlib.import_module(self.args.package)  # registers the config (model_type) and model classes
        self.conversations = importlib.import_module(f"{self.args.package}.conversation").conv_templates
        if self.args.conversation not in self.conversations:
            raise ValueError(f"{self.args.package}.conversation has no template {self.args.conversation!r}; "
                             f"it has {', '.join(sorted(self.conversations))}")
        self.tokenizer_image_token = importlib.import_module(f"{self.args.package}.mm_utils").tokenizer_image_token
        self.image_token_index = importlib.import_module(f"{self.args.package}.constants").IMAGE_TOKEN_INDEX

        hf_config = AutoConfig.from_pretrained(self.model_path)
        tower = self.args.vision_tower or getattr(hf_config, "mm_vision_tower", None)
        if tower and not self.args.vision_tower and not Path(tower).is_absolute() and (Path(self.model_path) / tower).is_dir():
            tower = str(Path(self.model_path) / tower)
        hf_config.mm_vision_tower = tower and resolve_model_path(tower)
        self.placement, self.device = load_placement(self.args.device)
        dtype = torch_dtype(self.args.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        # torch_dtype, not dtype: these packages pin transformers 4.x, which knows only the old name
        # (transformers 5 still takes it, with a deprecation warning).
        self.model = _import_class(self.args.model_class).from_pretrained(
            self.model_path, config=hf_config, torch_dtype=dtype, low_cpu_mem_usage=True, **self.placement).eval()
        if not self.placement:
            self.model.to(self.device)
        vision = self.model.get_vision_tower()
        if not vision.is_loaded:
            vision.load_model()
        vision.to(device=self.device, dtype=self.model.dtype)
        self.vision = vision
        self.image_processor = vision.image_processor
        self.startup_s = time.perf_counter() - started
        log.info("LLaVA-code-base model %s up in %.1f s on %s", self.model_id, self.startup_s, self.device)

    # ----------------------------------------------------------------------------------- prompts
    def prompt(self, messages: list[dict[str, Any]]) -> tuple[str, list]:
        """The conversation template's prompt and the images, from neutral messages. System text goes
        before the user's (LLaVA templates' system slot holds their own fixed text)."""
        converted, images = to_hf_messages(messages)
        system = [_text(m) for m in converted if m["role"] == "system"]
        users = [m for m in converted if m["role"] == "user"]
        if len(users) != 1 or len(users) + len(system) != len(converted):
            raise InvalidMessageError("the llava engine takes one user message (and an optional system one)")
        text = "\n\n".join(system + [_text(users[0])])
        conv = self.conversations[self.args.conversation].copy()
        conv.append_message(conv.roles[0], "<image>\n" * len(images) + text)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt(), images

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Prompt length as the model sees it: text ids plus each image's patch features."""
        prompt, images = self.prompt(messages)
        ids = self.tokenizer_image_token(prompt, self.tokenizer, self.image_token_index)
        return len(ids) - len(images) + len(images) * self.vision.num_patches

    @property
    def max_model_len(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def _pixels(self, images):
        size = self.image_processor.size.get("shortest_edge") or self.image_processor.size.get("height")
        if self.args.square_images and size:
            images = [img.resize((size, size)) for img in images]
        return self.image_processor.preprocess(images, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)

    # ----------------------------------------------------------------------------------- serving
    def chat(self, requests: list[ChatRequest]) -> list[ChatResult]:
        return [self._one(req) for req in requests]

    def _one(self, req: ChatRequest) -> ChatResult:
        started = time.perf_counter()
        try:
            prompt, images = self.prompt(req.messages)
        except InvalidMessageError as exc:
            return error_result(req.request_id, "invalid_input", f"invalid messages: {exc}")
        try:
            text, finish_reason, n_prompt, n_completion = self._generate(req.sampling, prompt, images)
        except Exception as exc:  # noqa: BLE001 - one request's failure is its own result
            raise_if_device_error(self.model_id, exc)  # a device error ends the engine, not one request
            kind = "invalid_input" if isinstance(exc, (ValueError, TypeError, IndexError)) else "internal"
            return error_result(req.request_id, kind, f"{type(exc).__name__}: {str(exc)[:500]}", time.perf_counter() - started)
        return finish(req.request_id, text, finish_reason, json_schema=req.json_schema,
                      reasoning_model=self.config.reasoning, prompt_tokens=n_prompt, completion_tokens=n_completion,
                      latency_s=time.perf_counter() - started)

    def _generate(self, sampling: SamplingConfig, prompt: str, images: list) -> tuple[str, str, int, int]:
        import torch

        ids = self.tokenizer_image_token(prompt, self.tokenizer, self.image_token_index, return_tensors="pt")
        ids = ids.unsqueeze(0).to(self.device)
        ends = end_ids(self.model, self.tokenizer, sampling)
        kwargs = {**generate_kwargs(sampling, ends, self.tokenizer), "use_cache": True}
        with torch.inference_mode():
            out = self.model.generate(ids, images=self._pixels(images) if images else None, **kwargs)
        new = out[0].tolist()
        if len(new) > ids.shape[1] and new[: ids.shape[1]] == ids[0].tolist():
            new = new[ids.shape[1]:]  # older LLaVA code returns the prompt too
        text, finish_reason, n = read_generated(new, ends, self.tokenizer, sampling)
        n_prompt = ids.shape[1] - len(images) + len(images) * self.vision.num_patches
        return text, finish_reason, n_prompt, n

    def token_id(self, token: str) -> int | None:
        return token_id(self.tokenizer, token)

    def close(self) -> None:
        self.model = None

    def __repr__(self) -> str:
        return f"LlavaEngine(model_id={self.model_id!r}, path={self.model_path!r}, device={self.device!r})"


def _text(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p.get("type") == "text")
