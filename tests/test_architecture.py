"""The package's shape: no import cycles, the layers below the runner know nothing of analyses,
small modules, a command line that imports only Hydra before the task runs, and tests that assert
no wall-clock durations (those fail on a busy machine; timings belong to benchmarks/)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "intraneuron"
TESTS = Path(__file__).resolve().parent
# Below the seam: these packages must not import analyses, the runner, the registry or the config
# assembly (the analyses build on them, not the other way round).
LOWER = ("models", "corpus", "extraction", "embeddings", "categories", "tracking", "stats", "reports")
UPPER = ("intraneuron.analyses", "intraneuron.runner", "intraneuron.registry", "intraneuron.config",
         "intraneuron.cli")  # fmt: skip
MAX_LINES = 400
# functions that read a clock: `time.perf_counter()`, `monotonic()` after `from time import ...`
CLOCKS = {"time", "time_ns", "perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "process_time"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """intraneuron modules imported by a file (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("intraneuron"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("intraneuron"))
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_module_level_imports_have_no_cycles():
    graph = {m: {i for i in imports(p, top_level_only=True) if i in MODULES and i != m} for m, p in MODULES.items()}
    # a package's __init__ importing its own submodules is how packages export, not a cycle
    for m in graph:
        graph[m] = {i for i in graph[m] if not (MODULES[m].name == "__init__.py" and i.startswith(m + "."))}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("package", LOWER)
def test_the_layers_below_the_runner_know_nothing_of_analyses(package):
    for path in (PACKAGE / package).rglob("*.py"):
        upward = {i for i in imports(path, top_level_only=False) if i.startswith(UPPER)}
        assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)}"


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_the_command_line_imports_neither_torch_nor_mlflow_before_the_task():
    code = "import sys, intraneuron.cli; print(sorted(m for m in ('torch', 'mlflow', 'sklearn', 'scipy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def _reads_clock(node: ast.AST, timed: set[str]) -> bool:
    """Whether an expression reads a clock, directly or through a name assigned from one."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            func = sub.func
            if isinstance(func, ast.Attribute) and func.attr in CLOCKS and ast.unparse(func.value) in ("time", "_time"):
                return True
            if isinstance(func, ast.Name) and func.id in CLOCKS:
                return True
        if isinstance(sub, ast.Name) and sub.id in timed:
            return True
    return False


def clock_asserts(source: str) -> list[tuple[int, str]]:
    """(line, text) of each `assert` that compares a clock reading or a duration measured from one."""
    tree = ast.parse(source)
    timed: set[str] = set()  # names assigned from a clock, then from those (started, elapsed, deadline)
    while True:
        grown = set(timed)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and node.value is not None:
                if _reads_clock(node.value, timed):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    grown.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        if grown == timed:
            break
        timed = grown
    return [
        (node.lineno, ast.unparse(node.test))
        for node in ast.walk(tree)
        if isinstance(node, ast.Assert)
        and any(
            isinstance(compare, ast.Compare) and _reads_clock(compare, timed) for compare in ast.walk(node.test)
        )
    ]


def test_clock_asserts_are_found():
    found = clock_asserts(
        "import time\nfrom time import monotonic\n"
        "def f():\n"
        "    started = time.perf_counter()\n"
        "    elapsed = time.perf_counter() - started\n"
        "    deadline = monotonic() + 10\n"
        "    assert elapsed < 5.0\n"
        "    assert time.monotonic() - started < 60\n"
        "    assert monotonic() < deadline\n"
        "    assert 1 <= elapsed\n"
        "    assert count < 5 and elapsed < 5\n"
        "    assert count < 5\n"
        "    assert started\n"
        "    time.sleep(0.1)\n"
    )
    assert [line for line, _ in found] == [7, 8, 9, 10, 11]


def test_no_test_asserts_a_wall_clock_duration():
    found = [
        f"{path.relative_to(TESTS)}:{line}: assert {text}"
        for path in sorted(TESTS.rglob("*.py"))
        for line, text in clock_asserts(path.read_text())
    ]
    assert not found, "timings belong to benchmarks/, not tests:\n" + "\n".join(found)
