"""A real `mlflow server` on 127.0.0.1 for machines with no tracking URI configured.

SQLite store and artifacts live in a git-ignored folder. The server outlives `make run` so the
UI can be opened afterwards; its pid file lets the next run reuse it and `llmops mlflow-stop` end it.
A record per port outside that folder (in a directory of this user's under the temp directory) names the
store each server was started on, so a server whose store was deleted (`rm -rf .llmops`) is replaced rather
than reused, and a server that is not ours is never mistaken for one.
The webhook settings let the deployer's loopback receiver get registry events.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from components.environment import (
    MLFLOW_PORT,
    TRACKING_URI,
    WEBHOOK_CACHE_TTL,
    WEBHOOK_ENCRYPTION_KEY,
    WEBHOOK_PRIVATE_IPS,
    WEBHOOK_SCHEMES,
)

DEFAULT_PORT = 5077


def record_path(port: int) -> Path:
    """Which store the server on `port` was started on. Kept outside the store, which a user may delete, and
    in the temp directory, which a reboot clears along with the processes the records name."""
    return Path(tempfile.gettempdir()) / f"llmops-mlflow-{os.getuid()}" / f"{port}.json"


@dataclass
class LocalServer:
    url: str
    root: Path
    process: subprocess.Popen | None = None

    def stop(self) -> None:
        """Stop this store's server, found by its pid file or, when the store was deleted, by its record."""
        records = {path: _read_record(path) for path in record_path(0).parent.glob("*.json")}
        pid = self.process.pid if self.process else _read_pid(self.root)
        pid = pid or next((r.get("pid") for r in records.values() if r.get("root") == str(self.root)), None)
        stop_pid(pid)
        (self.root / "server.pid").unlink(missing_ok=True)
        for path, record in records.items():
            if pid and record.get("pid") == pid:
                path.unlink(missing_ok=True)


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def _pid_file(root: Path) -> tuple[int | None, int | None]:
    """(pid, port) from the store's server.pid."""
    try:
        pid, port = (int(v) for v in (root / "server.pid").read_text().split()[:2])
        return pid, port
    except (OSError, ValueError):
        return None, None


def _read_pid(root: Path) -> int | None:
    return _pid_file(root)[0]


def _record_dir() -> Path:
    """The records' directory, private to this user: a record names a process to kill, so one planted by
    another user (the temp directory is shared) must never be read."""
    directory = record_path(0).parent
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:  # owned by us, writable by nobody else
        raise RuntimeError(f"{directory} is not private to this user (owner {info.st_uid}, mode {info.st_mode:o})")
    return directory


def _read_record(path: Path) -> dict:
    try:
        _record_dir()
        record = json.loads(path.read_text())
    except (OSError, ValueError, RuntimeError):
        return {}
    return record if _is_mlflow_server(record.get("pid")) else {}  # a pid reused by another process: ignored


def _is_mlflow_server(pid) -> bool:
    """The pid runs `mlflow server` (read from /proc where there is one; elsewhere, that it is alive)."""
    if not isinstance(pid, int) or not _alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.parent.joinpath("self").exists():
        return True
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return b"mlflow" in args and b"server" in args


def _reap(pid: int) -> None:
    """A server this process started and stopped stays a zombie (alive to os.kill) until it is waited for."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: its own parent reaps it
        pass


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    _reap(pid)
    try:
        return os.kill(pid, 0) is None
    except (ProcessLookupError, PermissionError):
        return False


def _ours(url: str, root: Path, port: int) -> bool:
    """Whether the server answering on `url` serves this store. A server llmops started on a store that has
    since been deleted is stopped (it would write into files nobody can see, then fail); any other server
    is refused with what to do."""
    record = _read_record(record_path(port))
    pid, pid_port = _pid_file(root)
    if not record and pid_port == port and _is_mlflow_server(pid):
        record = {"pid": pid, "root": str(root)}  # started on this port before records existed
    if not record:
        raise RuntimeError(
            f"{url} answers, but it is no MLflow server llmops started here; set {MLFLOW_PORT.name} to a free "
            f"port, or {TRACKING_URI.name} to use that server"
        )
    theirs = Path(record["root"])
    if (theirs / "mlflow.db").exists():
        if theirs == root:
            return True
        raise RuntimeError(
            f"{url} is the local MLflow server of another store ({theirs}); stop it with `llmops mlflow-stop "
            f"--root {theirs.parent}`, or set {MLFLOW_PORT.name} to a free port"
        )
    print(f"stopping the local MLflow server on {url}: its store {theirs} was deleted", file=sys.stderr)
    stop_pid(record["pid"])
    record_path(port).unlink(missing_ok=True)
    return False


def stop_pid(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    for _ in range(50):
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def server_env(root: Path) -> dict:
    env = dict(os.environ)
    env.setdefault(WEBHOOK_SCHEMES, "https,http")
    env.setdefault(WEBHOOK_PRIVATE_IPS, "true")
    # The server caches each event's webhook list (60 s by default): a deployer that registers itself
    # just before a promotion would otherwise miss it and wait for its reconcile pass.
    env.setdefault(WEBHOOK_CACHE_TTL, "2")
    key_file = root / "webhook-encryption.key"
    if not key_file.exists():  # stable across restarts, or stored webhook secrets become unreadable
        from cryptography.fernet import Fernet

        key_file.write_bytes(Fernet.generate_key())
        key_file.chmod(0o600)
    env.setdefault(WEBHOOK_ENCRYPTION_KEY, key_file.read_text().strip())
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
    if healthy(url) and _ours(url, root, port):
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
    (_record_dir() / f"{port}.json").write_text(json.dumps({"pid": proc.pid, "root": str(root)}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {root / 'server.log'}")
        if healthy(url):
            return LocalServer(url, root, None if detach else proc)
        time.sleep(0.5)
    stop_pid(proc.pid)
    raise TimeoutError(f"mlflow server on {url} did not become healthy in {timeout:.0f}s; see {root / 'server.log'}")
