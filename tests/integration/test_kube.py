"""serving/kube.py through the official kubernetes client against a loopback stand-in for the API server."""

from __future__ import annotations

import threading

import pytest

from serving import kube, kube_client, manifests
from serving.settings import DeploySection
from tests.integration.kube_fake import FakeKube

pytestmark = pytest.mark.integration

NS = "llmops"
MODEL = "llmops-demo"
NAME = manifests.object_name(MODEL)
CFG = DeploySection(namespace=NS)
RUNS = {"1": "a" * 32, "2": "b" * 32, "3": "c" * 32}


@pytest.fixture
def kube_api():
    with FakeKube() as fake:
        api_client = fake.api_client()
        yield fake, api_client
        api_client.close()


def objects(version: str, quantize: str = "bitsandbytes-nf4", cfg: DeploySection = CFG) -> list[dict]:
    return manifests.render(
        cfg, name=MODEL, version=version, run_id=RUNS[version], tags={"recommended_quantize": quantize}
    )


def apply(api_client, version: str, **kw) -> dict[str, kube.Applied]:
    return {r.kind: r for r in kube.apply(objects(version, **kw), NS, api_client=api_client)}


def test_apply_creates_then_is_idempotent(kube_api):
    fake, api_client = kube_api
    first = apply(api_client, "1")
    assert {k: r.action for k, r in first.items()} == {"Service": "created", "Deployment": "created"}
    assert first["Deployment"].generation == 1 and first["Deployment"].version["version"] == "1"
    dep, svc = fake.get("deployments", NS, NAME), fake.get("services", NS, NAME)
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == CFG.tgi_image
    assert svc["spec"]["clusterIP"]
    writes, rvs = len(fake.writes()), (dep["metadata"]["resourceVersion"], svc["metadata"]["resourceVersion"])

    again = apply(api_client, "1")
    assert {r.action for r in again.values()} == {"unchanged"}
    assert again["Deployment"].generation == 1
    assert len(fake.writes()) == writes  # not even a no-op PUT
    after = (
        fake.get("deployments", NS, NAME)["metadata"]["resourceVersion"],
        fake.get("services", NS, NAME)["metadata"]["resourceVersion"],
    )
    assert after == rvs


def test_new_version_updates_the_same_deployment(kube_api):
    fake, api_client = kube_api
    apply(api_client, "1")
    svc_ip = fake.get("services", NS, NAME)["spec"]["clusterIP"]
    second = apply(api_client, "2", quantize="none")
    assert second["Deployment"].action == "updated" and second["Deployment"].generation == 2
    assert second["Service"].action == "unchanged"
    dep = fake.get("deployments", NS, NAME)
    assert dep["metadata"]["annotations"][manifests.ANN_VERSION] == "2"
    assert dep["spec"]["template"]["metadata"]["annotations"][manifests.ANN_RUN] == RUNS["2"]
    assert "--quantize" not in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert fake.get("services", NS, NAME)["spec"]["clusterIP"] == svc_ip
    assert kube.current_version(NAME, NS, api_client=api_client) == {
        "name": MODEL,
        "version": "2",
        "run_id": RUNS["2"],
        "generation": 2,
        "adapters": (),
    }


def test_update_keeps_annotations_other_tools_own(kube_api):
    from kubernetes import client

    fake, api_client = kube_api
    apply(api_client, "1")
    # What the Deployment controller does; goes through the fake's PATCH (merge patch) endpoint.
    client.AppsV1Api(api_client).patch_namespaced_deployment(
        NAME, NS, {"metadata": {"annotations": {"deployment.kubernetes.io/revision": "1"}}}
    )
    assert fake.get("deployments", NS, NAME)["metadata"]["generation"] == 1  # metadata only: same generation
    apply(api_client, "2")
    annotations = fake.get("deployments", NS, NAME)["metadata"]["annotations"]
    assert annotations["deployment.kubernetes.io/revision"] == "1"
    assert annotations[manifests.ANN_VERSION] == "2"


