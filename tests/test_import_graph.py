"""The import graph matches what the code says of it: no circles between modules or between the
top-level packages (lazy imports inside functions included), and the torch-free entry points
stay torch-free (checked in fresh interpreters, where nothing is imported yet)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "service", "training", "evaluation", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["s3diff_serve", *parts])


def import_edges() -> list[tuple[str, str, bool]]:
    """(importer, imported, at module level) for every s3diff_serve import in the source tree."""
    edges = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            module = _module_name(path)
            base = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
            tree = ast.parse(path.read_text())
            top_level = {id(node) for node in tree.body}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    parts = base.split(".")
                    stem = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
                    target = ".".join(part for part in (stem, node.module or "") if part)
                    names = [target]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                for name in names:
                    if name.startswith("s3diff_serve."):
                        edges.append((module, name, id(node) in top_level))
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph`, as the list of its nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_circle_between_modules_at_import_time():
    graph: dict[str, set[str]] = {}
    for importer, imported, top_level in import_edges():
        if top_level and importer != imported and not importer.startswith(imported + "."):
            graph.setdefault(importer, set()).add(imported)
    assert find_cycle(graph) is None


def test_no_circle_between_packages_lazy_imports_included():
    graph: dict[str, set[str]] = {}
    for importer, imported, _ in import_edges():
        source, target = importer.split(".")[1], imported.split(".")[1]
        if source != target:
            graph.setdefault(source, set()).add(target)
    assert find_cycle(graph) is None


@pytest.mark.parametrize("code", [
    "import s3diff_serve.model.options",
    "from s3diff_serve.model import UpscaleOptions, InvalidInputError",
    "from s3diff_serve.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "from s3diff_serve.cli.main import main\ntry:\n    main(['upscale', '--help'])\nexcept SystemExit:\n    pass",
])
def test_torch_free_entry_points_do_not_import_torch(code):
    check = f"{code}\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\nprint('torch-free')"
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("torch-free"), run.stderr[-2000:]
