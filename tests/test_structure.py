"""House rules, checked on the source: no import loop (lazy imports included), no file over 600 lines in the
package, no private name imported across modules, ruff clean."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lit_amdet"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(tree: ast.AST, here: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(module, names) of every import anywhere in the file (function-level ones too), relative ones resolved."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                parts = parts if is_package else parts[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for target, names in imported(tree, name, path.name == "__init__.py"):
            if target not in modules:
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for dep in subs or [target]:
                if dep != name:
                    graph[name].add(dep)
            if subs and len(subs) < len(names):  # names that are attributes of the package itself
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_lazy_loop():
    """The checker itself: a loop through a function-level import is found, a one-way import is not."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    tree = ast.parse("def f():\n    from lit_amdet.cli import main\n")
    assert imported(tree, "lit_amdet.zoo", False) == [("lit_amdet.cli", ["main"])]
    assert imported(ast.parse("from . import base"), "lit_amdet.encoders", True) == [("lit_amdet.encoders",
                                                                                       ["base"])]


def test_no_import_loop():
    assert cycles(import_graph()) == []


def test_no_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def private_uses(path: Path, modules: dict[str, Path]) -> list[str]:
    """``from lit_amdet.x import _y`` and ``x._y`` (x an imported lit_amdet module) outside x itself."""
    here = module_name(path) if path.is_relative_to(PACKAGE) else None
    tree = ast.parse(path.read_text())
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lit_amdet"):
            for a in node.names:
                if f"{node.module}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                elif a.name.startswith("_") and node.module != here:
                    found.append(f"{path.name}:{node.lineno} from {node.module} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lit_amdet") and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and aliases[node.value.id] != here):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_modules():
    modules = package_modules()
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    assert [u for p in files for u in private_uses(p, modules)] == []


def test_private_use_checker_finds_both_forms(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from lit_amdet.callbacks.landscape import _publish\nfrom lit_amdet import io\nio._x\n")
    assert len(private_uses(probe, package_modules())) == 2


@pytest.mark.skipif(shutil.which("ruff", path=str(Path(sys.executable).parent)) is None
                    and shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    res = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:]
