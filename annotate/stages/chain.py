"""The chain: the stages in order, the field each writes, what a `--stage` reads and writes, retry
reset and finalising a record. (Being derived from the stage classes.)"""

from __future__ import annotations

from annotate.data.store import FINAL, PREPARE

# Which stored output each `--stage` reads and writes; `all` runs the whole chain.
STAGE_IO: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "all": (PREPARE, FINAL, ("object", "validate", "context", "merge")),
    "object": (PREPARE, "object", ("object",)),
    "validate": ("object", "validate", ("validate",)),
    "context": ("validate", "context", ("context",)),
    "merge": ("context", FINAL, ("merge",)),
}
MODEL_STAGE_PREFIXES = tuple(f"{name}:" for name in ("object", "validate", "context", "merge"))
# Region errors `--retry-failed` redoes: a model stage's, and `pipeline:` (no stage completed the region).
RETRYABLE_PREFIXES = (*MODEL_STAGE_PREFIXES, "pipeline:")
