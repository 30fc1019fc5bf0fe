"""A quiet console: our progress bars, per-stage counts and summary on the terminal; what the libraries
print (Ray's, Serve's and vLLM's loggers, Python warnings, Ray's C++ logs, tqdm bars) in a log file.

Why at the file-descriptor level, not per logger: Ray, Serve, Ray Data and vLLM each install their own
handlers (some as JSON), at import, at `ray.init` or at the first deployment, and Ray's C++ core writes
to fd 2 directly; no logger configuration made once catches them all. So fd 2 is pointed at the log
file for the duration, and our own output goes to a duplicate of the terminal's stderr taken before.
Child processes started meanwhile (Ray's local cluster) inherit the log file as their stderr.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console


@contextmanager
def library_logs_to(path: Path | None) -> Iterator[Console]:
    """Within the block, fd 2 (and so `sys.stderr`) writes to `path` (appended); the Console yielded
    writes to the terminal. `path` None (`--verbose`): nothing is redirected. fd 2 is restored on the
    way out, also when the block raises, so a traceback reaches the terminal."""
    if path is None:
        yield Console(stderr=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    ui = os.fdopen(os.dup(terminal), "w", buffering=1)
    try:
        yield Console(file=ui)
    finally:
        try:
            sys.stderr.flush()
            ui.flush()
        finally:
            os.dup2(terminal, 2)
            os.close(terminal)
            ui.close()


def doctor_log_path() -> Path:
    """Where `annotate doctor` puts the libraries' logs: it has no output folder, so a new file in the
    temp folder, named by time and process like a run's `OUT/logs/` file."""
    return Path(tempfile.gettempdir()) / "longgrit" / f"doctor-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
