"""The deployer: registry alias → serving. Webhooks make it fast; the reconcile loop makes it right.

Desired state: the version behind the alias (`deploy.alias`, default champion) of every registered model.
Actual state: the Deployment's annotations (plus /info model_sha where the server reports one), or the
local server's /info. A reconcile pass deploys only where the two differ, so a lost webhook, a replayed
one, or a restart of the deployer all converge on the same state without repeating work.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import requests

from serving.settings import DeploySection

log = logging.getLogger("llmops.deployer")
STATUS_TAG, TIME_TAG, ENDPOINT_TAG, BACKEND_TAG = "deploy.status", "deploy.time", "deploy.endpoint", "deploy.backend"
REASON_TAG, OVERRIDE_TAG = "deploy.reason", "gate.override"


def promotion_refusal(tags: dict) -> str | None:
    """Why a version may not serve, or None. Only a passed gate deploys, unless a person overrides it on
    purpose: the tag gate.override holds their reason."""
    if tags.get("gate.verdict") == "passed" or tags.get(OVERRIDE_TAG, "").strip():
        return None
    verdict = tags.get("gate.verdict") or "missing"
    why = f": {tags['gate.reason']}" if tags.get("gate.reason") else ""
    return (
        f"gate.verdict is {verdict}{why}. Nothing was deployed; to serve it anyway, set the tag "
        f"{OVERRIDE_TAG} to your reason"
    )


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

    def close(self) -> None:
        """What this backend deployed keeps serving: the cluster owns it."""

    def deploy(self, target: Target) -> tuple[bool, str]:
        from serving import kube

        ok = kube.deploy_version(
            self.cfg,
            name=target.name,
            version=target.version,
            run_id=target.run_id,
            tags=target.tags,
            api_client=self.api_client,
            poll_s=self.poll_s,
        )
        if not ok:
            return False, (
                f"the rollout did not become ready within {self.cfg.rollout_timeout_s}s and was rolled back "
                "(see the pod's fetch-model init container: it refuses files that fail verification)"
            )
        return ok, self.endpoint(target.name)


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
        self.closing = threading.Event()

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
        self.starting.add(proc)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline and proc.poll() is None and not self.closing.is_set():
            if server_info(url, timeout=1.0):
                break
            self.closing.wait(0.3)
        else:
            self.starting.discard(proc)
            proc.kill()
            logfile.close()
            # the previous server, if any, keeps serving; the reason is the server's last word
            return False, last_line(self.log_dir / f"{target.name}-{target.version}.log") or f"no answer from {url}"
        old = self.servers.get(target.name)
        self.servers[target.name] = (proc, port)
        self.starting.discard(proc)
        if old:
            _stop(old[0])
        return True, url

    def close(self) -> None:
        """Stop every server this backend started, those still starting included."""
        self.closing.set()
        for proc in [*self.starting, *(proc for proc, _ in self.servers.values())]:
            _stop(proc)
        self.servers.clear()
        self.starting.clear()


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return lines[-1].strip()[:500] if lines else ""


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


class Deployer:
    def __init__(
        self, backend, alias: str = "champion", client=None, interval_s: float = 30.0, models: list[str] | None = None
    ):
        from mlflow import MlflowClient

        self.backend, self.alias, self.interval_s = backend, alias, interval_s
        self.models = set(models or ())  # an allowlist of registered model names; empty: every model
        self.client = client or MlflowClient()
        self.wake = threading.Event()
        self.lock = threading.Lock()  # webhooks and the timer never deploy at the same time
        self.state: dict[str, dict] = {}
        self.passes = 0

    def desired(self) -> dict[str, Target]:
        targets = {}
        for model in self.client.search_registered_models():
            if self.models and model.name not in self.models:
                continue
            version = (model.aliases or {}).get(self.alias)
            if version is not None:
                mv = self.client.get_model_version(model.name, str(version))
                targets[model.name] = Target(model.name, mv.version, mv.run_id, dict(mv.tags))
        return targets

    def reconcile_once(self) -> list[str]:
        """One pass over every model; returns what it did, e.g. ["deployed m/3"]."""
        with self.lock:
            self.passes += 1
            actions = []
            for name, target in self.desired().items():
                actual = self.backend.actual(name)
                self.state[name] = {"desired": target.version, "actual": actual and actual.get("version")}
                if actual and actual.get("version") == target.version and actual.get("run_id") == target.run_id:
                    continue
                if refusal := promotion_refusal(target.tags):
                    if target.tags.get(STATUS_TAG) != "refused" or target.tags.get(REASON_TAG) != refusal:
                        actions.append(self._refuse(target, refusal))
                    continue  # the endpoint keeps what it serves
                if target.tags.get(STATUS_TAG) == "failed" and target.tags.get(BACKEND_TAG) == self.backend.kind:
                    continue  # it failed here before; moving the alias (or deleting the tag) retries
                actions.append(self._deploy(target))
            return actions

    def _refuse(self, target: Target, reason: str) -> str:
        log.warning("refused %s version %s: %s", target.name, target.version, reason)
        self.client.set_model_version_tag(target.name, target.version, REASON_TAG, reason)
        self.client.set_model_version_tag(target.name, target.version, STATUS_TAG, "refused")
        return f"refused {target.name}/{target.version}"

    def _deploy(self, target: Target) -> str:
        # Reached only past promotion_refusal: a version whose gate did not pass carries a person's override.
        override = target.tags.get(OVERRIDE_TAG, "").strip() if target.tags.get("gate.verdict") != "passed" else ""
        if override:
            log.warning(
                "deploying %s version %s although its gate %s: overridden (%s)",
                target.name,
                target.version,
                target.tags.get("gate.verdict") or "never ran",
                override,
            )
        log.info("deploying %s version %s", target.name, target.version)
        self.client.set_model_version_tag(target.name, target.version, STATUS_TAG, "deploying")
        try:
            ok, endpoint = self.backend.deploy(target)  # on failure, the second item is the reason
        except Exception as err:  # a broken deploy must not stop the loop; it is recorded on the version
            log.exception("deploy of %s/%s failed", target.name, target.version)
            ok, endpoint = False, f"error: {err}"[:500]
        # The status goes last: whoever sees deploy.status=deployed also finds the endpoint and time.
        tags = {TIME_TAG: datetime.now(timezone.utc).isoformat(), BACKEND_TAG: self.backend.kind}
        if ok:
            tags[ENDPOINT_TAG] = endpoint
        else:
            tags[REASON_TAG] = endpoint
        if override:
            tags["deploy.gate_override"] = override
        tags[STATUS_TAG] = "deployed" if ok else "failed"
        if ok and self.backend.kind == "local":
            from serving.client import write_local_record

            write_local_record(target.name, self.alias, endpoint, target.version)
        for key, value in tags.items():
            self.client.set_model_version_tag(target.name, target.version, key, value)
        self.state[target.name] = {
            "desired": target.version,
            "actual": target.version if ok else None,
            "status": tags[STATUS_TAG],
        }
        return f"{tags[STATUS_TAG]} {target.name}/{target.version}"

    def notify(self) -> None:
        self.wake.set()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                for action in self.reconcile_once():
                    log.info(action)
            except Exception:  # the registry or the cluster may be briefly away; try again next pass
                log.exception("reconcile pass failed")
            self.wake.wait(self.interval_s)
            self.wake.clear()
