"""Where a model's weights are: `tiny:` and `packaged:` names and `~` paths resolved to a directory.

Its own module so that the engines (which load weights) and the factory (which builds engines)
both import it, and imports between them run one way: factory -> engines -> model_path.
"""

from __future__ import annotations

from pathlib import Path

TINY_PREFIX = "tiny:"
PACKAGED_PREFIX = "packaged:"


def resolve_model_path(path: str) -> str:
    """``tiny:KIND`` -> the cached tiny model's directory (built on first use, under
    $LONGGRIT_CACHE_DIR, default ~/.cache/longgrit), ``tiny:KIND/sub`` -> a path inside it (e.g.
    ``tiny:vlm/config.json``); ``packaged:KIND`` -> the folder of a real model converted from a
    package of the index (`annotate.models.packaged`, built on first use in the same cache); a local
    path with ``~`` is expanded; anything else (a hub name, an absolute path) is returned as it is."""
    if path.startswith(TINY_PREFIX):
        from annotate.models.registry import KINDS, tiny_path

        kind, _, inside = path[len(TINY_PREFIX):].partition("/")
        if kind not in KINDS:
            raise ValueError(f"unknown tiny model {path!r}; known: {', '.join(TINY_PREFIX + k for k in KINDS)}")
        base = tiny_path(kind)
        return str(base / inside) if inside else str(base)
    if path.startswith(PACKAGED_PREFIX):
        from annotate.models.packaged import KINDS as PACKAGED_KINDS, packaged_path

        kind = path[len(PACKAGED_PREFIX):]
        if kind not in PACKAGED_KINDS:
            known = ", ".join(PACKAGED_PREFIX + k for k in PACKAGED_KINDS)
            raise ValueError(f"unknown packaged model {path!r}; known: {known}")
        return str(packaged_path(kind))
    if path.startswith("~"):
        return str(Path(path).expanduser())
    return path
