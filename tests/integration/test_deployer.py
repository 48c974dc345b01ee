"""The deployer end to end: a real MLflow server sends signed webhooks; Kubernetes is the loopback stand-in."""

import threading
import time
import uuid

import pytest
import requests

from components.config import DeploySection
from serving.deployer import Deployer, KubeBackend
from serving.deployer_app import WEBHOOK_NAME, create_app, register_webhook
from serving.manifests import ANN_VERSION, object_name
from serving.webhooks import Verifier, sign
from tests.conftest import Live
from tests.integration.kube_fake import FakeKube

pytestmark = pytest.mark.integration
SECRET = "test-webhook-secret"
QUANTIZE = {"1": "bitsandbytes-nf4", "2": "bitsandbytes", "3": "none"}


@pytest.fixture(scope="module")
def model_name(mlflow_server, tiny_base):
    """A registered model with three versions of the tiny model, each recommending another quantization."""
    from tests.conftest import register_served

    name = f"deploy-{uuid.uuid4().hex[:6]}"
    for version in ("1", "2", "3"):
        register_served(name, tiny_base, {"recommended_quantize": QUANTIZE[version], "gate.verdict": "passed"},
                        experiment="deployer-tests")
    return name


class AutoController:
    """Plays the Deployment controller: completes every rollout, except for versions told to fail."""

    def __init__(self, kube: FakeKube, namespace: str, fail_versions=()):
        self.kube, self.namespace, self.fail = kube, namespace, set(fail_versions)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            for (plural, ns, name), obj in list(self.kube.objects.items()):
                status = obj.get("status") or {}
                if plural == "deployments" and ns == self.namespace and status.get("observedGeneration") != obj["metadata"]["generation"]:
                    version = obj["spec"]["template"]["metadata"]["annotations"].get(ANN_VERSION)
                    (self.kube.fail_rollout if version in self.fail else self.kube.complete_rollout)(ns, name)
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


def deployer_live(kube, interval_s=60.0):
    cfg = DeploySection(namespace="ns1", rollout_timeout_s=5)
    deployer = Deployer(KubeBackend(cfg, api_client=kube.api_client(), poll_s=0.05), interval_s=interval_s)
    return Live(create_app(deployer, Verifier(SECRET))), deployer


def mine(actions: list[str], name: str) -> list[str]:
    """The reconcile actions about one model (the session's registry holds other tests' models too)."""
    return [a for a in actions if a.split(" ", 1)[1].rsplit("/", 1)[0] == name]


def deployed_version(kube, name):
    obj = kube.get("deployments", "ns1", object_name(name))
    return obj and obj["metadata"]["annotations"].get(ANN_VERSION), obj


def wait_for(predicate, timeout=120.0):  # generous: CI machines are shared
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_alias_webhook_deploys_then_reconcile_heals_a_missed_event(model_name):
    from mlflow import MlflowClient

    client = MlflowClient()
    with FakeKube() as kube, AutoController(kube, "ns1"):
        live, deployer = deployer_live(kube)
        with live:
            register_webhook(live.url, SECRET)
            wait_for(lambda: deployer.passes >= 1)
            client.set_registered_model_alias(model_name, "champion", "1")
            wait_for(lambda: deployed_version(kube, model_name)[0] == "1")  # no timer: the interval is 60 s
            args = deployed_version(kube, model_name)[1]["spec"]["template"]["spec"]["containers"][0]["args"]
            assert args[args.index("--quantize") + 1] == "bitsandbytes-nf4"
            wait_for(lambda: client.get_model_version(model_name, "1").tags.get("deploy.status") == "deployed")
            version = client.get_model_version(model_name, "1")
            assert version.tags["deploy.endpoint"].startswith("http://tgi-")
            writes = len(kube.writes())
            assert deployer.reconcile_once() == [] and len(kube.writes()) == writes  # converged: no repeated work

        client.set_registered_model_alias(model_name, "champion", "2")  # nobody is listening
        assert deployed_version(kube, model_name)[0] == "1"
        live, deployer = deployer_live(kube)
        with live:
            started = time.monotonic()
            register_webhook(live.url, SECRET)
            noticed = wait_for(lambda: deployed_version(kube, model_name)[0] == "2")
            print(f"reconcile noticed the missed event after {noticed - started:.2f}s")
        hooks = [h for h in client.list_webhooks() if h.name == WEBHOOK_NAME]
        assert len(hooks) == 1  # registered again on start, never twice
        args = deployed_version(kube, model_name)[1]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--quantize") + 1] == "bitsandbytes"


