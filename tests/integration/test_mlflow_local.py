"""The local MLflow server `llmops run` starts, reuses and stops (pipelines/mlflow_local.py)."""

import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from pipelines import mlflow_local
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def test_a_server_is_reused_for_its_own_store_only_and_replaced_when_its_store_was_deleted(tmp_path):
    from mlflow import MlflowClient

    port, root, other = free_port(), tmp_path / "run" / ".llmops" / "mlflow", tmp_path / "other" / "mlflow"
    try:  # the start itself inside: a server started by a failing start is stopped too
        first = mlflow_local.start(root, port=port, detach=True)
        pid = mlflow_local._read_pid(root)
        MlflowClient(first.url).create_experiment("before")
        assert mlflow_local.start(root, port=port).url == first.url and mlflow_local._read_pid(root) == pid
        with pytest.raises(RuntimeError, match=f"another store \\({root}\\).*mlflow-stop"):
            mlflow_local.start(other, port=port)

        shutil.rmtree(tmp_path / "run")  # what `rm -rf .llmops` does under a detached server
        second = mlflow_local.start(root, port=port, detach=True)
        assert not mlflow_local._alive(pid) and mlflow_local._read_pid(root) not in (None, pid)
        client = MlflowClient(second.url)
        assert client.get_experiment_by_name("before") is None  # the new store, not the deleted one
        client.create_experiment("after")
        assert (root / "mlflow.db").exists() and (root / "artifacts").is_dir()

        shutil.rmtree(tmp_path / "run")  # `llmops mlflow-stop` still finds it by the record
    finally:
        mlflow_local.LocalServer("", root).stop()
    assert not mlflow_local.healthy(f"http://127.0.0.1:{port}") and not mlflow_local.record_path(port).exists()


def test_a_port_held_by_something_else_is_refused_with_what_to_do(tmp_path):
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    foreign = HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=foreign.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(RuntimeError, match="no MLflow server llmops started.*LLMOPS_MLFLOW_PORT"):
            mlflow_local.start(tmp_path / "mlflow", port=foreign.server_address[1])
    finally:
        foreign.shutdown()
        thread.join(timeout=10)
    assert not (tmp_path / "mlflow" / "server.pid").exists()
