"""The e2e tier's user: a fresh workspace with a local MLflow server, commands run as a user types them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from tests.conftest import ROOT, free_port

README = (ROOT / "README.md").read_text()
LLMOPS = str(Path(sys.executable).with_name("llmops"))
QUESTION = "Hi, I lost my credit card yesterday"
# The demo's label for that question (components/demo_data.py).
ANSWER = "card_lost"


def documented(command: str) -> str:
    assert command in README, f"the README no longer documents {command!r}: update this test with it"
    return command


class Workspace:
    """A user's shell: a fresh directory, the repo's Makefile, and a local MLflow server on a free port."""

    def __init__(self, path: Path):
        self.path, self.root = path, path / ".llmops"
        port = free_port()
        self.tracking_uri = f"http://127.0.0.1:{port}"
        drop = ("MLFLOW_TRACKING_URI", "LLMOPS_ENDPOINT_URL", "LLMOPS_SERVING_DIR")
        self.env = {k: v for k, v in os.environ.items() if k not in drop}
        # COLUMNS: rich wraps at the terminal width, and a pipe has none.
        self.env.update(LLMOPS_MLFLOW_PORT=str(port), COLUMNS="200")

    def make(self, target: str, timeout: float, **variables: str) -> subprocess.CompletedProcess:
        args = ["make", "-C", str(ROOT), target] + [f"{k}={v}" for k, v in variables.items()]
        return self.run(args, timeout)

    def llmops(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run([LLMOPS, *args], timeout)

    def run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run to the end; past `timeout` the command and everything it started (make's llmops, kfp's tasks)
        are killed together, so nothing of a timed-out run goes on beside the next test."""
        proc = subprocess.Popen(
            args, cwd=self.path, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise
        done = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
        assert done.returncode == 0, f"{args} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done

    def start(self, *args: str) -> subprocess.Popen:
        """A long-running command in its own process group, so everything it starts can be stopped with it."""
        return subprocess.Popen(
            [LLMOPS, *args],
            cwd=self.path,
            env=self.env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=(self.path / f"{args[0]}.log").open("w"),
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # a child left behind (a model server) goes with its group
    except ProcessLookupError:
        pass


def healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False
