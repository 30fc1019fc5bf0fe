"""Where a transformers model's weights go on a replica: the one rule for the `hf` and `llava` engines."""

from __future__ import annotations

from typing import Any


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
