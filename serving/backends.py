"""Where a deployed version serves: a TGI Deployment in Kubernetes, or a local `llmops serve` process.

Each backend answers the same questions for the deployer: what serves a model now (`actual`), deploy a version,
finish a rollout a restarted deployer found half-done, which models it serves (`managed`), stop serving one
(`retire`), and `close` at shutdown.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from serving.settings import DeploySection

log = logging.getLogger("llmops.deployer")


class ShuttingDown(Exception):
    """The backend closed while a deploy was under way: the deploy was not attempted to its end."""


@dataclass(frozen=True)
class Target:
    name: str
    version: str
    run_id: str
    tags: dict


def server_info(url: str, timeout: float = 3.0) -> dict | None:
    try:
        response = requests.get(f"{url}/info", timeout=timeout)
        return response.json() if response.ok else None
    except requests.RequestException:
        return None


class KubeBackend:
    kind = "kubernetes"

    def __init__(self, cfg: DeploySection, api_client=None, poll_s: float = 2.0):
        self.cfg, self.api_client, self.poll_s = cfg, api_client, poll_s

    def endpoint(self, name: str) -> str:
        from serving.manifests import object_name

        return f"http://{object_name(name)}.{self.cfg.namespace}.svc.cluster.local:{self.cfg.port}"

    def actual(self, name: str) -> dict | None:
        from serving import kube
        from serving.manifests import object_name

        current = kube.current_version(object_name(name), self.cfg.namespace, api_client=self.api_client)
        info = server_info(self.endpoint(name), timeout=1.0) if current else None
        if current and info and info.get("model_sha") and info["model_sha"] != current.get("run_id"):
            return None  # annotations say one thing, the server serves another: redo it
        return current

    def finish(self, target: Target, actual: dict) -> tuple[bool, str]:
        """The Deployment already names the target (a deployer stopped mid-rollout): wait for it, or roll back."""
        from serving import kube
        from serving.manifests import object_name

        try:
            ok = kube.finish_rollout(
                self.cfg, object_name(target.name), actual["generation"], api_client=self.api_client, poll_s=self.poll_s
            )
        except kube.RolloutError as err:
            return False, str(err)
        return (True, self.endpoint(target.name)) if ok else (False, self._not_ready())

    def managed(self) -> set[str]:
        from serving import kube

        return set(kube.managed_models(self.cfg.namespace, api_client=self.api_client))

    def retire(self, name: str, reason: str) -> None:
        from serving import kube
        from serving.manifests import object_name

        kube.scale_to_zero(object_name(name), self.cfg.namespace, reason, api_client=self.api_client)

    def _not_ready(self) -> str:
        return (
            f"the rollout did not become ready within {self.cfg.rollout_timeout_s}s and was rolled back "
            "(see the pod's fetch-model init container: it refuses files that fail verification)"
        )

    def close(self) -> None:
        """What this backend deployed keeps serving: the cluster owns it."""

    def deploy(self, target: Target) -> tuple[bool, str]:
        from serving import kube

        if unpinned := self.cfg.unpinned():
            return False, (
                f"{' and '.join(unpinned)} still carry the placeholder digest: set the digest your registry serves "
                "(deploy.tgi_image=IMAGE:TAG@sha256:...) in the deployer's profile; nothing was applied"
            )
        try:
            ok = kube.deploy_version(
                self.cfg,
                name=target.name,
                version=target.version,
                run_id=target.run_id,
                tags=target.tags,
                api_client=self.api_client,
                poll_s=self.poll_s,
            )
        except kube.RolloutError as err:
            return False, str(err)
        return (True, self.endpoint(target.name)) if ok else (False, self._not_ready())


class LocalBackend:
    """One local TGI-protocol server per model, replaced when the alias moves."""

    kind = "local"

    def __init__(
        self, base_port: int = 8090, host: str = "127.0.0.1", startup_s: float = 300.0, log_dir: Path | None = None
    ):
        self.base_port, self.host, self.startup_s = base_port, host, startup_s
        self.log_dir = Path(log_dir or Path(".llmops") / "serving")
        self.servers: dict[str, tuple[subprocess.Popen, int]] = {}
        self.starting: set[subprocess.Popen] = set()  # not yet answering; close() stops these too
        self.closing, self.lock = threading.Event(), threading.Lock()

    def actual(self, name: str) -> dict | None:
        if name not in self.servers:
            return None
        info = server_info(f"http://{self.host}:{self.servers[name][1]}")
        if not info or not str(info.get("model_id", "")).startswith(f"models:/{name}/"):
            return None
        return {"name": name, "version": info["model_id"].rsplit("/", 1)[1], "run_id": info.get("model_sha")}

    def _free_port(self) -> int:
        """base_port when free, else any port the OS offers: the old server holds its port until the new one is up."""
        import socket

        for port in (self.base_port, 0):
            with socket.socket() as sock:
                try:
                    sock.bind((self.host, port))
                except OSError:
                    continue
                return sock.getsockname()[1]
        raise OSError("no free port")

    def deploy(self, target: Target) -> tuple[bool, str]:
        port = self._free_port()
        url = f"http://{self.host}:{port}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logfile = open(self.log_dir / f"{target.name}-{target.version}.log", "ab")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving.cli",
                "serve",
                f"models:/{target.name}/{target.version}",
                "--host",
                self.host,
                "--port",
                str(port),
            ],
            stdout=logfile,
            stderr=subprocess.STDOUT,
        )
        with self.lock:
            self.starting.add(proc)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline and proc.poll() is None and not self.closing.is_set():
            if server_info(url, timeout=1.0):
                break
            self.closing.wait(0.3)
        else:
            with self.lock:
                self.starting.discard(proc)
            proc.kill()
            logfile.close()
            if self.closing.is_set():
                raise ShuttingDown(f"{target.name}/{target.version}")
            # the previous server, if any, keeps serving; the reason is the server's last word
            return False, last_line(self.log_dir / f"{target.name}-{target.version}.log") or f"no answer from {url}"
        with self.lock:  # close() may have run meanwhile: a server it did not see is stopped here
            self.starting.discard(proc)
            if self.closing.is_set():
                _stop(proc)
                raise ShuttingDown(f"{target.name}/{target.version}")
            old = self.servers.get(target.name)
            self.servers[target.name] = (proc, port)
        if old:
            _stop(old[0])
        return True, url

    def endpoint(self, name: str) -> str:
        return f"http://{self.host}:{self.servers[name][1]}"

    def finish(self, target: Target, actual: dict) -> tuple[bool, str]:
        return True, self.endpoint(target.name)  # it answers /info as the target: that is finished

    def managed(self) -> set[str]:
        return set(self.servers)

    def retire(self, name: str, reason: str) -> None:
        proc, _ = self.servers.pop(name)
        _stop(proc)

    def close(self) -> None:
        """Stop every server this backend started, those still starting included; a deploy under way ends with
        ShuttingDown (not a failure of its version)."""
        with self.lock:
            self.closing.set()
            procs = [*self.starting, *(proc for proc, _ in self.servers.values())]
            self.servers.clear()
            self.starting.clear()
        for proc in procs:
            _stop(proc)


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return lines[-1].strip()[:500] if lines else ""


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
