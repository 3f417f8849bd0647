"""The docs cite tests that exist: every ``tests/<file>.py`` named in README.md, docs/ and bench/README.md
is a file of this repository, and every ``::test_name`` after it (or in the same sentence's list) is a
test function in it."""

from __future__ import annotations

import ast
import re

from conftest import REPO

DOCS = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# `tests/test_x.py::test_a` or `tests/test_x.py` followed (in the same paragraph) by `::test_b`, `test_c`.
CITED_FILE = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`")
CITED_TEST = re.compile(r"`(?:::)?(test_\w+)`")


def _functions(path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def citations() -> list[tuple[str, str, str]]:
    """(doc, cited file, cited test or '') for every citation; a bare test name belongs to the file before it."""
    found = []
    for doc in DOCS:
        for paragraph in re.split(r"\n\s*\n", doc.read_text()):
            current = None
            for match in re.finditer(rf"{CITED_FILE.pattern}|{CITED_TEST.pattern}", paragraph):
                if match.group(1):
                    current = match.group(1)
                    found.append((doc.name, current, match.group(2) or ""))
                elif current is not None:
                    found.append((doc.name, current, match.group(3)))
    return found


def test_every_cited_test_exists():
    cited = citations()
    assert len(cited) > 20  # the docs do cite their tests
    missing = [f"{doc}: {path}" for doc, path, _ in cited if not (REPO / path).is_file()]
    missing += [f"{doc}: {path}::{test}" for doc, path, test in cited
                if test and (REPO / path).is_file() and test not in _functions(REPO / path)]
    assert missing == []
