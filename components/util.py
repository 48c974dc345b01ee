"""Small shared helpers: hashing, JSON files, console output."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import sys
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


def peak_rss_bytes() -> int:
    """The most resident memory this process, or the largest process it waited for (torchrun's workers),
    held at any point: the kernel's high-water mark, so a peak between two samples is not missed. The process's own
    is its memory map's (VmHWM): getrusage's ru_maxrss keeps a parent's high-water mark across fork and exec, so a
    process started by a large one would read that process's peak as its own."""
    status = Path("/proc/self/status")
    if status.exists():  # Linux: "VmHWM:   123456 kB"
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        own = int(line.split()[1]) * 1024
    else:  # macOS: no /proc
        own = _rusage_bytes(resource.RUSAGE_SELF)
    return max(own, _rusage_bytes(resource.RUSAGE_CHILDREN))  # a child's inherited part is at most this one's peak


def _rusage_bytes(who: int) -> int:
    return resource.getrusage(who).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux counts kilobytes
