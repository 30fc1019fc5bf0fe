"""A quiet console (annotate/console.py): within `library_logs_to`, whatever writes to the process's
stderr, through Python logging, warnings, a C-level write to fd 2 or a child process, lands in the log
file; our Console reaches the terminal; and stderr is the terminal again afterwards, also after an
exception. Run in a child process, whose stderr this test holds (pytest's own capture is left alone)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent('''
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from annotate.console import library_logs_to

    logging.basicConfig(level=logging.INFO)  # a library's handler, made before the block: bound to sys.stderr
    log = Path(sys.argv[1])
    with library_logs_to(log) as console:
        console.print("OUR PROGRESS")
        logging.getLogger("ray.serve").info("DEPLOYMENT OPTIONS DUMP")
        warnings.warn("A LIBRARY WARNING")
        os.write(2, b"C++ CORE WORKER LINE\\n")
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('CHILD PROCESS LINE\\\\n')"], check=True)
        late = logging.getLogger("vllm"); late.addHandler(logging.StreamHandler()); late.warning("LATE HANDLER")
    print("AFTER", file=sys.stderr, flush=True)
    try:
        with library_logs_to(log):
            raise RuntimeError("BOOM")
    except RuntimeError:
        print("STILL THE TERMINAL", file=sys.stderr, flush=True)
''')


def test_library_output_goes_to_the_log_and_ours_to_the_terminal(tmp_path):
    log = tmp_path / "logs" / "run.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    terminal, logged = done.stdout + done.stderr, log.read_text()
    assert "OUR PROGRESS" in terminal and "AFTER" in terminal and "STILL THE TERMINAL" in terminal
    for line in ("DEPLOYMENT OPTIONS DUMP", "A LIBRARY WARNING", "C++ CORE WORKER LINE", "CHILD PROCESS LINE",
                 "LATE HANDLER"):
        assert line in logged and line not in terminal, (line, terminal, logged)
    assert "OUR PROGRESS" not in logged


def test_verbose_redirects_nothing(capfd):
    from annotate.console import library_logs_to

    with library_logs_to(None) as console:
        console.print("SHOWN")
        print("LIBRARY LINE", file=sys.stderr)
    err = capfd.readouterr().err
    assert "SHOWN" in err and "LIBRARY LINE" in err
