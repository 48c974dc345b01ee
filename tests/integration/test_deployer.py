"""The deployer end to end: a real MLflow server sends signed webhooks; Kubernetes is the loopback stand-in."""

import json
import threading
import time
import uuid

import pytest
import requests

from serving import manifests
from serving.backends import KubeBackend
from serving.deployer import Deployer
from serving.deployer_app import WEBHOOK_NAME, create_app, register_webhook
from serving.manifests import ANN_VERSION, object_name
from serving.settings import DeploySection
from serving.webhooks import Verifier, sign
from tests.conftest import Live, wait_for
from tests.integration.kube_fake import FakeKube

pytestmark = pytest.mark.integration
SECRET = "test-webhook-secret"
QUANTIZE = {"1": "bitsandbytes-nf4", "2": "bitsandbytes", "3": "none"}
# What an operator sets: the defaults' placeholder digests are refused (test_placeholder_digests_are_refused...)
PINNED = {
    "tgi_image": "ghcr.io/huggingface/text-generation-inference:3.3.4@sha256:" + "ab" * 32,
    "fetch_image": "ghcr.io/llmops/llmops-cpu:0.1.0@sha256:" + "cd" * 32,
}


@pytest.fixture(scope="module")
def model_name(mlflow_server, tiny_base):
    """A registered model with three versions of the tiny model, each recommending another quantization."""
    from mlflow import MlflowClient

    from tests.conftest import register_served

    name = f"deploy-{uuid.uuid4().hex[:6]}"
    try:
        for version in ("1", "2", "3"):
            register_served(
                name,
                tiny_base,
                {"recommended_quantize": QUANTIZE[version], "gate.verdict": "passed"},
                experiment="deployer-tests",
            )
        yield name
    finally:
        # The session's registry outlives this module: leave no champion for other tests' deployers to serve,
        # and no webhook pointing at a deployer that is gone.
        client = MlflowClient()
        if client.search_registered_models(f"name = '{name}'"):
            client.delete_registered_model(name)
        for hook in client.list_webhooks():
            if hook.name == WEBHOOK_NAME:
                client.delete_webhook(hook.webhook_id)


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
                if (
                    plural == "deployments"
                    and ns == self.namespace
                    and status.get("observedGeneration") != obj["metadata"]["generation"]
                ):
                    version = obj["spec"]["template"]["metadata"]["annotations"].get(ANN_VERSION)
                    (self.kube.fail_rollout if version in self.fail else self.kube.complete_rollout)(ns, name)
            self.stop.wait(0.05)  # a polling pause that ends at once when the test is done

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


class Deliveries(Verifier):
    """The deployer's verifier, which also keeps every delivery it accepts: tests wait on what arrived."""

    def __post_init__(self):
        super().__post_init__()
        self.accepted: list[dict] = []

    def verify(self, headers, body: bytes, now: float | None = None) -> str:
        delivery = super().verify(headers, body, now)
        self.accepted.append(json.loads(body))
        return delivery

    def arrived(self, name: str, alias: str, version: str) -> bool:
        return {"name": name, "alias": alias, "version": version} in [d.get("data") for d in self.accepted]


def deployer_live(kube, interval_s=60.0, verifier=None):
    cfg = DeploySection(namespace="ns1", rollout_timeout_s=5, **PINNED)
    deployer = Deployer(KubeBackend(cfg, api_client=kube.api_client(), poll_s=0.05), interval_s=interval_s)
    return Live(create_app(deployer, verifier or Verifier(SECRET))), deployer


def record_wakeups(deployer) -> list:
    """Every deployer.notify() from now on (how the webhook route wakes the reconcile loop), in the list returned."""
    calls, notify = [], deployer.notify

    def recording():
        calls.append(time.monotonic())
        notify()

    deployer.notify = recording
    return calls


def finished_pass_after(deployer, passes: int, what: str) -> None:
    """Wait until a reconcile pass numbered above `passes` has started, then until it has finished."""
    wait_for(lambda: deployer.passes > passes, what=what)
    with deployer.lock:  # a pass holds the lock from its count to its last write
        pass


def mine(actions: list[str], name: str) -> list[str]:
    """The reconcile actions about one model (the session's registry holds other tests' models too)."""
    return [a for a in actions if a.split(" ", 1)[1].rsplit("/", 1)[0] == name]


