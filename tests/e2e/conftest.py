"""One workspace, one `make run` on the demo data and one promoted champion for the e2e package, shared by every
e2e module (the README's commands, real vLLM): the SmolLM2 pipeline run and a vLLM start are the tier's expensive
parts. Package scope: the deployer, its vLLM and the MLflow server stop when the tier ends, not after the
integration and unit tiers have run beside them."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import free_port, wait_for
from tests.e2e.workspace import LLMOPS, Workspace, documented, healthy, stop


@pytest.fixture(scope="package")
def workspace(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("user"))
    yield ws
    subprocess.run([LLMOPS, "mlflow-stop", "--root", str(ws.root)], cwd=ws.path, env=ws.env, timeout=120)


@pytest.fixture(scope="package")
def demo_run(workspace):
    """`make run`, the README's first command: the demo data, the local profile, a local MLflow server."""
    documented("make run    #")
    done = workspace.make("run", timeout=1200, ARGS=f"--root {workspace.root}")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", workspace.tracking_uri)  # for this process's MLflow client only
        yield done


@pytest.fixture(scope="package")
def champion(workspace, demo_run):
    """The README's `llmops deployer &` (the local profile: engine auto, real vLLM where `make vllm` installed
    it) and its `llmops promote llmops-demo-candidates 1`: candidate 1 copied into llmops-demo as version 1,
    served as llmops-demo@champion. Yields the promote's output and the version's deploy tags once it serves."""
    from mlflow import MlflowClient

    documented(".venv/bin/llmops deployer &")
    documented('.venv/bin/llmops promote llmops-demo-candidates 1 --reason "first demo"')
    workspace.env.update(LLMOPS_WEBHOOK_SECRET="e2e-secret", MLFLOW_TRACKING_URI=workspace.tracking_uri)
    port = free_port()
    deployer = workspace.start("deployer", "--port", str(port), "--interval", "5")
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), 120, "the deployer to listen")
        # promote waits for the deployer's outcome and prints it
        promoted = workspace.llmops("promote", "llmops-demo-candidates", "1", "--reason", "first demo", timeout=600)
        client = MlflowClient()
        status = wait_for(
            lambda: (
                client.get_model_version("llmops-demo", "1").tags.get("deploy.status") in ("deployed", "failed")
                and client.get_model_version("llmops-demo", "1").tags
            ),
            300,
            "the deployer to serve version 1",
        )
        yield promoted, status
    finally:
        stop(deployer)
