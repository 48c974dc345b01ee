"""MLflow with its basic-auth app, as the cluster runs it: identities, refusals, and webhooks that still arrive."""

import threading
import time
import uuid

import pytest
import requests

from tests.conftest import Live, free_port

pytestmark = pytest.mark.integration
ADMIN = {"admin_username": "admin", "admin_password": "admin-password-for-tests", "secret_key": "k" * 32}
USERS = {"pipeline": "pipeline-password-1", "deployer": "deployer-password-1", "promoter": "promoter-password-1"}
SECRET = "auth-webhook-secret"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    from mlflow.server import get_app_client

    from pipelines import mlflow_local

    server = mlflow_local.start(tmp_path_factory.mktemp("mlflow-auth"), port=free_port(), detach=False, auth=ADMIN)
    try:
        with identity("admin", ADMIN["admin_password"]):
            users = get_app_client("basic-auth", tracking_uri=server.url)
            for user, password in USERS.items():
                users.create_user(user, password)
        yield server
    finally:
        server.stop()


class identity:
    """MLflow's client reads its credentials from the environment on every request."""

    def __init__(self, user: str | None, password: str | None = None):
        self.values = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}

    def __enter__(self):
        import os

        self.saved = {k: os.environ.get(k) for k in self.values}
        for key, value in self.values.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)

    def __exit__(self, *exc):
        import os

        for key, value in self.saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def test_each_identity_does_its_job_and_an_anonymous_promotion_is_refused(auth_server, monkeypatch, tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)
    name = f"secured-{uuid.uuid4().hex[:6]}"
    (tmp_path / "config.json").write_text("{}")
    with identity("pipeline", USERS["pipeline"]):  # registers, and sets challenger on what it registered
        client = MlflowClient()
        client.create_registered_model(name)
        mlflow.set_experiment(f"auth-{name}")
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(tmp_path / "config.json"), "model")
        version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id).version
        client.set_registered_model_alias(name, "challenger", version)
    with identity("admin", ADMIN["admin_password"]):
        grants = get_app_client("basic-auth", tracking_uri=auth_server.url)
        grants.grant_user_permission("deployer", "registered_model", name, "EDIT")
        grants.grant_user_permission("promoter", "registered_model", name, "EDIT")

    alias = {"name": name, "alias": "champion", "version": version}
    anonymous = requests.post(f"{auth_server.url}/api/2.0/mlflow/registered-models/alias", json=alias, timeout=10)
    assert anonymous.status_code == 401
    wrong = requests.post(
        f"{auth_server.url}/api/2.0/mlflow/registered-models/alias",
        json=alias,
        timeout=10,
        auth=("promoter", "not-the-password"),
    )
    assert wrong.status_code == 401
    with identity("promoter", USERS["promoter"]):
        MlflowClient().set_registered_model_alias(name, "champion", version)
    with identity("deployer", USERS["deployer"]):
        deployer = MlflowClient()
        assert deployer.get_model_version_by_alias(name, "champion").version == version
        deployer.set_model_version_tag(name, version, "deploy.status", "deployed")
    with identity("pipeline", USERS["pipeline"]), pytest.raises(MlflowException):
        MlflowClient().create_webhook(
            name="not-for-the-pipeline", url="http://127.0.0.1:9/x", events=["model_version_alias.created"]
        )  # webhooks are the admin's
    with identity("admin", ADMIN["admin_password"]):
        tags = MlflowClient().get_model_version(name, version).tags
    assert tags["deploy.status"] == "deployed"


class Listener:
    """Stands in for the reconcile loop: counts the deployer app's wake-ups."""

    alias, passes, state = "champion", 0, {}
    backend = type("Backend", (), {"kind": "stub"})()

    def __init__(self):
        self.notified = threading.Event()

    def run(self, stop):
        stop.wait()

    def notify(self):
        self.notified.set()


def test_a_signed_webhook_still_reaches_the_deployer(auth_server, monkeypatch, tmp_path):
    from mlflow import MlflowClient

    from serving.deployer_app import create_app, register_webhook
    from serving.webhooks import Verifier

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)
    name = f"hooked-{uuid.uuid4().hex[:6]}"
    listener = Listener()
    with Live(create_app(listener, Verifier(SECRET))) as live:
        with identity("admin", ADMIN["admin_password"]):
            register_webhook(live.url, SECRET)  # registered once, by the admin identity (infra/k8s/README.md)
            client = MlflowClient()
            client.create_registered_model(name)
            (tmp_path / "config.json").write_text("{}")
            run = client.create_run(client.create_experiment(f"hook-{name}"))
            client.log_artifact(run.info.run_id, str(tmp_path / "config.json"), "model")
            version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id).version
        deadline = time.monotonic() + 30
        with identity("admin", ADMIN["admin_password"]):
            while not listener.notified.is_set() and time.monotonic() < deadline:
                # the server caches the webhook list for MLFLOW_WEBHOOK_CACHE_TTL (2 s here): move the alias
                # until a delivery after the cache refresh arrives
                MlflowClient().set_registered_model_alias(name, "champion", version)
                listener.notified.wait(1.0)
    assert listener.notified.is_set(), "no verified webhook reached the deployer"


