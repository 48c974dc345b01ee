"""Small shared helpers: hashing, JSON files, console output."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

from rich.console import Console

from components.environment import TOKENIZERS_PARALLELISM

console = Console(stderr=False, highlight=False)


def quiet_libraries() -> None:
    """bitsandbytes and transformers warn about optional GPU kernels on every CPU load."""
    for name in ("bitsandbytes", "transformers.modeling_utils", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    # peft still calls the deprecated gradient_checkpointing_enable name inside transformers 5.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*checkpointing.*deprecated.*")
    os.environ.setdefault(TOKENIZERS_PARALLELISM, "false")


def heading(stage: str) -> None:
    console.rule(f"[bold cyan]llmops · {stage}")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(root: Path, suffix: str = "") -> str:
    """Hash of relative paths and contents of every file under root (optionally only one suffix)."""
    digest = hashlib.sha256()
    root = Path(root)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(suffix)):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_json(path: Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
