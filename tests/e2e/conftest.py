"""One workspace and one `make run` on the demo data per session, shared by every e2e module (the README's
commands, real vLLM): the SmolLM2 pipeline run is the tier's expensive part."""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.workspace import LLMOPS, Workspace, documented


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("user"))
    yield ws
    subprocess.run([LLMOPS, "mlflow-stop", "--root", str(ws.root)], cwd=ws.path, env=ws.env, timeout=120)


@pytest.fixture(scope="session")
def demo_run(workspace):
    """`make run`, the README's first command: the demo data, the local profile, a local MLflow server."""
    documented("make run    #")
    done = workspace.make("run", timeout=1200, ARGS=f"--root {workspace.root}")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", workspace.tracking_uri)  # for this process's MLflow client only
        yield done
