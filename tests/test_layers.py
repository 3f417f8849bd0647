"""The package's shape: stages that depend one way, no import cycle at any depth,
and nothing happening at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import wenet_hooks

PACKAGE = Path(wenet_hooks.__file__).resolve().parent

# Which top-level parts each part may import (besides itself).
ALLOWED = {
    "errors": set(),
    "dtypes": set(),
    "compat": set(),
    "dist": {"errors"},
    "file": {"errors", "dtypes", "compat"},
    "gather": {"errors", "dtypes", "dist", "file"},
    "background": {"dist", "errors"},
    "plan": {"dist", "dtypes", "file", "gather"},
    "save": {"background", "dist", "errors", "file", "gather", "plan"},
    "resume": {"compat", "dist", "errors", "file", "gather"},
    "readers": {"errors", "compat", "file"},
    "convert": {"errors", "dtypes", "compat", "file", "readers", "wenet"},
    "wenet": {"background", "compat", "dist", "dtypes", "errors", "file", "gather", "plan", "resume", "save"},
    "train": {"wenet"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every wenet_hooks module -> the wenet_hooks modules it imports, anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("wenet_hooks")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wenet_hooks"):
                found.add(node.module)
        graph[module_name(path)] = found
    return graph


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_no_import_cycle_at_any_depth():
    graph = imports()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = [m for m in graph if m in reachable(m)]
    assert cycles == []


def test_each_stage_imports_only_the_stages_below_it():
    wrong = sorted(f"{m} imports {i}" for m, found in imports().items() for i in found
                   if part(m) and part(i) != part(m) and part(i) not in ALLOWED[part(m)])
    assert wrong == []


def test_importing_any_module_has_no_side_effect(tmp_path):
    """No atexit handler, no file, no config lookup: only definitions."""
    code = (
        "import atexit, importlib, pkgutil, wenet_hooks\n"
        "registered = []\n"
        "atexit.register = lambda f, *a, **k: registered.append(getattr(f, '__module__', None) or '')\n"
        "for m in pkgutil.walk_packages(wenet_hooks.__path__, 'wenet_hooks.'):\n"
        "    if m.name != 'wenet_hooks.wenet.autoload':  # the start-up finder: installing it is its job\n"
        "        importlib.import_module(m.name)\n"
        "print([m for m in registered if m.startswith('wenet_hooks')])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"WENET_HOOKS_DISABLE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []


def test_public_api_is_exactly_all():
    missing = [name for name in wenet_hooks.__all__ if getattr(wenet_hooks, name, None) is None]
    assert missing == []
    assert {"consolidate", "write_state_dict", "verify", "Manifest", "save_consolidated", "SaveOptions",
            "SaveError", "VerificationError", "CheckpointWriteError"} <= set(wenet_hooks.__all__)
    assert "TMP_SUFFIX" not in wenet_hooks.__all__ and "resolve_dtype" not in wenet_hooks.__all__
