"""The package's shape: no import cycles, the layers below the runner know nothing of analyses,
small modules, and a command line that imports only Hydra before the task runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "intraneuron"
# Below the seam: these packages must not import analyses, the runner, the registry or the config
# assembly (the analyses build on them, not the other way round).
LOWER = ("models", "corpus", "extraction", "embeddings", "categories", "tracking", "stats", "reports")
UPPER = ("intraneuron.analyses", "intraneuron.runner", "intraneuron.registry", "intraneuron.config",
         "intraneuron.cli")  # fmt: skip
MAX_LINES = 400


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
