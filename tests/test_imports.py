"""kvtrap's own import graph: no cycles, and the record and report sides never reach capture or torch.

Read from the source (every ``import`` statement, also those inside functions, except under
``if TYPE_CHECKING:``), so a lazy import that closes a cycle is caught as well; then checked in a fresh
interpreter, where importing every record/report module must leave torch, triton and SGLang unloaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "kvtrap"
#: kvtrap's packages whose modules may not import capture-side code, torch, triton or SGLang
READ_SIDE = ("kvtrap.record", "kvtrap.report")
HEAVY = ("torch", "triton", "sglang", "kvtrap.capture")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # the bodies of `if TYPE_CHECKING:` blocks are never executed
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
            out.update(subs)
            # `from pkg import module` needs pkg's __init__ too; an edge to it only when a name is not a module
            if not all((PKG.parent / Path(*m.split("."))).with_suffix(".py").exists()
                       or (PKG.parent / Path(*m.split("."))).is_dir() for m in subs):
                out.add(base)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # a module's own parent packages are being imported already when it runs: not an edge
        ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name and m not in ancestors}
    return graph


def _external(name: str) -> set[str]:
    path = PKG.joinpath(*name.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return _imports(path, name)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_record_and_report_never_import_capture_torch_or_sglang():
    graph = _graph()
    for name in sorted(graph):
        if not name.startswith(READ_SIDE):
            continue
        seen, todo = set(), [name]
        while todo:  # everything kvtrap-internal this module can reach
            cur = todo.pop()
            if cur in seen:
                continue
            seen.add(cur)
            todo.extend(graph[cur])
        for mod in seen:
            bad = [m for m in _external(mod) if m.split(".")[0] in ("torch", "triton", "sglang") or m.startswith("kvtrap.capture")]
            assert not bad, f"{name} reaches {mod}, which imports {', '.join(sorted(bad))}"


def test_read_side_imports_without_torch_in_a_fresh_interpreter():
    mods = sorted(n for n in _graph() if n.startswith(READ_SIDE)) + ["kvtrap.cli.dump_cmd"]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in mods)
        + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'sglang') or m.startswith('kvtrap.capture')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
