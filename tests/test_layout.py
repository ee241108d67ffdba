"""The layout tells the pipeline's story: no import cycles, a docstring per module, modules of a readable size,
and only ``pancreas_gvae`` installed at the top level (``transforms/`` and ``pipelines/`` live inside it)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Installed name -> source folder, as pyproject maps them.
ROOTS = {"pancreas_gvae": REPO / "pancreas_gvae", "pancreas_gvae.transforms": REPO / "transforms",
         "pancreas_gvae.pipelines": REPO / "pipelines"}
MAX_LINES = 400
# Modules allowed over MAX_LINES: one idea each that reads better whole (their docstring says so).
LONG_MODULES: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    """Every project module under its installed name (the three source folders are disjoint)."""
    modules = {}
    for package, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an imported dotted name refers to (the longest known prefix), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    """Project modules ``module`` imports anywhere in its file (top level, functions, TYPE_CHECKING blocks)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target)
            if resolved and resolved != module:
                found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in MODULES.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_graph_sees_the_project():
    graph = import_graph()
    assert "pancreas_gvae.transforms.ct" in graph and "pancreas_gvae.pipelines.train_ct" in graph
    assert "pancreas_gvae.training.trainer" in graph["pancreas_gvae.training.run"]
    assert "pancreas_gvae.data.ct.config" in graph["pancreas_gvae.transforms.ct"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_every_module_says_what_it_is_for():
    missing = [name for name, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, f"modules without an opening docstring: {missing}"


def test_modules_fit_in_a_head():
    too_long = {name: n for name, path in MODULES.items()
                if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LONG_MODULES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by idea, or allow-list with a reason): {too_long}"
    for name, reason in LONG_MODULES.items():
        assert name in MODULES and reason.strip(), f"allow-list entry {name}: unknown module or no reason"


def test_only_the_project_namespace_is_installed():
    setuptools = PYPROJECT["tool"]["setuptools"]
    packages = setuptools["packages"]
    assert {p.split(".")[0] for p in packages} == {"pancreas_gvae"}
    package_dir = setuptools.get("package-dir", {})
    assert package_dir == {"pancreas_gvae.transforms": "transforms", "pancreas_gvae.pipelines": "pipelines"}
    # Every package folder is listed, so the wheel holds all of them.
    listed = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert listed == set(packages), f"pyproject packages differ from the package folders: {listed ^ set(packages)}"


def test_every_pipeline_has_a_console_script():
    scripts = PYPROJECT["project"]["scripts"]
    for name, path in MODULES.items():
        if name.startswith("pancreas_gvae.pipelines.") and not path.name.startswith("_"):
            stem = name.rpartition(".")[2]
            assert scripts.get(f"pgvae-{stem.replace('_', '-')}") == f"{name}:main", f"no console script for {name}"
            assert "def main(" in path.read_text(), f"{path} has no main()"
