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
        self.env = pytest.MonkeyPatch()
        for key, value in self.values.items():
            self.env.delenv(key, raising=False) if value is None else self.env.setenv(key, value)

    def __exit__(self, *exc):
        self.env.undo()


def refused(call) -> None:
    """The real server answers 403 (PERMISSION_DENIED) to this login's call."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as err:
        call()
    # a copy's failure comes back wrapped (INTERNAL_ERROR) with the server's answer in its message
    assert err.value.error_code == "PERMISSION_DENIED" or "error code 403" in str(err.value), err.value


def test_the_pipeline_registers_candidates_and_only_a_promoter_puts_one_in_production(
    auth_server, monkeypatch, tmp_path
):
    """The grants infra/k8s/README.md gives, on the real basic-auth server: the pipeline owns its candidates model
    and may only read production; a promoter copies a candidate in (`llmops promote`, recording the login the
    server saw); the deployer reads and tags; an anonymous or wrong login is turned away."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client
    from typer.testing import CliRunner

    from components.registry_tags import candidates_of
    from llmops.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)
    production = f"secured-{uuid.uuid4().hex[:6]}"
    candidates = candidates_of(production)
    (tmp_path / "config.json").write_text("{}")
    with identity("admin", ADMIN["admin_password"]):  # the admin creates the production model, then the grants
        MlflowClient().create_registered_model(production)
        grants = get_app_client("basic-auth", tracking_uri=auth_server.url)
        grants.grant_user_permission("pipeline", "registered_model", production, "READ")  # the gate reads champion
        grants.grant_user_permission("promoter", "registered_model", production, "EDIT")
        grants.grant_user_permission("deployer", "registered_model", production, "EDIT")
    with identity("pipeline", USERS["pipeline"]):  # registers a candidate, and sets challenger on it
        pipeline = MlflowClient()
        pipeline.create_registered_model(candidates)
        mlflow.set_experiment(f"auth-{production}")
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(tmp_path / "config.json"), "model")
        source = f"{run.info.artifact_uri}/model"
        pipeline.create_model_version(candidates, source, run.info.run_id, tags={"gate.verdict": "passed"})
        pipeline.set_registered_model_alias(candidates, "challenger", "1")
        assert pipeline.get_registered_model(production).name == production
        refused(lambda: pipeline.create_model_version(production, source, run.info.run_id))
        refused(lambda: pipeline.copy_model_version(f"models:/{candidates}/1", production))
        with pytest.raises(MlflowException):
            pipeline.create_webhook(
                name="not-the-pipelines", url="http://127.0.0.1:9/x", events=["model_version_alias.created"]
            )
    with identity("admin", ADMIN["admin_password"]):
        grants.grant_user_permission("promoter", "registered_model", candidates, "READ")

    with identity("promoter", USERS["promoter"]):
        promoted = CliRunner().invoke(app, ["promote", candidates, "1", "--reason", "passed review", "--no-wait"])
        assert promoted.exit_code == 0, promoted.output
    with identity("pipeline", USERS["pipeline"]):  # production holds a version now: every write of it is refused
        grants_as_pipeline = get_app_client("basic-auth", tracking_uri=auth_server.url)
        refused(lambda: pipeline.set_registered_model_alias(production, "champion", "1"))
        refused(lambda: pipeline.delete_registered_model_alias(production, "champion"))
        refused(lambda: pipeline.set_model_version_tag(production, "1", "gate.override", "mine now"))
        refused(lambda: pipeline.delete_model_version(production, "1"))
        refused(lambda: pipeline.delete_registered_model(production))
        refused(lambda: grants_as_pipeline.grant_user_permission("pipeline", "registered_model", production, "MANAGE"))
        assert pipeline.get_model_version_by_alias(production, "champion").version == "1"  # it may still read

    alias = {"name": production, "alias": "champion", "version": "1"}
    anonymous = requests.post(f"{auth_server.url}/api/2.0/mlflow/registered-models/alias", json=alias, timeout=10)
    assert anonymous.status_code == 401
    wrong = requests.post(
        f"{auth_server.url}/api/2.0/mlflow/registered-models/alias", json=alias, timeout=10, auth=("promoter", "no")
    )
    assert wrong.status_code == 401
    with identity("deployer", USERS["deployer"]):
        deployer = MlflowClient()
        copy = deployer.get_model_version_by_alias(production, "champion")
        deployer.set_model_version_tag(production, "1", "deploy.status", "deployed")
    assert copy.tags["promotion.by"] == "promoter" and copy.tags["promotion.reason"] == "passed review"
    assert copy.tags["promotion.from"] == f"{candidates}/1" and copy.source == f"models:/{candidates}/1"


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
    """The init container's `tgi-reader` login, granted as infra/k8s/README.md says: READ on the production model
    alone does not let MLflow 3.17.2 hand out a promoted copy's files (it checks downloads against the logged
    model's experiment); with READ on that experiment too, the verified download succeeds, with no grant on
    the candidates model the copy came from."""
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
        # what serves is a promoted copy: its files stay the candidate's, and the reader gets no grant on those
        candidate = register_served(f"{name}-candidates", tiny_base, experiment=f"served-{name}")
        version = MlflowClient().copy_model_version(f"models:/{candidate.name}/{candidate.version}", name)
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