def test_service_port_change_keeps_cluster_ip(kube_api):
    fake, api_client = kube_api
    apply(api_client, "1")
    ip = fake.get("services", NS, NAME)["spec"]["clusterIP"]
    result = apply(api_client, "1", cfg=DeploySection(namespace=NS, port=8000))
    assert result["Service"].action == "updated" and result["Deployment"].action == "unchanged"
    svc = fake.get("services", NS, NAME)
    assert svc["spec"]["clusterIP"] == ip and svc["spec"]["ports"][0]["port"] == 8000


def test_rollout_success_when_status_catches_up(kube_api):
    fake, api_client = kube_api
    gen = apply(api_client, "1")["Deployment"].generation
    assert kube.wait_for_rollout(NAME, NS, gen, 0.3, api_client=api_client, poll_s=0.05) is False
    timer = threading.Timer(0.3, fake.complete_rollout, (NS, NAME))
    timer.start()
    assert kube.wait_for_rollout(NAME, NS, gen, 5, api_client=api_client, poll_s=0.05) is True
    timer.join()


def test_status_of_an_older_generation_does_not_count(kube_api):
    fake, api_client = kube_api
    apply(api_client, "1")
    fake.complete_rollout(NS, NAME)
    gen = apply(api_client, "2")["Deployment"].generation
    assert gen == 2
    assert kube.wait_for_rollout(NAME, NS, gen, 0.3, api_client=api_client, poll_s=0.05) is False


def test_status_patched_through_the_client_completes_the_rollout(kube_api):
    from kubernetes import client

    fake, api_client = kube_api
    gen = apply(api_client, "1")["Deployment"].generation
    client.AppsV1Api(api_client).patch_namespaced_deployment_status(
        NAME, NS, {"status": {"observedGeneration": gen, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}}
    )
    assert kube.wait_for_rollout(NAME, NS, gen, 2, api_client=api_client, poll_s=0.05) is True


@pytest.mark.parametrize("failure", ["deadline", "timeout"])
def test_failed_rollout_rolls_back_to_the_serving_version(kube_api, failure):
    fake, api_client = kube_api
    apply(api_client, "1")
    fake.complete_rollout(NS, NAME)
    v1_template = fake.get("deployments", NS, NAME)["spec"]["template"]
    gen = apply(api_client, "2")["Deployment"].generation
    if failure == "deadline":
        fake.fail_rollout(NS, NAME)
    assert kube.wait_for_rollout(NAME, NS, gen, 0.5, api_client=api_client, poll_s=0.05) is False

    restored = kube.rollback(NAME, NS, api_client=api_client)
    assert restored.action == "updated" and restored.version["version"] == "1"
    dep = fake.get("deployments", NS, NAME)
    assert dep["spec"]["template"] == v1_template  # the old ReplicaSet's template: the controller reuses it
    assert kube.current_version(NAME, NS, api_client=api_client) == {
        "name": MODEL,
        "version": "1",
        "run_id": RUNS["1"],
        "generation": 3,
        "adapters": (),
    }
    assert kube.rollback(NAME, NS, api_client=api_client).action == "unchanged"  # a second call is a no-op


def test_stuck_version_is_never_a_rollback_target(kube_api):
    fake, api_client = kube_api
    apply(api_client, "1")
    fake.complete_rollout(NS, NAME)
    apply(api_client, "2")
    fake.fail_rollout(NS, NAME)
    apply(api_client, "3")  # replaces a version that never became ready
    assert kube.rollback(NAME, NS, api_client=api_client).version["version"] == "1"


def test_rollback_without_previous_version_does_nothing(kube_api):
    fake, api_client = kube_api
    assert kube.rollback(NAME, NS, api_client=api_client) is None
    apply(api_client, "1")
    writes = len(fake.writes())
    assert kube.rollback(NAME, NS, api_client=api_client) is None
    assert len(fake.writes()) == writes


def test_update_retries_on_conflict(kube_api):
    fake, api_client = kube_api
    apply(api_client, "1")
    fake.conflicts = 1
    assert apply(api_client, "2")["Deployment"].action == "updated"
    assert kube.current_version(NAME, NS, api_client=api_client)["version"] == "2"


def test_current_version_and_missing_deployment(kube_api):
    fake, api_client = kube_api
    assert kube.current_version(NAME, NS, api_client=api_client) is None
    assert kube.wait_for_rollout(NAME, NS, 1, 1, api_client=api_client, poll_s=0.05) is False
    apply(api_client, "1")
    assert kube.current_version(NAME, NS, api_client=api_client) == {
        "name": MODEL,
        "version": "1",
        "run_id": RUNS["1"],
        "generation": 1,
        "adapters": (),
    }