def test_forged_and_replayed_webhooks_change_nothing(model_name):
    import json

    with FakeKube() as kube, AutoController(kube, "ns1"):
        live, deployer = deployer_live(kube)
        with live:
            wait_for(lambda: deployer.passes >= 1)
            passes, writes = deployer.passes, len(kube.writes())
            body = json.dumps({"entity": "model_version_alias", "action": "created",
                               "data": {"name": model_name, "alias": "champion", "version": "3"}}).encode()
            ts = str(int(time.time()))
            forged = {"X-MLflow-Delivery-Id": "x1", "X-MLflow-Timestamp": ts, "X-MLflow-Signature": sign("guess", "x1", ts, body)}
            assert requests.post(f"{live.url}/webhook", data=body, headers=forged, timeout=10).status_code == 401
            genuine = {"X-MLflow-Delivery-Id": "x2", "X-MLflow-Timestamp": ts, "X-MLflow-Signature": sign(SECRET, "x2", ts, body)}
            assert requests.post(f"{live.url}/webhook", data=body, headers=genuine, timeout=10).status_code == 200
            wait_for(lambda: deployer.passes > passes)
            passes, writes = deployer.passes, len(kube.writes())
            assert requests.post(f"{live.url}/webhook", data=body, headers=genuine, timeout=10).status_code == 409
            time.sleep(0.5)
            assert deployer.passes == passes and len(kube.writes()) == writes


def test_two_quick_promotions_end_with_the_last(model_name):
    from mlflow import MlflowClient

    client = MlflowClient()
    with FakeKube() as kube, AutoController(kube, "ns1"):
        live, deployer = deployer_live(kube, interval_s=2.0)
        with live:
            register_webhook(live.url, SECRET)
            client.set_registered_model_alias(model_name, "champion", "1")
            client.set_registered_model_alias(model_name, "champion", "3")
            wait_for(lambda: deployed_version(kube, model_name)[0] == "3")
            time.sleep(3)  # let any straggling webhook and one timer pass run
            assert deployed_version(kube, model_name)[0] == "3"
            args = deployed_version(kube, model_name)[1]["spec"]["template"]["spec"]["containers"][0]["args"]
            assert "--quantize" not in args  # version 3 recommends serving the 16-bit model as is


def test_a_version_that_never_gets_ready_leaves_the_previous_serving(model_name):
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_registered_model_alias(model_name, "champion", "1")
    with FakeKube() as kube, AutoController(kube, "ns1", fail_versions={"2"}):
        live, deployer = deployer_live(kube)
        with live:
            wait_for(lambda: deployed_version(kube, model_name)[0] == "1")
            client.set_registered_model_alias(model_name, "champion", "2")
            deployer.notify()
            wait_for(lambda: client.get_model_version(model_name, "2").tags.get("deploy.status") == "failed", 60)
            assert deployed_version(kube, model_name)[0] == "1"
            writes = len(kube.writes())
            deployer.reconcile_once()
            assert len(kube.writes()) == writes  # a failed version is not retried in a loop
    client.delete_model_version_tag(model_name, "2", "deploy.status")


def test_a_version_whose_gate_failed_is_refused_until_a_person_overrides_it(model_name):
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_registered_model_alias(model_name, "champion", "1")
    client.set_model_version_tag(model_name, "2", "gate.verdict", "failed")
    client.set_model_version_tag(model_name, "2", "gate.reason", "exact_match gain over base -0.2000 < +0.0100")
    try:
        with FakeKube() as kube, AutoController(kube, "ns1"):
            deployer = Deployer(KubeBackend(DeploySection(namespace="ns1"), api_client=kube.api_client(), poll_s=0.05),
                                interval_s=60.0)
            deployer.reconcile_once()
            assert deployed_version(kube, model_name)[0] == "1"
            client.set_registered_model_alias(model_name, "champion", "2")
            writes = len(kube.writes())
            assert mine(deployer.reconcile_once(), model_name) == [f"refused {model_name}/2"]
            tags = client.get_model_version(model_name, "2").tags
            assert tags["deploy.status"] == "refused" and "gain over base -0.2000" in tags["deploy.reason"]
            assert len(kube.writes()) == writes and deployed_version(kube, model_name)[0] == "1"  # nothing changed
            assert mine(deployer.reconcile_once(), model_name) == []  # refused once, not on every pass

            client.set_model_version_tag(model_name, "2", "gate.override", "hotfix approved by on-call, INC-42")
            assert mine(deployer.reconcile_once(), model_name) == [f"deployed {model_name}/2"]
            tags = client.get_model_version(model_name, "2").tags
            assert deployed_version(kube, model_name)[0] == "2"
            assert tags["deploy.gate_override"] == "hotfix approved by on-call, INC-42"
    finally:
        for tag in ("gate.override", "deploy.status", "deploy.reason", "deploy.gate_override"):
            client.delete_model_version_tag(model_name, "2", tag)
        client.set_model_version_tag(model_name, "2", "gate.verdict", "passed")
