"""The package's shape: every module imports on its own, no module imports the test fakes, no import cycle,
no module over 400 lines. The checks are plain functions of a package folder, and each is also run against a
small bad package written here, so a check that could never fail is caught too."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mtc"
MAX_LINES = 400
TEST_FAKES = "testing"  # mtc.testing: only tests may import it


def modules(package: Path) -> list[str]:
    """The module names of a flat package (`__init__` included)."""
    return sorted(path.stem for path in package.glob("*.py"))


def imported_modules(path: Path, package: str, siblings: set[str]) -> set[str]:
    """The modules of `package` that the file imports: absolute (`import mtc.x`, `from mtc.x import y`,
    `from mtc import x`) and relative (`from .x import y`, `from . import x`) imports, at module level or
    inside functions alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != package:
                    continue
                rest = parts[1:]
            elif node.level == 1:
                rest = node.module.split(".") if node.module else []
            else:
                continue  # above the package
            if rest:
                found.add(rest[0])
            else:  # `from mtc import x` / `from . import x`: x may be a module
                found |= {alias.name for alias in node.names if alias.name in siblings}
    return found & siblings


def import_graph(package: Path) -> dict[str, set[str]]:
    """For each module of `package`, the other modules of it that it imports."""
    names = set(modules(package))
    return {name: imported_modules(package / f"{name}.py", package.name, names) - {name} for name in names}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle of the graph as a path `[a, b, ..., a]`, one per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [cycle_through(graph, group) for group in groups]


def cycle_through(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """One cycle inside a strongly connected `group`, starting and ending at its first module."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first, so the cycle shown is a shortest one
        node = frontier.pop(0)
        for other in sorted(graph[node] & group):
            if other == start:
                return paths[node] + [start]
            if other not in paths:
                paths[other] = paths[node] + [other]
                frontier.append(other)
    raise AssertionError(f"{sorted(group)} is not strongly connected")


def importers_of(graph: dict[str, set[str]], module: str) -> list[str]:
    return sorted(name for name, imports in graph.items() if module in imports and name != module)


def long_modules(package: Path, limit: int = MAX_LINES) -> dict[str, int]:
    lengths = {path.name: len(path.read_text().splitlines()) for path in package.glob("*.py")}
    return {name: n for name, n in sorted(lengths.items()) if n > limit}


def import_alone(module: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`import <module>` in a fresh interpreter, so no earlier import can hide a cycle or a missing name."""
    return subprocess.run([sys.executable, "-c", f"import {module}"], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


# ---------------------------------------------------------------------- the package
@pytest.mark.slow  # a fresh interpreter per module: about 3 s each on two CPU cores
@pytest.mark.parametrize("name", [n for n in modules(PACKAGE) if n != "__main__"])
def test_every_module_imports_on_its_own(name):
    module = "mtc" if name == "__init__" else f"mtc.{name}"
    result = import_alone(module)
    assert result.returncode == 0, f"import {module} fails in a fresh interpreter:\n{result.stderr[-3000:]}"


def test_the_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "mtc", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_no_package_module_imports_the_test_fakes():
    assert importers_of(import_graph(PACKAGE), TEST_FAKES) == [], \
        f"mtc.{TEST_FAKES} is for tests only; move what these modules need into the package"


def test_no_import_cycle():
    cycles = import_cycles(import_graph(PACKAGE))
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_module_is_over_400_lines():
    too_long = long_modules(PACKAGE)
    assert too_long == {}, f"modules over {MAX_LINES} lines (split them by idea): {too_long}"


# ---------------------------------------------------------------------- each check can fail
@pytest.fixture
def bad_package(tmp_path):
    """A package whose modules break every rule: a cycle a -> b -> c -> a through relative, absolute and
    function-local imports, a module importing the test fakes, and a module too long."""
    package = tmp_path / "badpkg"
    package.mkdir()
    files = {
        "__init__.py": "",
        "a.py": "from .b import B\nA = 1\n",
        "b.py": "import badpkg.c\nB = 2\n",
        "c.py": "def f():\n    from badpkg import a\n    return a.A\n",
        "d.py": "from . import testing\n",
        "e.py": "from .testing import FAKE\n",
        "f.py": "from badpkg.c import f\n" + "x = 1\n" * MAX_LINES,
        "testing.py": "from .a import A\nFAKE = A\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    return package


def test_the_import_graph_reads_every_kind_of_import(bad_package):
    graph = import_graph(bad_package)
    assert graph["a"] == {"b"} and graph["b"] == {"c"} and graph["c"] == {"a"}
    assert graph["d"] == {"testing"} and graph["e"] == {"testing"} and graph["f"] == {"c"}


def test_the_checks_find_what_is_wrong(bad_package):
    graph = import_graph(bad_package)
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert importers_of(graph, TEST_FAKES) == ["d", "e"]
    assert long_modules(bad_package) == {"f.py": MAX_LINES + 1}


def test_a_fresh_import_finds_a_cycle_of_names(tmp_path):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import B\nA = 1\n")
    (package / "b.py").write_text("from .a import A\nB = 2\n")
    result = import_alone("cyclic.a", cwd=tmp_path)
    assert result.returncode != 0 and "partially initialized module" in result.stderr
