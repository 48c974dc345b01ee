"""A real `mlflow server` on 127.0.0.1 for machines with no tracking URI configured.

SQLite store and artifacts live in a git-ignored folder. The server outlives `make run` so the
UI can be opened afterwards; its pid file lets the next run reuse it and `llmops mlflow-stop` end it.
The webhook settings let the deployer's loopback receiver get registry events.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

DEFAULT_PORT = 5077


@dataclass
class LocalServer:
    url: str
    root: Path
    process: subprocess.Popen | None = None

    def stop(self) -> None:
        stop_pid(self.process.pid if self.process else _read_pid(self.root))
        (self.root / "server.pid").unlink(missing_ok=True)


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def _read_pid(root: Path) -> int | None:
    try:
        return int((root / "server.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stop_pid(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def server_env(root: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "https,http")
    env.setdefault("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    # The server caches each event's webhook list (60 s by default): a deployer that registers itself
    # just before a promotion would otherwise miss it and wait for its reconcile pass.
    env.setdefault("MLFLOW_WEBHOOK_CACHE_TTL", "2")
    key_file = root / "webhook-encryption.key"
    if not key_file.exists():  # stable across restarts, or stored webhook secrets become unreadable
        from cryptography.fernet import Fernet

        key_file.write_bytes(Fernet.generate_key())
        key_file.chmod(0o600)
    env.setdefault("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", key_file.read_text().strip())
    return env


def start(
    root: Path, port: int = DEFAULT_PORT, detach: bool = True, timeout: float = 90.0, auth: dict[str, str] | None = None
) -> LocalServer:
    """Start (or reuse) the server; returns once /health answers.

    Without `auth` the server has no login and listens on loopback only (the laptop setting). With
    `auth` ({"admin_username", "admin_password", "secret_key"}) it runs MLflow's basic-auth app, its user
    database beside the store, as the cluster does (infra/k8s/base/mlflow.yaml).
    """
    root = Path(root).resolve()
    url = f"http://127.0.0.1:{port}"
    if healthy(url):
        return LocalServer(url, root)
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    env = server_env(root)
    if auth:
        config = root / "basic_auth.ini"
        config.write_text(
            f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
            "admin_username = admin\nauthorization_function = "
            "mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        cmd += ["--app-name", "basic-auth"]
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(config),
            MLFLOW_AUTH_ADMIN_USERNAME=auth["admin_username"],
            MLFLOW_AUTH_ADMIN_PASSWORD=auth["admin_password"],
            MLFLOW_FLASK_SERVER_SECRET_KEY=auth["secret_key"],
        )
    log = open(root / "server.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    (root / "server.pid").write_text(f"{proc.pid} {port}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {root / 'server.log'}")
        if healthy(url):
            return LocalServer(url, root, None if detach else proc)
        time.sleep(0.5)
    stop_pid(proc.pid)
    raise TimeoutError(f"mlflow server on {url} did not become healthy in {timeout:.0f}s; see {root / 'server.log'}")