def deployed_version(kube, name):
    obj = kube.get("deployments", "ns1", object_name(name))
    return obj and obj["metadata"]["annotations"].get(ANN_VERSION), obj


def test_alias_webhook_deploys_then_reconcile_heals_a_missed_event(model_name):
    from mlflow import MlflowClient

    client = MlflowClient()
    with FakeKube() as kube, AutoController(kube, "ns1"):
        live, deployer = deployer_live(kube)
        with live:
            register_webhook(live.url, SECRET)
            wait_for(lambda: deployer.passes >= 1, what="the start-up pass")
            client.set_registered_model_alias(model_name, "champion", "1")
            wait_for(
                lambda: deployed_version(kube, model_name)[0] == "1",  # no timer: the interval is 60 s
                what="version 1 to be deployed",
            )
            args = deployed_version(kube, model_name)[1]["spec"]["template"]["spec"]["containers"][0]["args"]
            assert args[args.index("--quantize") + 1] == "bitsandbytes-nf4"
            wait_for(
                lambda: client.get_model_version(model_name, "1").tags.get("deploy.status") == "deployed",
                what="deploy.status=deployed on version 1",
            )
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
            wait_for(lambda: deployed_version(kube, model_name)[0] == "2", what="the missed promotion to be healed")
            print(f"reconcile noticed the missed event after {time.monotonic() - started:.2f}s")
        hooks = [h for h in client.list_webhooks() if h.name == WEBHOOK_NAME]
        assert len(hooks) == 1  # registered again on start, never twice
        args = deployed_version(kube, model_name)[1]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--quantize") + 1] == "bitsandbytes"


def test_forged_and_replayed_webhooks_change_nothing(model_name):
    with FakeKube() as kube, AutoController(kube, "ns1"):
        live, deployer = deployer_live(kube)
        woken = record_wakeups(deployer)
        with live:
            wait_for(lambda: deployer.passes >= 1, what="the start-up pass")
            body = json.dumps(
                {
                    "entity": "model_version_alias",
                    "action": "created",
                    "data": {"name": model_name, "alias": "champion", "version": "3"},
                }
            ).encode()
            ts = str(int(time.time()))
            forged = {
                "X-MLflow-Delivery-Id": "x1",
                "X-MLflow-Timestamp": ts,
                "X-MLflow-Signature": sign("guess", "x1", ts, body),
            }
            # The route answers after it has handled the request, so each answer below is a finished handling.
            assert requests.post(f"{live.url}/webhook", data=body, headers=forged, timeout=10).status_code == 401
            assert woken == []  # refused before it could wake the reconcile loop
            genuine = {
                "X-MLflow-Delivery-Id": "x2",
                "X-MLflow-Timestamp": ts,
                "X-MLflow-Signature": sign(SECRET, "x2", ts, body),
            }
            before = deployer.passes
            assert requests.post(f"{live.url}/webhook", data=body, headers=genuine, timeout=10).status_code == 200
            assert len(woken) == 1
            finished_pass_after(deployer, before, "the pass the genuine delivery woke")
            passes, writes = deployer.passes, len(kube.writes())
            assert requests.post(f"{live.url}/webhook", data=body, headers=genuine, timeout=10).status_code == 409
            assert len(woken) == 1  # the replay woke nothing; with a 60 s interval, nothing else starts a pass
            assert deployer.passes == passes and len(kube.writes()) == writes
            # No sleep to see that nothing happens: prove the loop is idle past the replay instead. One wake-up
            # of our own runs exactly one more pass, and that pass, over converged state, writes nothing.
            deployer.notify()
            finished_pass_after(deployer, passes, "the pass our own wake-up asked for")
            assert deployer.passes == passes + 1 and len(kube.writes()) == writes


