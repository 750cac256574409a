"""The layout keeps its promises (README, "How the code is laid out"): the import-linter contracts in
pyproject.toml hold, no two modules import each other (in firekit/ and bench/, imports inside
functions included), and no function in firekit/ is longer than 80 lines."""

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80


def test_the_import_contracts_in_pyproject_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """Each import edge a -> b from which an import chain leads back to a, as the chain a -> ... -> a."""
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                found.append((importer, *back))
    return found


def test_no_module_imports_itself_back_in_firekit_or_bench():
    graph = grimp.build_graph("firekit", "bench", cache_dir=None)
    cycles = _cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(chain) for chain in cycles)


def test_the_cycle_finder_finds_a_circle(tmp_path, monkeypatch):
    # The check above can fail: two modules that import each other (one lazily, in a function) are found.
    package = tmp_path / "circlepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from circlepkg import b\n")
    (package / "b.py").write_text("def f():\n    from circlepkg import a\n    return a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cycles = _cycles(grimp.build_graph("circlepkg", cache_dir=None))
    assert ("circlepkg.a", "circlepkg.b", "circlepkg.a") in cycles


def _long_functions(source: str) -> list[tuple[str, int]]:
    tree = ast.parse(source)
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "firekit").rglob("*.py")))
def test_no_function_is_longer_than_80_lines(path):
    long = _long_functions((ROOT / path).read_text())
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines, split them: {long}"


def test_the_length_check_sees_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert _long_functions(f"def long():\n{body}\n") == [("long", MAX_FUNCTION_LINES + 1)]
    assert _long_functions("def short():\n    return 1\n") == []
