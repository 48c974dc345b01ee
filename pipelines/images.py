"""Component images. Their tag follows the package version, so a compiled pipeline names the
exact code it runs; override the registry with LLMOPS_IMAGE_REGISTRY at compile time."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("llmops")
except PackageNotFoundError:  # running from a source tree that was not installed
    VERSION = "0.0.0-dev"

REGISTRY = os.environ.get("LLMOPS_IMAGE_REGISTRY", "ghcr.io/llmops")
CPU_IMAGE = f"{REGISTRY}/llmops-cpu:{VERSION}"
GPU_IMAGE = f"{REGISTRY}/llmops-gpu:{VERSION}"


def code_digest() -> str:
    """Hash of the stage code. Set on every task as an env var, which kfp's cache key includes, so
    an edited stage is re-run even where the image tag (the package version) has not moved."""
    from components.util import tree_sha256

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in ("components", "pipelines"):
        digest.update(tree_sha256(root / package, suffix=".py").encode())
    return digest.hexdigest()[:16]
