"""The one-owner guards' scan (registry tags, environment variables): string constants of the project's modules."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("components", "pipelines", "serving", "llmops")


def sources(owner: Path) -> list[Path]:
    return [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py")) if p != owner]


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants (documentation may name what code must take from the owner)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def literals(path: Path, matches: Callable[[str], bool], root: Path = ROOT, with_docstrings: bool = True) -> list[str]:
    """`file:line: text` of every string constant (f-strings' literal parts too) that `matches`."""
    tree = ast.parse(path.read_text())
    skip = set() if with_docstrings else docstrings(tree)
    found = [
        (node.lineno, f"{path.relative_to(root)}:{node.lineno}: {node.value[:60]!r}")
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
        if matches(node.value)
    ]
    return [hit for _, hit in sorted(found)]
