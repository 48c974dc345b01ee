"""Benchmark: loading a registered version through `mlflow.pyfunc.load_model`, and what verifying every
served file against the registered manifest adds to the TGI init container's download (SmolLM2)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

REPEATS = 3


def measure() -> dict:
    import mlflow

    from components.chat_pyfunc import download_version, verify_version
    from components.util import dir_size
    from pipelines import mlflow_local
    from serving.verified_model import model_version
    from tests.benchmarks.serving import base_dir
    from tests.conftest import free_port, register_served

    root = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    server = mlflow_local.start(root / "mlflow", port=free_port(), detach=False)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    try:
        name = f"bench-{uuid.uuid4().hex[:6]}"
        version = register_served(name, base_dir(), {"gate.verdict": "passed"}).version
        mv = model_version(name, version)
        gigabytes = dir_size(base_dir()) / 1e9
        loads, downloads, checks = [], [], []
        for i in range(REPEATS):
            started = time.perf_counter()
            model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
            loads.append(time.perf_counter() - started)
            del model
            dest = root / f"download-{i}"
            started = time.perf_counter()
            download_version(mv, dest)
            downloads.append(time.perf_counter() - started)
            started = time.perf_counter()
            verify_version(dest, mv)
            checks.append(time.perf_counter() - started)
            shutil.rmtree(dest)
        return {"gigabytes": gigabytes, "load_s": min(loads), "download_s": min(downloads), "verify_s": min(checks)}
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        if previous is None:  # the runner logs the figures to the user's tracking server, not this one
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    gb = result["gigabytes"]
    per_gb = {k: result[k] / gb for k in ("load_s", "download_s", "verify_s")}
    return [
        ("served directory (GB)", f"{gb:.3f}", "", ""),
        (f"mlflow.pyfunc.load_model from the registry (s/GB; best of {REPEATS})", f"{per_gb['load_s']:.1f}", "", ""),
        ("fetch_model's download, loopback MLflow (s/GB)", f"{per_gb['download_s']:.2f}", "", "1.00x"),
        (
            "fetch_model's verification of every file (s/GB)",
            f"{per_gb['verify_s']:.2f}",
            "",
            f"{per_gb['verify_s'] / per_gb['download_s']:.2f}x",
        ),
    ]
