"""Per-task code digests: each kfp task's cache key covers the code that task runs, and nothing else.

kfp's cache key holds the component's own source (it is in the container command) but not the modules it
imports, and the image tag (the package version) does not move with every edit. So each task carries the
env var LLMOPS_CODE_DIGEST: a hash of its wrapper's source and of every project module the wrapper reaches
through imports, followed transitively (imports inside functions count: the stages import lazily). A fix to
`components/stages/evaluate.py` then re-runs evaluate and what depends on its outputs, while the cached train stage,
which never imports it, stays valid.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
from pathlib import Path

from components.environment import CODE_DIGEST

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("components", "pipelines", "serving")
ENV = CODE_DIGEST.name


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of a project module (a package's __init__.py for a package), or None if it is not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(source: str) -> set[str]:
    """Project modules named by the import statements anywhere in `source` (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name.split(".")[0] in PACKAGES}


def module_closure(source: str, root: Path = ROOT) -> list[Path]:
    """Every project file that `source` imports, directly or through other project modules, with their packages."""
    seen: dict[str, Path] = {}
    pending = list(imported_modules(source))
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            prefix = ".".join(parts[:depth])
            path = module_file(prefix, root)
            if path is None or prefix in seen:
                continue
            seen[prefix] = path
            pending.extend(imported_modules(path.read_text()))
    return sorted(set(seen.values()))


def source_digest(source: str, root: Path = ROOT) -> str:
    digest = hashlib.sha256(source.encode())
    for path in module_closure(source, root):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def task_digest(component, root: Path = ROOT) -> str:
    """The digest for a kfp Python component: its function's source and its project imports."""
    return source_digest(inspect.getsource(component.python_func), root)
