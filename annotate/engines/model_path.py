"""Where a model's weights are: `tiny:` names and `~` paths resolved to a directory.

Its own module so that the engines (which load weights) and the factory (which builds engines)
both import it, and imports between them run one way: factory -> engines -> model_path.
"""

from __future__ import annotations

from pathlib import Path

TINY_PREFIX = "tiny:"


def resolve_model_path(path: str) -> str:
    """``tiny:KIND`` -> the cached tiny model's directory (built on first use, under
    $LONGGRIT_CACHE_DIR, default ~/.cache/longgrit), ``tiny:KIND/sub`` -> a folder inside it (e.g. the
    Griffon-style model's ``code``); a local path with ``~`` is expanded; anything else (a hub name,
    an absolute path) is returned as it is."""
    if path.startswith(TINY_PREFIX):
        from annotate.models.registry import KINDS, tiny_path

        kind, _, inside = path[len(TINY_PREFIX):].partition("/")
        if kind not in KINDS:
            raise ValueError(f"unknown tiny model {path!r}; known: {', '.join(TINY_PREFIX + k for k in KINDS)}")
        base = tiny_path(kind)
        return str(base / inside) if inside else str(base)
    if path.startswith("~"):
        return str(Path(path).expanduser())
    return path
