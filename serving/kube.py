"""Apply, watch and roll back the TGI objects with the official `kubernetes` client (no kubectl).

Idempotence and rollback both rest on two annotations that `apply` writes on every object:

- `llmops.io/applied-config`: the rendered object (canonical JSON) as last applied. If the new render is
  identical, nothing is written, so a re-apply never bumps the Deployment's generation (the same idea as
  kubectl's last-applied-configuration, but compared on our own render, not on the defaulted live object).
- `llmops.io/previous-config` (Deployments): the last applied config whose rollout had *completed* when it
  was replaced. A config that never became ready is never recorded, so after v1 (good) -> v2 (stuck)
  -> v3, the rollback target is still v1.

Rollback re-applies `previous-config` with a plain update. The Deployment controller recognises the
template of the old ReplicaSet and scales that back, and since the strategy has maxUnavailable 0,
the old pods were never removed while the new one was failing: nothing stops serving at any point.
Keeping the target in an annotation (not reading old ReplicaSets) needs no ReplicaSet RBAC and
survives a restart of the deployer.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from serving import manifests
from serving.kube_client import API_ERRORS, call, default_client, describe, kind_ops, read_object, retriable
from serving.manifests import ANN_ADAPTERS, ANN_NAME, ANN_PREFIX, ANN_RUN, ANN_VERSION

if TYPE_CHECKING:
    from serving.settings import DeploySection

ANN_APPLIED = ANN_PREFIX + "applied-config"
ANN_PREVIOUS = ANN_PREFIX + "previous-config"
ANN_RETIRED = ANN_PREFIX + "retired"
MANAGED = "app.kubernetes.io/managed-by=llmops"
WRITE_ATTEMPTS = 3  # the controller's status writes bump resourceVersion, so an update can race with them


class RolloutError(RuntimeError):
    """The API refused what a rollout needs; the message says what, and whether the rollback happened."""


RolloutState = Literal["done", "failed", "progressing"]


@dataclass(frozen=True)
class Applied:
    kind: str
    name: str
    action: Literal["created", "updated", "unchanged"]
    generation: int | None
    version: dict | None = None  # model name/version/run id, for Deployments


def canonical(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _annotations(obj: dict | None) -> dict:
    return ((obj or {}).get("metadata") or {}).get("annotations") or {}


def version_of(obj: dict | None) -> dict | None:
    ann = _annotations(obj)
    if ANN_VERSION not in ann:
        return None
    placed = tuple(sorted(filter(None, ann.get(ANN_ADAPTERS, "").split(","))))
    return {"name": ann.get(ANN_NAME), "version": ann.get(ANN_VERSION), "run_id": ann.get(ANN_RUN), "adapters": placed}


def rollout_state(deployment: dict, generation: int | None = None) -> RolloutState:
    """The same test `kubectl rollout status` applies, for the given (or the object's own) generation."""
    meta, spec, status = deployment.get("metadata") or {}, deployment.get("spec") or {}, deployment.get("status") or {}
    generation = meta.get("generation", 0) if generation is None else generation
    if status.get("observedGeneration", 0) < generation:
        return "progressing"  # conditions and counts still describe an older spec
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return "failed"
    wanted, updated = spec.get("replicas", 1), status.get("updatedReplicas", 0)
    if updated == wanted and status.get("replicas", 0) == updated and status.get("availableReplicas", 0) == updated:
        return "done"
    return "progressing"


def _rollback_target(live: dict | None) -> str | None:
    if live is None or live.get("kind") != "Deployment":
        return None
    ann = _annotations(live)
    if ann.get(ANN_APPLIED) and rollout_state(live) == "done":
        return ann[ANN_APPLIED]
    return ann.get(ANN_PREVIOUS)


def _to_write(desired: dict, live: dict | None) -> dict:
    obj = copy.deepcopy(desired)
    meta = obj["metadata"]
    # Keep annotations other tools own (e.g. deployment.kubernetes.io/revision); ours are re-rendered.
    foreign = {k: v for k, v in _annotations(live).items() if not k.startswith(ANN_PREFIX)}
    meta["annotations"] = {**foreign, **meta.get("annotations", {}), ANN_APPLIED: canonical(desired)}
    if previous := _rollback_target(live):
        meta["annotations"][ANN_PREVIOUS] = previous
    if live is not None:
        meta["resourceVersion"] = live["metadata"]["resourceVersion"]
        if obj["kind"] == "Service":  # immutable once allocated: an update must repeat them
            for key in ("clusterIP", "clusterIPs"):
                if key in live.get("spec", {}):
                    obj["spec"][key] = live["spec"][key]
    return obj


def _result(kind: str, name: str, action, obj: dict) -> Applied:
    return Applied(kind, name, action, (obj.get("metadata") or {}).get("generation"), version_of(obj))


def _apply_one(obj: dict, namespace: str, api_client: k8s.ApiClient) -> Applied:
    desired = copy.deepcopy(obj)
    desired["metadata"]["namespace"] = namespace
    kind, name = desired["kind"], desired["metadata"]["name"]
    _, create, replace = kind_ops(kind, api_client)
    for attempt in range(WRITE_ATTEMPTS):
        live = read_object(kind, name, namespace, api_client)
        if live is not None and _annotations(live).get(ANN_APPLIED) == canonical(desired):
            return _result(kind, name, "unchanged", live)
        try:
            if live is None:
                return _result(kind, name, "created", call(create, namespace, _to_write(desired, None)))
            return _result(kind, name, "updated", call(replace, name, namespace, _to_write(desired, live)))
        except ApiException as exc:
            # 409: someone wrote in between (status update, concurrent create); re-read and decide again.
            if exc.status != 409 or attempt == WRITE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def apply(objects: list[dict], namespace: str, *, api_client: k8s.ApiClient | None = None) -> list[Applied]:
    """Create or update each object (Deployment, Service) in `namespace`; unchanged objects are not written."""
    api_client = api_client or default_client()
    return [_apply_one(obj, namespace, api_client) for obj in objects]


def wait_for_rollout(
    name: str,
    namespace: str,
    generation: int,
    timeout_s: float,
    *,
    api_client: k8s.ApiClient | None = None,
    poll_s: float = 2.0,
) -> bool:
    """True once `generation` is fully rolled out; False on ProgressDeadlineExceeded, deletion or timeout.

    Polling rather than a watch: one GET every few seconds is cheap, and it cannot miss an event
    or stall on a dropped watch connection.
    """
    api_client = api_client or default_client()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            live = read_object("Deployment", name, namespace, api_client)
        except API_ERRORS as exc:
            if not retriable(exc):
                raise
            live = {}  # still busy or away after call's retries: not a failed rollout, keep waiting until the deadline
        if live is None:
            return False
        state = rollout_state(live, generation) if live else "progressing"
        if state != "progressing":
            return state == "done"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(poll_s, remaining))


