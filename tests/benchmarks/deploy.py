"""Benchmark: promotion to an answering endpoint in local mode with SmolLM2, and how long the
reconcile loop takes to notice an alias change whose webhook was lost."""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

SECRET = "bench-secret"
INTERVAL_S = 10.0


def _register(model_dir: Path, name: str) -> list[str]:
    from tests.conftest import register_served

    tags = {"recommended_quantize": "none", "gate.verdict": "passed"}
    return [register_served(name, model_dir, tags).version for _ in range(2)]


def until(predicate, timeout: float = 300.0) -> float:
    """Seconds until `predicate()` holds (tests.conftest.wait_for: polled, with a deadline)."""
    from tests.conftest import wait_for

    start = time.monotonic()
    wait_for(predicate, timeout, "the benchmark's condition")
    return time.monotonic() - start


@contextmanager
def local_stack(prefix: str, cfg=None):
    """(root, MLflow server, local backend): a loopback MLflow server and a local serving backend, with the
    environment pointed at them, all undone on exit (the bench's own MLflow run must not go to a stopped server)."""
    from pipelines import mlflow_local
    from serving.local_backend import LocalBackend
    from tests.conftest import free_port

    root = Path(tempfile.mkdtemp(prefix=prefix))
    server = mlflow_local.start(root / "mlflow", port=free_port(), detach=False)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "LLMOPS_SERVING_DIR")}
    os.environ.update(MLFLOW_TRACKING_URI=server.url, LLMOPS_SERVING_DIR=str(root / "serving"))
    backend = LocalBackend(cfg, base_port=free_port(), log_dir=root / "logs")
    try:
        yield root, server, backend
    finally:
        backend.close()
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def measure() -> dict:
    from mlflow import MlflowClient

    from serving.client import chat_model
    from serving.deployer import Deployer
    from serving.deployer_app import WEBHOOK_NAME, create_app, register_webhook
    from serving.webhooks import Verifier
    from tests.benchmarks.serving import base_dir
    from tests.conftest import Live

    with local_stack("bench-deploy-") as (_, _, backend):
        name = f"bench-{uuid.uuid4().hex[:6]}"
        first, second = _register(base_dir(), name)
        client, deployer = MlflowClient(), Deployer(backend, interval_s=INTERVAL_S)
        with Live(create_app(deployer, Verifier(SECRET))) as live:
            register_webhook(live.url, SECRET)
            until(lambda: deployer.passes >= 1)
            started = time.monotonic()
            client.set_registered_model_alias(name, "champion", first)
            until(lambda: client.get_model_version(name, first).tags.get("deploy.status") == "deployed")
            answer = chat_model(f"{name}@champion", max_new_tokens=16).invoke("Say hello")
            promote_to_answer = time.monotonic() - started
            for hook in client.list_webhooks():  # lose every event from here on
                if hook.name == WEBHOOK_NAME:
                    client.delete_webhook(hook.webhook_id)
            time.sleep(3)  # past the server's webhook cache TTL, so the deleted hook really gets nothing
            passes = deployer.passes
            started = time.monotonic()
            client.set_registered_model_alias(name, "champion", second)
            noticed = until(lambda: deployer.passes > passes and deployer.state.get(name, {}).get("desired") == second)
            deployed = (
                until(lambda: client.get_model_version(name, second).tags.get("deploy.status") == "deployed") + noticed
            )
        return {
            "promote_to_answer_s": promote_to_answer,
            "answer": answer.content[:60],
            "missed_event_noticed_s": noticed,
            "missed_event_deployed_s": deployed,
            "interval_s": INTERVAL_S,
        }


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    return [
        (
            "alias set → LangChain answer, local mode, SmolLM2 (s)",
            f"{result['promote_to_answer_s']:.1f}",
            "30",
            f"{30 / result['promote_to_answer_s']:.2f}x",
        ),
        (
            f"missed webhook noticed by the reconcile loop (s, interval {result['interval_s']:.0f})",
            f"{result['missed_event_noticed_s']:.1f}",
            f"≤ {result['interval_s']:.0f}",
            "",
        ),
        ("missed webhook → new version serving (s)", f"{result['missed_event_deployed_s']:.1f}", "", ""),
    ]
