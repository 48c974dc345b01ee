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
        client.resolve_endpoint("m@champion")
    monkeypatch.setenv("LLMOPS_ENDPOINT_URL", "http://127.0.0.1:9/")
    assert client.resolve_endpoint("m@champion") == "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="name@alias"):
        client.parse_ref("no-alias")


@pytest.mark.parametrize(
    "url, trusted",
    [
        ("http://tgi-llmops-demo.llmops-serving.svc.cluster.local:80", True),
        ("http://tgi-x.ns.svc:80", True),
        ("http://127.0.0.1:8090", True),
        ("http://localhost:8090", True),
        ("https://evil.example.com/v1", False),
        ("http://10.0.0.7:8080", False),  # a pod IP: not what the deployer writes
        ("http://tgi.ns.svc.cluster.local.evil.example.com", False),
        ("http://127.evil.example:8090", False),  # a name that merely starts like a loopback address
        ("http://[::1]:8090", True),
        ("http://user:pw@tgi-x.ns.svc:80", False),
        ("file:///etc/passwd", False),
    ],
)
def test_an_endpoint_tag_is_followed_only_to_an_in_cluster_service_or_loopback(url, trusted):
    if trusted:
        assert client.trusted_endpoint(url, "m@champion") == url
    else:
        with pytest.raises(LookupError, match="neither an in-cluster Service.*LLMOPS_ENDPOINT_URL"):
            client.trusted_endpoint(url, "m@champion")