def test_oversized_and_malformed_webhook_bodies_are_refused_before_they_are_acted_on():
    from serving.deployer_app import WEBHOOK_MAX_BYTES

    with FakeKube() as kube:
        live, deployer = deployer_live(kube)
        woken = record_wakeups(deployer)
        with live:
            ts = str(int(time.time()))
            for n, (body, status) in enumerate(
                [(b"x" * (WEBHOOK_MAX_BYTES + 1), 413), (b"not json", 400), (b"[1, 2]", 400), (b'{"data": 7}', 400)]
            ):
                signed = {
                    "X-MLflow-Delivery-Id": f"m{n}",
                    "X-MLflow-Timestamp": ts,
                    "X-MLflow-Signature": sign(SECRET, f"m{n}", ts, body),
                }
                answer = requests.post(f"{live.url}/webhook", data=body, headers=signed, timeout=10)
                assert answer.status_code == status, answer.text
                # and streamed without a length, the oversized body is counted as it arrives
            chunks = (b"x" * 4096 for _ in range(WEBHOOK_MAX_BYTES // 4096 + 2))
            assert requests.post(f"{live.url}/webhook", data=chunks, timeout=10).status_code == 413
            assert woken == []  # (the shutdown wakes the loop to end it, so this is checked before)


def test_two_quick_promotions_end_with_the_last(model_name):
    from mlflow import MlflowClient

    client = MlflowClient()
    deliveries = Deliveries(SECRET)
    with FakeKube() as kube, AutoController(kube, "ns1"):
        live, deployer = deployer_live(kube, interval_s=2.0, verifier=deliveries)
        with live:
            register_webhook(live.url, SECRET)
            # MLflow sends each event to the webhook list it cached up to 2 s ago (MLFLOW_WEBHOOK_CACHE_TTL, set by
            # pipelines/mlflow_local.py). Move an alias the deployer ignores until a delivery of it arrives here:
            # from then on every delivery comes here, so the promotions' deliveries can be waited for.
            moved = []

            def delivered_here():
                if deliveries.arrived(model_name, "warmup", "2"):
                    return True
                if not moved or time.monotonic() - moved[-1] > 1.0:  # the last one may have gone to a stale URL
                    moved.append(time.monotonic())
                    client.set_registered_model_alias(model_name, "warmup", "2")
                return False

            try:
                wait_for(delivered_here, timeout=60, what="a webhook delivery to this deployer")
                client.set_registered_model_alias(model_name, "champion", "1")
                client.set_registered_model_alias(model_name, "champion", "3")
                wait_for(lambda: deployed_version(kube, model_name)[0] == "3", what="version 3 to be deployed")
                # Instead of sleeping while stragglers might arrive: both promotions' deliveries have been handled,
                # and a pass that began after them (a webhook's or the 2 s timer's) has finished.
                wait_for(
                    lambda: (
                        deliveries.arrived(model_name, "champion", "1")
                        and deliveries.arrived(model_name, "champion", "3")
                    ),
                    what="both promotions' webhooks",
                )
                finished_pass_after(deployer, deployer.passes, "a reconcile pass after both webhooks")
                assert deployed_version(kube, model_name)[0] == "3"
                args = deployed_version(kube, model_name)[1]["spec"]["template"]["spec"]["containers"][0]["args"]
                assert "--quantize" not in args  # version 3 recommends serving the 16-bit model as is
            finally:
                if moved:
                    client.delete_registered_model_alias(model_name, "warmup")


def test_a_version_that_never_gets_ready_leaves_the_previous_serving(model_name):
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_registered_model_alias(model_name, "champion", "1")
    try:
        with FakeKube() as kube, AutoController(kube, "ns1", fail_versions={"2"}):
            live, deployer = deployer_live(kube)
            with live:
                wait_for(lambda: deployed_version(kube, model_name)[0] == "1", what="version 1 to be deployed")
                client.set_registered_model_alias(model_name, "champion", "2")
                deployer.notify()
                wait_for(
                    lambda: client.get_model_version(model_name, "2").tags.get("deploy.status") == "failed",
                    60,
                    what="deploy.status=failed on version 2",
                )
                assert deployed_version(kube, model_name)[0] == "1"
                writes = len(kube.writes())
                deployer.reconcile_once()
                assert len(kube.writes()) == writes  # a failed version is not retried in a loop
    finally:  # the next tests deploy version 2 again
        client.delete_model_version_tag(model_name, "2", "deploy.status")


def test_a_version_whose_gate_failed_is_refused_until_a_person_overrides_it(model_name):
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_registered_model_alias(model_name, "champion", "1")
    client.set_model_version_tag(model_name, "2", "gate.verdict", "failed")
    client.set_model_version_tag(model_name, "2", "gate.reason", "exact_match gain over base -0.2000 < +0.0100")
    try:
        with FakeKube() as kube, AutoController(kube, "ns1"):
            deployer = Deployer(
                KubeBackend(DeploySection(namespace="ns1", **PINNED), api_client=kube.api_client(), poll_s=0.05),
                interval_s=60.0,
            )
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


def kube_deployer(kube, name: str, rollout_timeout_s: float = 5) -> Deployer:
    cfg = DeploySection(namespace="ns1", rollout_timeout_s=rollout_timeout_s, **PINNED)
    return Deployer(KubeBackend(cfg, api_client=kube.api_client(), poll_s=0.05), interval_s=60.0, models=[name])


def clear_deploy_tags(client, name: str, version: str) -> None:
    for tag in ("deploy.status", "deploy.reason", "deploy.endpoint"):
        client.delete_model_version_tag(name, version, tag)


@pytest.mark.parametrize("rollout", ["became ready", "never became ready"])
def test_a_deployer_restarted_mid_rollout_finishes_it_or_rolls_it_back(model_name, rollout):
    """The deployer died after applying version 2 and tagging it `deploying`; its successor's first pass
    finds the Deployment naming version 2 and settles it, so `deploy.status` never stays `deploying`."""
    from mlflow import MlflowClient

    from serving import kube as kube_api

    client = MlflowClient()
    client.set_registered_model_alias(model_name, "champion", "1")
    fails = {"2"} if rollout == "never became ready" else set()
    try:
        with FakeKube() as kube, AutoController(kube, "ns1", fail_versions=fails):
            assert mine(kube_deployer(kube, model_name).reconcile_once(), model_name) == [f"deployed {model_name}/1"]
            # what the first deployer did for version 2 before it was killed
            client.set_registered_model_alias(model_name, "champion", "2")
            client.set_model_version_tag(model_name, "2", "deploy.status", "deploying")
            v2 = client.get_model_version(model_name, "2")
            cfg = DeploySection(namespace="ns1", **PINNED)
            objects = manifests.render(cfg, name=model_name, version="2", run_id=v2.run_id, tags=dict(v2.tags))
            kube_api.apply(objects, "ns1", api_client=kube.api_client())

            actions = mine(kube_deployer(kube, model_name).reconcile_once(), model_name)
            tags = client.get_model_version(model_name, "2").tags
            if rollout == "became ready":
                assert actions == [f"deployed {model_name}/2"] and tags["deploy.status"] == "deployed"
                assert deployed_version(kube, model_name)[0] == "2"
            else:
                assert actions == [f"failed {model_name}/2"] and tags["deploy.status"] == "failed"
                assert "rolled back" in tags["deploy.reason"] and deployed_version(kube, model_name)[0] == "1"
    finally:
        clear_deploy_tags(client, model_name, "2")


@pytest.mark.parametrize("code", [401, 403])
def test_an_api_refusal_during_a_rollout_fails_the_version_with_the_reason_and_keeps_the_previous(
    model_name, monkeypatch, code
):
    from mlflow import MlflowClient

    from serving import kube_client

    monkeypatch.setattr(kube_client, "BACKOFF_S", 0.01)
    client = MlflowClient()
    client.set_registered_model_alias(model_name, "champion", "1")
    try:
        with FakeKube() as kube, AutoController(kube, "ns1"):
            deployer = kube_deployer(kube, model_name)
            deployer.reconcile_once()
            client.set_registered_model_alias(model_name, "champion", "2")
            names_v2 = lambda fake: deployed_version(fake, model_name)[0] == "2"  # noqa: E731
            kube.fail("GET", code, times=1, path=f"/deployments/{object_name(model_name)}", when=names_v2)
            assert mine(deployer.reconcile_once(), model_name) == [f"failed {model_name}/2"]
            tags = client.get_model_version(model_name, "2").tags
            assert tags["deploy.status"] == "failed" and f"answered {code} " in tags["deploy.reason"]
            assert "rolled back to the previous version" in tags["deploy.reason"]
            assert deployed_version(kube, model_name)[0] == "1"
    finally:
        clear_deploy_tags(client, model_name, "2")


def test_placeholder_digests_are_refused_before_anything_is_applied(model_name):
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_registered_model_alias(model_name, "champion", "1")
    try:
        with FakeKube() as kube:
            backend = KubeBackend(DeploySection(namespace="ns1"), api_client=kube.api_client(), poll_s=0.05)
            deployer = Deployer(backend, interval_s=60.0, models=[model_name])
            assert deployer.reconcile_once() == [f"failed {model_name}/1"]
            reason = client.get_model_version(model_name, "1").tags["deploy.reason"]
            assert "deploy.tgi_image and deploy.fetch_image still carry the placeholder digest" in reason
            assert kube.writes() == []
    finally:
        clear_deploy_tags(client, model_name, "1")


def test_reconcile_sees_models_past_the_first_page(mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient()
    tag = uuid.uuid4().hex[:6]
    made = [f"paged-{tag}-{i}" for i in range(4)] + [f"zz-paged-{tag}"]  # the last sorts after every other model
    for name in made:
        client.create_registered_model(name)
    try:
        everything = {m.name for m in client.search_registered_models(max_results=1000)}
        deployer = Deployer(backend=None, client=client)
        deployer.page_size = 2  # the registry's own pages, made small: the fix is the same at 100
        assert {m.name for m in deployer.registered()} == everything and set(made) <= everything
    finally:
        for name in made:
            client.delete_registered_model(name)


def test_drifted_tags_are_restored_and_a_removed_alias_or_model_scales_to_zero(mlflow_server, tiny_base):
    from mlflow import MlflowClient

    from tests.conftest import register_served

    client = MlflowClient()
    name = f"retire-{uuid.uuid4().hex[:6]}"
    register_served(name, tiny_base, {"gate.verdict": "passed"}, experiment="deployer-tests")
    client.set_registered_model_alias(name, "champion", "1")
    try:
        with FakeKube() as kube, AutoController(kube, "ns1"):
            deployer = kube_deployer(kube, name)
            assert deployer.reconcile_once() == [f"deployed {name}/1"]
            endpoint = client.get_model_version(name, "1").tags["deploy.endpoint"]
            writes = len(kube.writes())
            client.set_model_version_tag(name, "1", "deploy.status", "failed")  # a person's slip, or a crash
            assert deployer.reconcile_once() == [f"deployed {name}/1"]  # the cluster says its rollout is done
            assert len(kube.writes()) == writes  # settled by reading the Deployment, not by deploying again
            client.delete_model_version_tag(name, "1", "deploy.endpoint")
            assert deployer.reconcile_once() == [f"retagged {name}/1"]
            tags = client.get_model_version(name, "1").tags
            assert tags["deploy.status"] == "deployed" and tags["deploy.endpoint"] == endpoint
            assert deployer.reconcile_once() == []  # converged

            client.delete_registered_model_alias(name, "champion")
            assert deployer.reconcile_once() == []  # one answer without the alias takes nothing down
            assert deployed_version(kube, name)[1]["spec"]["replicas"] == 1
            assert deployer.reconcile_once() == [f"retired {name}"]  # gone two passes in a row
            dep = deployed_version(kube, name)[1]
            assert (
                dep["spec"]["replicas"] == 0
                and "no longer names a version" in dep["metadata"]["annotations"]["llmops.io/retired"]
            )
            assert client.get_model_version(name, "1").tags["deploy.status"] == "retired"
            assert deployer.reconcile_once() == []  # retired once

            client.set_registered_model_alias(name, "champion", "1")  # promoted again: it serves again
            assert deployer.reconcile_once() == [f"deployed {name}/1"]
            assert deployed_version(kube, name)[1]["spec"]["replicas"] == 1

            client.delete_registered_model(name)  # the model itself goes: nothing left to tag, still scaled down
            assert deployer.reconcile_once() == []
            assert deployer.reconcile_once() == [f"retired {name}"]
            assert deployed_version(kube, name)[1]["spec"]["replicas"] == 0
    finally:
        if client.search_registered_models(f"name = '{name}'"):
            client.delete_registered_model(name)


def serving_processes(model_uri: str) -> list[int]:
    """Pids of live `llmops serve <model_uri>` processes (read from /proc)."""
    from pathlib import Path

    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # gone while we looked
            continue
        if b"serve" in args and model_uri.encode() in args:
            found.append(int(cmdline.parent.name))
    return found


def test_a_local_deployer_stopped_with_sigterm_stops_the_servers_it_started(mlflow_server, tiny_base, tmp_path):
    """`llmops deployer &` then `kill %1`, as a user stops it: the model server it started goes with it."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    from tests.conftest import free_port, register_served

    name = f"sigterm-{uuid.uuid4().hex[:6]}"
    version = register_served(name, tiny_base, {"gate.verdict": "passed"}).version
    client = MlflowClient()
    env = {**os.environ, "LLMOPS_WEBHOOK_SECRET": SECRET, "LLMOPS_SERVING_DIR": str(tmp_path / "records")}
    llmops = str(Path(sys.executable).with_name("llmops"))
    args = [
        "deployer",
        "--mode",
        "local",
        "--port",
        str(free_port()),
        "--interval",
        "1",
        f"deploy.models=[{name}]",
        "deploy.engine=tgi",
    ]
    log = (tmp_path / "deployer.log").open("w")
    deployer = subprocess.Popen([llmops, *args], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client.set_registered_model_alias(name, "champion", version)
        wait_for(
            lambda: client.get_model_version(name, version).tags.get("deploy.status") in ("deployed", "failed"),
            timeout=180,
            what="the local server to be deployed",
        )
        tags = client.get_model_version(name, version).tags
        assert tags["deploy.status"] == "deployed", (tags, (tmp_path / "deployer.log").read_text()[-3000:])
        endpoint = tags["deploy.endpoint"]
        assert requests.get(f"{endpoint}/health", timeout=5).status_code == 200
        assert serving_processes(f"models:/{name}/{version}")

        deployer.send_signal(signal.SIGTERM)  # to the deployer alone, not its process group
        deployer.wait(timeout=90)
        assert serving_processes(f"models:/{name}/{version}") == []
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{endpoint}/health", timeout=5)
    finally:
        if deployer.poll() is None:
            deployer.kill()
        for pid in serving_processes(f"models:/{name}/{version}"):
            os.kill(pid, signal.SIGKILL)
        client.delete_registered_model(name)


VLLM_PINNED = {**PINNED, "vllm_image": "vllm/vllm-openai:v0.32.0@sha256:" + "ef" * 32}


def test_a_quantization_the_engine_cannot_honour_is_refused_on_the_version(model_name):
    """vLLM as the profile's engine: a 16-bit version rolls out as a vLLM Deployment; the int8 version is refused
    with the reason and nothing is applied; its deploy.engine=tgi tag serves it with TGI in the same Deployment;
    a vLLM version that never gets ready is rolled back to what served."""
    from mlflow import MlflowClient

    client = MlflowClient()
    cfg = DeploySection(namespace="ns1", rollout_timeout_s=3, engine="vllm", **VLLM_PINNED)
    try:
        with FakeKube() as kube, AutoController(kube, "ns1", fail_versions={"1"}):
            deployer = Deployer(KubeBackend(cfg, api_client=kube.api_client(), poll_s=0.05), models=[model_name])
            client.set_registered_model_alias(model_name, "champion", "3")  # recommended_quantize none
            assert deployer.reconcile_once() == [f"deployed {model_name}/3"]
            container = deployed_version(kube, model_name)[1]["spec"]["template"]["spec"]["containers"][0]
            assert container["name"] == "vllm" and container["image"] == VLLM_PINNED["vllm_image"]
            assert client.get_model_version(model_name, "3").tags["deploy.served_engine"] == "vllm"

            client.set_registered_model_alias(model_name, "champion", "2")  # bitsandbytes (LLM.int8)
            writes = len(kube.writes())
            assert deployer.reconcile_once() == [f"refused {model_name}/2"]
            tags = client.get_model_version(model_name, "2").tags
            assert tags["deploy.status"] == "refused" and "no bitsandbytes" in tags["deploy.reason"]
            assert len(kube.writes()) == writes and deployed_version(kube, model_name)[0] == "3"

            client.set_model_version_tag(model_name, "2", "deploy.engine", "tgi")  # a person picks TGI for it
            assert deployer.reconcile_once() == [f"deployed {model_name}/2"]
            version, obj = deployed_version(kube, model_name)
            container = obj["spec"]["template"]["spec"]["containers"][0]
            assert version == "2" and container["name"] == "tgi" and "bitsandbytes" in container["args"]

            client.set_registered_model_alias(model_name, "champion", "1")  # NF4: refused by vLLM 0.32 too
            assert deployer.reconcile_once() == [f"refused {model_name}/1"]
            client.set_model_version_tag(model_name, "1", "recommended_quantize", "none")  # served 16-bit instead
            assert deployer.reconcile_once() == [f"failed {model_name}/1"]  # and it never gets ready here
            assert deployed_version(kube, model_name)[0] == "2"  # rolled back: TGI's version 2 serves on
    finally:
        for version in ("1", "2", "3"):
            clear_deploy_tags(client, model_name, version)
        client.delete_model_version_tag(model_name, "2", "deploy.engine")
        client.set_model_version_tag(model_name, "1", "recommended_quantize", QUANTIZE["1"])


def test_promote_waits_for_the_outcome_and_prints_the_endpoint_or_the_reason(model_name):
    """`llmops promote` returns when the deployer has settled the version: the endpoint, or the refusal's reason
    with exit code 1; a version that failed before is tried again by promoting it."""
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from serving.cli import app

    client = MlflowClient()
    cfg = DeploySection(namespace="ns1", rollout_timeout_s=5, **PINNED)
    runner = CliRunner()
    client.set_model_version_tag(model_name, "1", "deploy.status", "failed")  # an outcome from an earlier try
    client.set_model_version_tag(model_name, "1", "deploy.backend", "kubernetes")
    try:
        with FakeKube() as kube, AutoController(kube, "ns1"):
            deployer = Deployer(
                KubeBackend(cfg, api_client=kube.api_client(), poll_s=0.05), interval_s=0.2, models=[model_name]
            )
            stop = threading.Event()
            loop = threading.Thread(target=deployer.run, args=(stop,), daemon=True)
            loop.start()
            try:
                done = runner.invoke(app, ["promote", model_name, "1", "--timeout", "60"])
                assert done.exit_code == 0, done.output
                assert f"{model_name}/1 serves at http://{object_name(model_name)}.ns1.svc" in done.output
                assert deployed_version(kube, model_name)[0] == "1"  # failed before, deployed now

                done = runner.invoke(app, ["promote", model_name, "3", "--timeout", "60"])
                assert done.exit_code == 0 and f"{model_name}/3 serves at" in done.output
                # the version replaced says so: an alias moved back to it finds no endpoint until it serves again
                assert client.get_model_version(model_name, "1").tags["deploy.status"] == "superseded"
                statuses = []  # promoting what serves clears nothing: applications are never turned away
                watch = threading.Thread(
                    target=lambda: statuses.extend(
                        client.get_model_version(model_name, "3").tags.get("deploy.status") for _ in range(5)
                    )
                )
                watch.start()
                assert runner.invoke(app, ["promote", model_name, "3", "--timeout", "60"]).exit_code == 0
                watch.join()
                assert set(statuses) == {"deployed"}

                client.set_model_version_tag(model_name, "2", "gate.verdict", "failed")
                done = runner.invoke(app, ["promote", model_name, "2", "--timeout", "60"])
                assert done.exit_code == 1 and f"{model_name}/2 refused: gate.verdict is failed" in done.output

                done = runner.invoke(app, ["promote", model_name, "1", "--no-wait"])
                assert done.exit_code == 0 and "waiting" not in done.output
            finally:
                stop.set()
                deployer.notify()
                loop.join(timeout=30)
    finally:
        client.set_model_version_tag(model_name, "2", "gate.verdict", "passed")
        for version in ("1", "2", "3"):
            clear_deploy_tags(client, model_name, version)
        client.delete_model_version_tag(model_name, "1", "deploy.backend")


def test_a_manifest_tag_changed_after_registration_is_refused(model_name):
    """Whoever can write the store and the tags swaps the weights, a manifest that matches them and the version's
    tag, then moves champion away and back so the deployer renders again: the tag no longer matches the digest
    the registration run recorded (a run's params never change), so nothing is deployed."""
    from mlflow import MlflowClient

    from components.registry_tags import MANIFEST_TAG

    client = MlflowClient()
    original = client.get_model_version(model_name, "3").tags[MANIFEST_TAG]
    client.set_registered_model_alias(model_name, "champion", "3")
    try:
        with FakeKube() as kube, AutoController(kube, "ns1"):
            deployer = kube_deployer(kube, model_name)
            client.set_model_version_tag(model_name, "3", MANIFEST_TAG, "ab" * 32)
            assert deployer.reconcile_once() == [f"refused {model_name}/3"]
            reason = client.get_model_version(model_name, "3").tags["deploy.reason"]
            assert f"its registration run recorded weights.manifest_sha256={original}" in reason and kube.writes() == []
            client.set_model_version_tag(model_name, "3", MANIFEST_TAG, original)
            client.delete_model_version_tag(model_name, "3", "deploy.status")
            assert deployer.reconcile_once() == [f"deployed {model_name}/3"]
    finally:
        client.set_model_version_tag(model_name, "3", MANIFEST_TAG, original)
        clear_deploy_tags(client, model_name, "3")
