"""The local backend: one `llmops serve` process per model on this machine, our TGI-protocol server or real vLLM,
replaced when the alias moves; the previous one serves until its successor answers as the new version."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from serving.backends import DeployOutcome, ShuttingDown, Target
from serving.client import served_version
from serving.engines import Engine, EngineRefusal
from serving.placement import keys
from serving.settings import DeploySection


@dataclass(frozen=True)
class Served:
    proc: subprocess.Popen
    port: int
    engine: Engine
    version: str
    run_id: str
    adapters: tuple[str, ...] = ()  # serving.placement keys of the adapters it was started with


class LocalBackend:
    """One local server per model, replaced when the alias moves: `llmops serve` with our TGI-protocol server
    (engine tgi), or with real vLLM started on the verified directory (engine vllm)."""

    kind = "local"

    def __init__(
        self,
        cfg: DeploySection | None = None,
        base_port: int = 8090,
        host: str = "127.0.0.1",
        startup_s: float = 300.0,
        log_dir: Path | None = None,
    ):
        self.cfg = cfg or DeploySection()
        self.base_port, self.host, self.startup_s = base_port, host, startup_s
        self.log_dir = Path(log_dir or Path(".llmops") / "serving")
        self.servers: dict[str, Served] = {}
        self.starting: set[subprocess.Popen] = set()  # not yet answering; close() stops these too
        self.closing, self.lock = threading.Event(), threading.Lock()

    def engine(self, target: Target) -> Engine:
        return self.cfg.engine_of(target.name, target.tags, auto=self.auto_engine)

    @functools.cached_property
    def auto_engine(self) -> Engine:
        """deploy.engine=auto: real vLLM where it imports (it generated 1.8-2.6x our tokens/s on the same cores,
        docs/BENCHMARKS.md, engines), else our server. Asked once: importing vLLM takes seconds."""
        from serving.vllm_local import missing, python_path

        return "tgi" if missing(python_path(self.cfg.vllm_python)) else "vllm"

    def refusal(self, target: Target) -> str | None:
        try:
            self.engine(target)
        except EngineRefusal as err:
            return f"{err}. Nothing was deployed"
        return None

    def actual(self, name: str) -> dict | None:
        served = self.servers.get(name)
        if served is None or served.proc.poll() is not None:
            return None
        if served_version(f"http://{self.host}:{served.port}", name) != served.version:
            return None
        return {
            "name": name,
            "version": served.version,
            "run_id": served.run_id,
            "engine": served.engine,
            "adapters": served.adapters,
        }

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

    def _command(self, target: Target, engine: Engine, port: int) -> list[str]:
        command = [sys.executable, "-m", "serving.cli", "serve", f"models:/{target.name}/{target.version}"]
        command += ["--host", self.host, "--port", str(port), "--engine", engine]
        # each placed adapter under its registered model's name, verified by `llmops serve` before it loads
        command += [f"--adapter={adapter.name}={adapter.uri}" for adapter in target.adapters]
        if engine == "vllm":
            command += ["--vllm-python", self.cfg.vllm_python] if self.cfg.vllm_python else []
            command += ["--kv-cache-gb", str(self.cfg.vllm_kv_cache_gb)]
            command += [f"--vllm-arg={arg}" for arg in self.cfg.extra_args.get("vllm", [])]
        return command

    def deploy(self, target: Target) -> DeployOutcome:
        engine = self.engine(target)
        if engine == "vllm":
            from serving.vllm_local import missing, python_path

            if reason := missing(python_path(self.cfg.vllm_python)):
                return DeployOutcome.failed(reason)
        port = self._free_port()
        url = f"http://{self.host}:{port}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{target.name}-{target.version}.log"
        logfile = open(log_path, "ab")
        # Its own process group: vLLM runs an engine-core child, which a kill of the server alone would orphan.
        proc = subprocess.Popen(
            self._command(target, engine, port), stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
        )
        logfile.close()  # the child holds its own descriptor
        with self.lock:
            self.starting.add(proc)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline and proc.poll() is None and not self.closing.is_set():
            if served_version(url, target.name) == target.version:
                break
            self.closing.wait(0.3)
        else:
            with self.lock:
                self.starting.discard(proc)
            _stop(proc)
            if self.closing.is_set():
                raise ShuttingDown(f"{target.name}/{target.version}")
            # the previous server, if any, keeps serving; the reason is the server's last word
            return DeployOutcome.failed(last_line(log_path) or f"no answer from {url}")
        with self.lock:  # close() may have run meanwhile: a server it did not see is stopped here
            self.starting.discard(proc)
            if self.closing.is_set():
                _stop(proc)
                raise ShuttingDown(f"{target.name}/{target.version}")
            old = self.servers.get(target.name)
            self.servers[target.name] = Served(proc, port, engine, target.version, target.run_id, keys(target.adapters))
        if old:
            _stop(old.proc)
        return DeployOutcome.serving(url)

    def endpoint(self, name: str) -> str:
        return f"http://{self.host}:{self.servers[name].port}"

    def finish(self, target: Target, actual: dict) -> DeployOutcome:
        return DeployOutcome.serving(self.endpoint(target.name))  # it answers as the target: that is finished

    def managed(self) -> set[str]:
        return set(self.servers)

    def retire(self, name: str, reason: str) -> None:
        _stop(self.servers.pop(name).proc)

    def close(self) -> None:
        """Stop every server this backend started, those still starting included; a deploy under way ends with
        ShuttingDown (not a failure of its version)."""
        with self.lock:
            self.closing.set()
            procs = [*self.starting, *(served.proc for served in self.servers.values())]
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
        proc.wait(timeout=30)  # vLLM stops its engine-core process before it exits
    except subprocess.TimeoutExpired:
        pass
    try:  # the server, if still there, and any child it left behind (vLLM's engine core): its whole session
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