def current_version(name: str, namespace: str, *, api_client: k8s.ApiClient | None = None) -> dict | None:
    """{name, version, run_id, generation} of the model the Deployment is set to serve; None if there is none
    or it was scaled to zero."""
    live = read_object("Deployment", name, namespace, api_client or default_client())
    found = version_of(live)
    if found is None or (live.get("spec") or {}).get("replicas", 1) == 0:
        return None
    return {**found, "generation": live["metadata"].get("generation")}


def managed_models(namespace: str, *, api_client: k8s.ApiClient | None = None) -> dict[str, str]:
    """Registered model name -> Deployment name, for every serving Deployment llmops manages in the namespace."""
    api = k8s.AppsV1Api(api_client or default_client())
    found = call(api.list_namespaced_deployment, namespace, label_selector=MANAGED)
    return {
        version_of(item)["name"]: item["metadata"]["name"]
        for item in found.get("items", [])
        if version_of(item) and (item.get("spec") or {}).get("replicas", 1) != 0
    }


def scale_to_zero(name: str, namespace: str, reason: str, *, api_client: k8s.ApiClient | None = None) -> None:
    """Stop serving without deleting: replicas 0 (one merge patch, the only verb this needs beyond update).

    The applied-config annotation goes, so promoting the same version again re-applies it with its replicas;
    the rollback target stays.
    """
    api = k8s.AppsV1Api(api_client or default_client())
    patch = {"metadata": {"annotations": {ANN_APPLIED: None, ANN_RETIRED: reason}}, "spec": {"replicas": 0}}
    call(api.patch_namespaced_deployment, name, namespace, patch)


def rollback(name: str, namespace: str, *, api_client: k8s.ApiClient | None = None) -> Applied | None:
    """Re-apply the last config that completed its rollout; None when there is nothing to go back to.

    Calling it twice is harmless: the second call finds that config already applied and writes nothing.
    """
    api_client = api_client or default_client()
    previous = _annotations(read_object("Deployment", name, namespace, api_client)).get(ANN_PREVIOUS)
    if not previous:
        return None
    return _apply_one(json.loads(previous), namespace, api_client)


def deploy_version(
    cfg: DeploySection,
    *,
    name: str,
    version: str,
    run_id: str,
    tags: dict,
    adapters: tuple = (),
    api_client: k8s.ApiClient | None = None,
    timeout_s: float | None = None,
    poll_s: float = 2.0,
) -> bool:
    """Apply one version, wait for it, and roll back if it never becomes ready. True when it serves."""
    api_client = api_client or default_client()
    objects = manifests.render(cfg, name=name, version=version, run_id=run_id, tags=tags, adapters=adapters)
    try:
        results = apply(objects, cfg.namespace, api_client=api_client)
    except API_ERRORS as err:  # nothing of this version rolls out; what served before still does
        raise RolloutError(f"the Kubernetes API refused the apply ({describe(err)}); nothing changed") from err
    dep = next(r for r in results if r.kind == "Deployment")
    return finish_rollout(cfg, dep.name, dep.generation, api_client=api_client, timeout_s=timeout_s, poll_s=poll_s)


def finish_rollout(
    cfg: DeploySection,
    name: str,
    generation: int,
    *,
    api_client: k8s.ApiClient | None = None,
    timeout_s: float | None = None,
    poll_s: float = 2.0,
) -> bool:
    """Wait for `generation` and roll back if it never becomes ready; True when it serves. Also what a restarted
    deployer calls for a rollout it left half-done. An API error while waiting rolls back too, then says so."""
    api_client = api_client or default_client()
    timeout_s = cfg.rollout_timeout_s if timeout_s is None else timeout_s
    try:
        if wait_for_rollout(name, cfg.namespace, generation, timeout_s, api_client=api_client, poll_s=poll_s):
            return True
        failure = None
    except API_ERRORS as err:
        failure = f"the Kubernetes API answered {describe(err)} while the rollout was watched"
    try:
        rollback(name, cfg.namespace, api_client=api_client)
    except API_ERRORS as err:
        raise RolloutError(f"{failure or 'the rollout failed'}; the rollback failed too ({describe(err)})") from err
    if failure:
        raise RolloutError(f"{failure}; rolled back to the previous version")
    return False
