import json
import time

import httpx2
import pytest

from serving import client

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def flaky_server():
    """A loopback server that answers each path with a scripted list of statuses, and counts the hits."""
    from fastapi import FastAPI, Response

    from tests.conftest import Live

    script = {"/retry": [429, 503, 200], "/fatal": [500, 200], "/always-busy": [429] * 10}
    hits = {k: 0 for k in script}
    app = FastAPI()

    @app.get("/{name}")
    def scripted(name: str):
        path = f"/{name}"
        status = script[path][min(hits[path], len(script[path]) - 1)]
        hits[path] += 1
        return Response(json.dumps({"status": status}), status_code=status, media_type="application/json")

    with Live(app) as live:  # waits for the start with a deadline; stopped on leaving, whatever the tests did
        yield live.url, hits


def http(attempts=3):
    return httpx2.Client(transport=client.RetryTransport(attempts=attempts, backoff=0.01), timeout=5)


def test_429_and_503_are_retried_until_success(flaky_server):
    url, hits = flaky_server
    assert http().get(f"{url}/retry").status_code == 200
    assert hits["/retry"] == 3


def test_other_errors_are_not_retried(flaky_server):
    url, hits = flaky_server
    assert http().get(f"{url}/fatal").status_code == 500
    assert hits["/fatal"] == 1


def test_retries_are_bounded(flaky_server):
    url, hits = flaky_server
    assert http(attempts=3).get(f"{url}/always-busy").status_code == 429
    assert hits["/always-busy"] == 3


def test_connection_errors_are_retried_then_raised():
    from tests.conftest import free_port

    started = time.monotonic()
    with pytest.raises(httpx2.ConnectError):
        http(attempts=3).get(f"http://127.0.0.1:{free_port()}/nothing-listens")
    assert time.monotonic() - started >= 0.01 + 0.02  # two backoffs happened


def test_endpoint_resolution_order(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LLMOPS_SERVING_DIR", str(tmp_path))
    with pytest.raises(LookupError, match="llmops serve models:/m@champion"):
        client.find_endpoint("m@champion").url
    monkeypatch.setenv("LLMOPS_ENDPOINT_URL", "http://127.0.0.1:9/")
    assert client.find_endpoint("m@champion").url == "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="name@alias"):
        client.parse_ref("no-alias")


@pytest.mark.parametrize(
    "url, trusted",
    [
        ("http://tgi-llmops-demo.llmops-serving.svc.cluster.local:80", True),
        ("http://tgi-llmops-demo.llmops-serving.svc:80", True),
        ("http://tgi-x.llmops-serving.svc:80", False),  # another model's Service
        ("http://tgi-llmops-demo.attacker-ns.svc:80", False),  # a Service of the same name in another namespace
        ("http://127.0.0.1:8090", True),
        ("http://localhost:8090", True),
        ("https://evil.example.com/v1", False),
        ("http://10.0.0.7:8080", False),  # a pod IP: not what the deployer writes
        ("http://tgi.ns.svc.cluster.local.evil.example.com", False),
        ("http://127.evil.example:8090", False),  # a name that merely starts like a loopback address
        ("http://[::1]:8090", True),
        ("http://user:pw@tgi-llmops-demo.llmops-serving.svc:80", False),
        ("file:///etc/passwd", False),
    ],
)
def test_an_endpoint_tag_is_followed_only_to_the_models_own_service_or_loopback(url, trusted):
    if trusted:
        assert client.trusted_endpoint(url, "llmops-demo@champion") == url
    else:
        with pytest.raises(LookupError, match="neither llmops-demo's Service in the serving namespace.*LLMOPS_"):
            client.trusted_endpoint(url, "llmops-demo@champion")


def test_an_endpoint_is_followed_only_when_the_deployer_says_deployed_and_a_loopback_server_agrees(
    mlflow_server, tiny_base, monkeypatch
):
    """A foreign deploy.endpoint on a refused version, or on a version whose loopback server serves another,
    is refused with the reason; the version the deployer deployed is followed."""
    import uuid

    from mlflow import MlflowClient

    from tests.conftest import Live, register_served, server_app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.delenv("LLMOPS_ENDPOINT_URL", raising=False)
    name = f"client-{uuid.uuid4().hex[:6]}"
    mlflow = MlflowClient()
    try:
        for _ in range(2):
            register_served(name, tiny_base, {"gate.verdict": "passed"}, experiment="client-tests")
        with Live(server_app(str(tiny_base), model_id=f"models:/{name}/1")) as live:
            mlflow.set_registered_model_alias(name, "champion", "2")
            foreign = {"deploy.status": "refused", "deploy.reason": "gate.verdict is failed"}
            for key, value in {**foreign, "deploy.endpoint": "http://tgi-mine.llmops-serving.svc:80"}.items():
                mlflow.set_model_version_tag(name, "2", key, value)
            with pytest.raises(LookupError, match="deploy.status=refused: gate.verdict is failed"):
                client.find_endpoint(f"{name}@champion").url
            mlflow.set_model_version_tag(name, "2", "deploy.status", "deployed")
            with pytest.raises(LookupError, match="neither"):
                client.find_endpoint(f"{name}@champion").url
            mlflow.set_model_version_tag(name, "2", "deploy.endpoint", live.url)  # serves version 1, not 2
            with pytest.raises(LookupError, match="does not serve version 2"):
                client.find_endpoint(f"{name}@champion").url
            mlflow.set_registered_model_alias(name, "champion", "1")
            for key, value in {"deploy.status": "deployed", "deploy.endpoint": live.url}.items():
                mlflow.set_model_version_tag(name, "1", key, value)
            assert client.find_endpoint(f"{name}@champion").url == live.url
    finally:
        mlflow.delete_registered_model(name)