def test_deploy_version_end_to_end(kube_api):
    fake, api_client = kube_api
    args = dict(
        name=MODEL,
        run_id=RUNS["1"],
        tags={"recommended_quantize": "none"},
        api_client=api_client,
        timeout_s=5,
        poll_s=0.05,
    )
    timer = threading.Timer(0.3, fake.complete_rollout, (NS, NAME))
    timer.start()
    assert kube.deploy_version(CFG, version="1", **args) is True
    timer.join()
    args.update(run_id=RUNS["2"], timeout_s=0.3)
    assert kube.deploy_version(CFG, version="2", **args) is False  # never ready: rolled back
    assert kube.current_version(NAME, NS, api_client=api_client)["version"] == "1"


def serving_version(fake) -> str | None:
    dep = fake.get("deployments", NS, NAME)
    return dep and dep["metadata"]["annotations"].get(manifests.ANN_VERSION)


@pytest.fixture
def quick_backoff(monkeypatch):
    monkeypatch.setattr(kube_client, "BACKOFF_S", 0.01)


def test_a_busy_api_server_is_retried_with_backoff_and_the_apply_completes(kube_api, quick_backoff):
    fake, api_client = kube_api
    apply(api_client, "1")
    fake.fail("GET", 429, times=1, path=f"/deployments/{NAME}")  # with Retry-After: 1
    fake.fail("PUT", 503, times=2, path=f"/deployments/{NAME}")
    assert apply(api_client, "2")["Deployment"].action == "updated" and serving_version(fake) == "2"
    puts = [r for r in fake.requests if r == ("PUT", f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}")]
    assert len(puts) == 3  # two refused, the third applied


@pytest.mark.parametrize("code", [401, 403, 422])
def test_an_error_retrying_cannot_fix_is_not_retried(kube_api, quick_backoff, code):
    from kubernetes.client.exceptions import ApiException

    fake, api_client = kube_api
    apply(api_client, "1")
    writes = len(fake.writes())
    fake.fail("PUT", code, times=None, path=f"/deployments/{NAME}")
    with pytest.raises(ApiException) as err:
        apply(api_client, "2")
    assert err.value.status == code and len(fake.writes()) == writes + 1  # one attempt, no retry


def names_version(version: str):
    return lambda fake: serving_version(fake) == version


def deploy(api_client, version: str, timeout_s: float = 2) -> bool:
    return kube.deploy_version(
        CFG,
        name=MODEL,
        version=version,
        run_id=RUNS[version],
        tags={"recommended_quantize": "none"},
        api_client=api_client,
        timeout_s=timeout_s,
        poll_s=0.05,
    )


@pytest.mark.parametrize("code", [401, 403])
def test_a_refusal_while_the_rollout_is_watched_rolls_back_and_says_so(kube_api, quick_backoff, code):
    fake, api_client = kube_api
    apply(api_client, "1")
    fake.complete_rollout(NS, NAME)
    fake.fail("GET", code, times=1, path=f"/deployments/{NAME}", when=names_version("2"))  # the wait's first read
    with pytest.raises(kube.RolloutError, match=f"answered {code} .* while the rollout was watched; rolled back"):
        deploy(api_client, "2")
    assert serving_version(fake) == "1"


def test_a_refusal_that_also_stops_the_rollback_says_both(kube_api, quick_backoff):
    fake, api_client = kube_api
    apply(api_client, "1")
    fake.complete_rollout(NS, NAME)
    fake.fail("GET", 403, times=None, path=f"/deployments/{NAME}", when=names_version("2"))
    with pytest.raises(kube.RolloutError, match="answered 403 Forbidden.*the rollback failed too \\(403 Forbidden"):
        deploy(api_client, "2")


def test_a_throttled_watch_keeps_waiting_and_the_rollout_completes(kube_api, quick_backoff):
    fake, api_client = kube_api
    # more 503s than one read's retries: the watch itself must ride them out until its deadline
    fake.fail("GET", 503, times=kube_client.RETRY_ATTEMPTS + 3, path=f"/deployments/{NAME}", when=names_version("1"))
    timer = threading.Timer(0.3, fake.complete_rollout, (NS, NAME))
    timer.start()
    try:
        assert deploy(api_client, "1", timeout_s=10) is True
    finally:
        timer.cancel()
    assert serving_version(fake) == "1"


def test_an_apply_the_api_refuses_changes_nothing_and_says_why(kube_api, quick_backoff):
    fake, api_client = kube_api
    apply(api_client, "1")
    fake.complete_rollout(NS, NAME)
    fake.fail("PUT", 403, times=None, path=f"/deployments/{NAME}")
    with pytest.raises(kube.RolloutError, match="refused the apply \\(403 Forbidden: injected 403.*nothing changed"):
        deploy(api_client, "2")
    assert serving_version(fake) == "1"


def test_scaled_to_zero_is_not_serving_and_the_same_version_comes_back_whole(kube_api):
    fake, api_client = kube_api
    apply(api_client, "1")
    fake.complete_rollout(NS, NAME)
    assert kube.managed_models(NS, api_client=api_client) == {MODEL: NAME}
    kube.scale_to_zero(NAME, NS, "alias removed", api_client=api_client)
    dep = fake.get("deployments", NS, NAME)
    assert dep["spec"]["replicas"] == 0 and dep["metadata"]["annotations"][kube.ANN_RETIRED] == "alias removed"
    assert kube.current_version(NAME, NS, api_client=api_client) is None
    assert kube.managed_models(NS, api_client=api_client) == {}
    assert apply(api_client, "1")["Deployment"].action == "updated"  # promoted again: replicas restored
    assert fake.get("deployments", NS, NAME)["spec"]["replicas"] == 1


def test_two_or_more_replicas_apply_a_disruption_budget_through_the_policy_api(kube_api):
    fake, api_client = kube_api
    cfg = DeploySection(namespace=NS, replicas=2)
    results = {r.kind: r for r in kube.apply(objects("1", cfg=cfg), NS, api_client=api_client)}
    assert results["PodDisruptionBudget"].action == "created"
    assert fake.get("poddisruptionbudgets", NS, NAME)["spec"]["maxUnavailable"] == 1
    assert fake.get("deployments", NS, NAME)["spec"]["replicas"] == 2
    again = {r.kind: r.action for r in kube.apply(objects("1", cfg=cfg), NS, api_client=api_client)}
    assert again == {"Service": "unchanged", "PodDisruptionBudget": "unchanged", "Deployment": "unchanged"}


def test_the_deployers_role_grants_exactly_the_verbs_it_uses(kube_api):
    """Every path of serving/kube.py (create, update, unchanged, rollback, list, scale to zero, a disruption
    budget) driven through the real client; the requests it made, as RBAC verbs, are the Role's rules."""
    from pathlib import Path

    import yaml

    fake, api_client = kube_api
    cfg = DeploySection(namespace=NS, replicas=2)
    for version in ("1", "2", "2"):
        kube.apply(objects(version, cfg=cfg), NS, api_client=api_client)
        fake.complete_rollout(NS, NAME)
    # a Service and a budget changed behind the deployer's back (a person's edit, an older llmops): updated back
    for plural in ("services", "poddisruptionbudgets"):
        fake.objects[(plural, NS, NAME)]["metadata"]["annotations"][kube.ANN_APPLIED] = "edited elsewhere"
    kube.apply(objects("2", cfg=cfg), NS, api_client=api_client)
    kube.rollback(NAME, NS, api_client=api_client)
    kube.current_version(NAME, NS, api_client=api_client)
    kube.managed_models(NS, api_client=api_client)
    kube.scale_to_zero(NAME, NS, "alias removed", api_client=api_client)
    used = set()
    for method, path in fake.requests:
        parts = path.strip("/").split("/")
        resource, named = (parts[-2], True) if parts[-2] in KIND_PLURALS else (parts[-1], False)
        verb = {"GET": "get" if named else "list", "POST": "create", "PUT": "update", "PATCH": "patch"}[method]
        used.add((KIND_PLURALS[resource], resource, verb))
    rbac = Path(__file__).resolve().parents[2] / "infra" / "k8s" / "base" / "deployer-rbac.yaml"
    role = next(d for d in yaml.safe_load_all(rbac.read_text()) if d and d["kind"] == "Role")
    granted = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert used == granted


KIND_PLURALS = {"deployments": "apps", "services": "", "poddisruptionbudgets": "policy"}  # resource -> API group


def test_an_api_server_that_is_away_is_retried_and_then_reported(quick_backoff):
    """Connection refused (no HTTP answer at all) is retried like a 503, and a rollout watched through it ends in
    a RolloutError that says so, never an unhandled urllib3 error."""
    from kubernetes import client as k8s

    from tests.conftest import free_port

    config = k8s.Configuration()
    config.host = f"http://127.0.0.1:{free_port()}"  # nothing listens
    config.retries = False
    with pytest.raises(kube.RolloutError, match="refused the apply \\(no answer"):
        kube.deploy_version(CFG, name=MODEL, version="1", run_id=RUNS["1"], tags={}, api_client=k8s.ApiClient(config))


@pytest.mark.parametrize("engine", ["tgi", "vllm"])
def test_the_deployer_places_swaps_and_rolls_back_an_adapter_set_on_a_base_deployment(kube_api, engine):
    """Through the official client against the fake API: a base with two adapters deploys as one Deployment, a
    moved adapter alias rolls it with the new set, and a rollout that never becomes ready rolls back to the set
    that served, the new adapter version saying why."""
    from serving.backends import KubeBackend
    from serving.deployer import Deployer
    from tests.unit.test_placement import Registry, adapter_tags, base_tags

    fake, api_client = kube_api
    pinned = {
        "tgi_image": "ghcr.io/huggingface/text-generation-inference:3.3.4@sha256:" + "ab" * 32,
        "vllm_image": "vllm/vllm-openai:v0.32.0@sha256:" + "ef" * 32,
        "fetch_image": "ghcr.io/llmops/llmops-cpu:0.1.0@sha256:" + "cd" * 32,
    }
    cfg = DeploySection(namespace=NS, engine=engine, rollout_timeout_s=2, **pinned)
    registry = Registry()
    registry.add("m-base", "1", base_tags())
    registry.add("banking-adapter", "1", adapter_tags("a1"))
    registry.add("alpaca-adapter", "1", adapter_tags("b1"))
    deployer = Deployer(KubeBackend(cfg, api_client=api_client, poll_s=0.05), client=registry)
    name = manifests.object_name("m-base")

    def placed() -> str:
        return fake.get("deployments", NS, name)["spec"]["template"]["metadata"]["annotations"][manifests.ANN_ADAPTERS]

    def completes() -> threading.Timer:
        timer = threading.Timer(0.3, fake.complete_rollout, (NS, name))
        timer.start()
        return timer

    timer = completes()
    assert deployer.reconcile_once() == ["deployed m-base/1"]
    timer.join()
    assert placed() == "alpaca-adapter/1@b1,banking-adapter/1@a1"
    assert registry.tags("banking-adapter", "1")["deploy.endpoint"].startswith(f"http://{name}.{NS}.svc")

    registry.add("banking-adapter", "2", adapter_tags("a2"))
    timer = completes()
    assert deployer.reconcile_once() == ["deployed m-base/1"]
    timer.join()
    assert placed() == "alpaca-adapter/1@b1,banking-adapter/2@a2"
    assert fake.get("deployments", NS, name)["metadata"]["generation"] == 2  # rolled once, not re-created

    registry.add("banking-adapter", "3", adapter_tags("a3"))  # this rollout never becomes ready
    assert deployer.reconcile_once() == ["failed m-base/1 adapters"]
    assert placed() == "alpaca-adapter/1@b1,banking-adapter/2@a2"  # the set that served is back
    tags = registry.tags("banking-adapter", "3")
    assert tags["deploy.status"] == "failed" and "kept the adapters that served" in tags["deploy.reason"]
    # what the rolled-back pods serve stays deployed: the base, and both adapters of the old set
    assert registry.tags("m-base", "1")["deploy.status"] == "deployed"
    assert registry.tags("banking-adapter", "2")["deploy.status"] == "deployed"
    assert registry.tags("alpaca-adapter", "1")["deploy.status"] == "deployed"
