"""The `hf` engine's transformers helpers (also read by the load-time checkpoint check): where a
model's weights go on a replica, which tokens end a generation, `generate`'s arguments, and reading
its output."""

from __future__ import annotations

from typing import Any

from annotate.config import SamplingConfig
from annotate.engines.base import stop_token_ids


def load_placement(device: str) -> tuple[dict[str, Any], str]:
    """`from_pretrained` keyword arguments for `device`, and the device the inputs go to.

    ``auto`` on a replica with GPUs spreads the layers over every GPU it sees (``device_map="auto"``,
    accelerate's balanced split): a model declared with 2 GPUs (`resources.num_gpus`) gets both, since
    Ray sets CUDA_VISIBLE_DEVICES to the replica's GPUs. Inputs go to the first GPU, where accelerate
    puts the embeddings. Without a GPU the model stays whole on the CPU.
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return {"device_map": "auto"}, "cuda:0"
        return {}, "cpu"
    return ({"device_map": {"": device}}, device) if device != "cpu" else ({}, "cpu")


def torch_dtype(name: str):
    """A config's dtype name as `from_pretrained` takes it."""
    import torch

    if name == "auto":
        return "auto"
    aliases = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return getattr(torch, aliases.get(name, name))


# --------------------------------------------------------------------------------- generation
def token_id(tokenizer, token: str) -> int | None:
    """A token string's id in `tokenizer`, or None when it is not one of its tokens."""
    return tokenizer.get_vocab().get(token)  # added tokens included; also a `tokenizers.Tokenizer`'s


def end_ids(model, tokenizer, sampling: SamplingConfig) -> list[int]:
    """Token ids that end a generation: the model's EOS (generation_config, else the tokenizer's) and
    the stage's stop tokens (ids, or strings looked up in the tokenizer)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = [int(i) for i in ([ids] if isinstance(ids, int) else list(ids or []))]
    return ids + [i for i in stop_token_ids(sampling.stop_token_ids, lambda t: token_id(tokenizer, t)) if i not in ids]


def generate_kwargs(sampling: SamplingConfig, ends: list[int], tokenizer) -> dict[str, Any]:
    """transformers `generate` arguments for `sampling` (and the seed set, as vLLM's per-request seed)."""
    import torch

    kwargs: dict[str, Any] = dict(
        max_new_tokens=sampling.max_tokens,
        min_new_tokens=sampling.max_tokens if sampling.ignore_eos else min(sampling.min_tokens, sampling.max_tokens),
        do_sample=sampling.temperature > 0, pad_token_id=tokenizer.pad_token_id, eos_token_id=ends or None)
    if sampling.temperature > 0:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(sampling.top_k, 0) or None)
    # Always explicit: transformers would otherwise take them from the checkpoint's generation_config.
    kwargs["repetition_penalty"] = sampling.repetition_penalty
    if sampling.stop:
        kwargs.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    return kwargs


def read_generated(new_tokens: list[int], ends: list[int], tokenizer, sampling: SamplingConfig) -> tuple[str, str, int]:
    """One row of generated ids -> (text, finish_reason, completion tokens), as vLLM reports them: the
    output stops at the first end token; a stop string and what follows are dropped; `length` when
    the budget ran out before an end token or stop string."""
    n = next((pos + 1 for pos, tok in enumerate(new_tokens) if tok in ends), len(new_tokens))
    tokens = new_tokens[:n]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    ended = bool(tokens) and tokens[-1] in ends
    stopped = any(s in text for s in sampling.stop)
    for s in sampling.stop:
        text = text.split(s, 1)[0]
    return text, "length" if not (ended or stopped) and n >= sampling.max_tokens else "stop", n