class StubServing:
    """A backend that serves one model and records what the deployer retires."""

    kind = "stub"

    def __init__(self, name: str):
        self.names, self.retired = {name}, []

    def managed(self):
        return set(self.names)

    def actual(self, name):
        return None

    def retire(self, name, reason):
        self.retired.append(name)
        self.names.discard(name)


def test_a_deployer_whose_permission_was_revoked_scales_nothing_down(auth_server, monkeypatch, tmp_path):
    """The deployer's listing stops showing a model it may no longer read: it keeps serving it, since reading the
    model by name answers 403, not 404. Only once a direct read shows the alias gone does it scale to zero."""
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    from serving.deployer import Deployer

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)
    name = f"revoked-{uuid.uuid4().hex[:6]}"
    (tmp_path / "config.json").write_text("{}")
    with identity("admin", ADMIN["admin_password"]):
        admin = MlflowClient()
        admin.create_registered_model(name)
        run = admin.create_run(admin.create_experiment(f"revoked-{name}"))
        admin.log_artifact(run.info.run_id, str(tmp_path / "config.json"), "model")
        version = admin.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id).version
        admin.set_registered_model_alias(name, "champion", version)
        grants = get_app_client("basic-auth", tracking_uri=auth_server.url)
        grants.grant_user_permission("deployer", "registered_model", name, "READ")
    backend = StubServing(name)
    with identity("deployer", USERS["deployer"]):
        deployer = Deployer(backend, models=[name])
        assert name in deployer.desired()
    with identity("admin", ADMIN["admin_password"]):  # revoked: the server's default for it is NO_PERMISSIONS
        grants.revoke_user_permission("deployer", "registered_model", name)
    with identity("deployer", USERS["deployer"]):
        assert [m.name for m in deployer.registered() if m.name == name] == []  # the listing hides it
        for _ in range(3):
            assert deployer.reconcile_once() == []
        assert backend.retired == []
    with identity("admin", ADMIN["admin_password"]):
        admin.delete_registered_model_alias(name, "champion")
        grants.grant_user_permission("deployer", "registered_model", name, "READ")
    with identity("deployer", USERS["deployer"]):  # absent from the listings before, now confirmed by name
        assert deployer.reconcile_once() == [f"retired {name}"] and backend.retired == [name]


def test_the_serving_pods_identity_downloads_with_exactly_the_grants_the_readme_gives(
    auth_server, monkeypatch, tmp_path, tiny_base
):
    """The init container's `tgi-reader` login, granted as infra/k8s/README.md says: READ on the registered model
    alone does not let MLflow 3.17.2 hand out the files (it checks downloads against the logged model's
    experiment); with READ on that experiment too, the verified download succeeds."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from serving.verified_model import download_verified, model_version
    from tests.conftest import register_served

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)
    name = f"served-{uuid.uuid4().hex[:6]}"
    with identity("admin", ADMIN["admin_password"]):
        grants = get_app_client("basic-auth", tracking_uri=auth_server.url)
        grants.create_user("tgi-reader", "tgi-reader-password-1")
        version = register_served(name, tiny_base, experiment=f"served-{name}")
        experiment = MlflowClient().get_experiment_by_name(f"served-{name}").experiment_id
        grants.grant_user_permission("tgi-reader", "registered_model", name, "READ")
    with identity("tgi-reader", "tgi-reader-password-1"):
        mv = model_version(name, version.version)
        with pytest.raises((MlflowException, requests.HTTPError), match="Permission denied|PERMISSION_DENIED|403"):
            download_verified(mv, tmp_path / "model-only")  # the artifact proxy answers 403
    with identity("admin", ADMIN["admin_password"]):
        grants.grant_user_permission("tgi-reader", "experiment", experiment, "READ")
    with identity("tgi-reader", "tgi-reader-password-1"):
        verified = download_verified(model_version(name, version.version), tmp_path / "with-experiment")
        assert (verified.path / "config.json").is_file() and verified.bytes_checked > 0
