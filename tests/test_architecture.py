"""The intended dependency directions (pyproject.toml [tool.importlinter]) hold: layers, no Ray or
vLLM below the programs, the trainer apart from the executor, and no import cycle at any depth.
import-linter (grimp) counts imports inside functions, so a cycle cannot hide in a function body."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """Run as `make lint` runs it, in its own process: import-linter's CLI configures logging with
    dictConfig, which disables every logger already created in the process it runs in (and so silenced
    the warnings later tests look for)."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint_imports), "--no-cache", "--no-logo"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "BROKEN" not in out and "5 kept, 0 broken" in out, out


def test_no_module_imports_itself_back():
    """The same question asked of the whole graph at once, module by module (acyclic_siblings above
    reasons per package): no module reaches back to one that imports it."""
    graph = grimp.build_graph("annotate", cache_dir=None)
    cycles = sorted((importer, imported) for importer in graph.modules
                    for imported in graph.find_modules_directly_imported_by(importer)
                    if graph.chain_exists(importer=imported, imported=importer))
    assert cycles == []


def test_the_trainer_never_reaches_the_executor():
    graph = grimp.build_graph("annotate", cache_dir=None)
    assert not graph.chain_exists(importer="annotate.train", imported="annotate.executor", as_packages=True)
    assert "annotate.executor.runner" in graph.modules  # a folder without __init__.py would be invisible here
