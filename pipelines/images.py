"""Component images. Their tag follows the package version, so a compiled pipeline names the
exact code it runs; override the registry with LLMOPS_IMAGE_REGISTRY at compile time."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from components.environment import IMAGE_REGISTRY

try:
    VERSION = version("llmops")
except PackageNotFoundError:  # running from a source tree that was not installed
    VERSION = "0.0.0-dev"

REGISTRY = IMAGE_REGISTRY.get()
CPU_IMAGE = f"{REGISTRY}/llmops-cpu:{VERSION}"
GPU_IMAGE = f"{REGISTRY}/llmops-gpu:{VERSION}"
