"""The intended dependency directions (pyproject.toml [tool.importlinter]) hold: layers, no Ray or
vLLM below the programs, the trainer apart from the executor, and no import cycle at any depth.
import-linter (grimp) counts imports inside functions, so a cycle cannot hide in a function body."""

from __future__ import annotations

from pathlib import Path

import grimp
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, out
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
