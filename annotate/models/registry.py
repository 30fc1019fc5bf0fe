"""The tiny models by name: which builder makes each, where it is cached, when it is rebuilt.

Kinds: ``text`` and ``vlm`` (the CPU pipeline's stand-ins, `tiny.py`), ``sam`` (segment stage),
and tiny replicas of the production architectures of pipelines/longgrit.yaml: ``internvl2``,
``qwen2_instruct``, ``r1_llama`` (`tiny_paper.py`, served by vLLM) and ``griffon_g`` (`tiny_griffon.py`,
Griffon-G's real structure and weight names, served by vLLM through annotate/engines/griffon_vllm.py).

A built model directory holds ``tiny_recipe.json``; a directory whose recipe matches is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Literal

from annotate.models.tiny import SEED

TinyKind = Literal["text", "vlm", "sam", "internvl2", "qwen2_instruct", "r1_llama", "griffon_g"]
KINDS: tuple[TinyKind, ...] = ("text", "vlm", "sam", "internvl2", "qwen2_instruct", "r1_llama", "griffon_g")

# Bump when a builder changes what it writes: cached builds with another version are rebuilt.
RECIPE_VERSION = 7  # 7: InternVL2 replica speaks ChatML (Hermes-2); Griffon's EOS is <eos> alone
RECIPE_FILE = "tiny_recipe.json"


def _builder(kind: str) -> Callable[[Path], None]:
    from annotate.models import tiny, tiny_griffon, tiny_paper

    builders = {**tiny.BUILDERS, **tiny_paper.BUILDERS, "griffon_g": tiny_griffon.build_griffon_g}
    if kind not in KINDS or kind not in builders:
        raise ValueError(f"unknown tiny model {kind!r}; known: {', '.join(KINDS)}")
    return builders[kind]


def _recipe(kind: str) -> dict:
    return {"kind": kind, "version": RECIPE_VERSION, "seed": SEED}


def is_built(path: str | Path, kind: str) -> bool:
    recipe = Path(path) / RECIPE_FILE
    try:
        return json.loads(recipe.read_text()) == _recipe(kind)
    except (OSError, ValueError):
        return False


def build_tiny(kind: str, out_dir: str | Path, force: bool = False) -> Path:
    """Build the tiny model ``kind`` into ``out_dir`` (skipped when already built with this recipe).

    Written to a temporary sibling directory and renamed into place, so a concurrent or interrupted
    build never leaves a half-written model behind a valid recipe file.
    """
    build = _builder(kind)
    out = Path(out_dir).expanduser().resolve()
    if not force and is_built(out, kind):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        (tmp / RECIPE_FILE).write_text(json.dumps(_recipe(kind)))
        if out.exists():
            if not force and is_built(out, kind):  # another process won the race
                return out
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def cache_dir() -> Path:
    """Where tiny models are cached: $LONGGRIT_CACHE_DIR, default ~/.cache/longgrit."""
    return Path(os.environ.get("LONGGRIT_CACHE_DIR") or "~/.cache/longgrit").expanduser()


def tiny_path(kind: str, root: str | Path | None = None) -> Path:
    """Path of the cached tiny model ``kind``, building it on first use."""
    base = Path(root) if root is not None else cache_dir()
    return build_tiny(kind, base / "tiny" / f"{kind}-v{RECIPE_VERSION}")


def build_all(out_dir: str | Path, force: bool = False) -> dict[str, Path]:
    out = Path(out_dir)
    return {kind: build_tiny(kind, out / kind, force=force) for kind in KINDS}
