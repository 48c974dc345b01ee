"""A tiny stand-in for the Kubernetes API server: apps/v1 Deployments and v1 Services in namespaces.

Just enough of the real server's behaviour for serving/kube.py to be tested through the official client:
- GET / POST / PUT / PATCH on deployments, services and poddisruptionbudgets, PATCH on deployments/status;
- metadata.generation starts at 1 and grows only when the spec changes; resourceVersion grows on
  every real change and a PUT with a stale one gets 409 Conflict; a no-op write changes neither;
- PUT ignores status (as the real main resource does); the Deployment selector and a Service's
  clusterIP are immutable (422); Services get a clusterIP on create;
- PATCH applies an RFC 7386 JSON merge patch for both merge-patch and strategic-merge-patch content
  types (strategic merge keys for lists are NOT emulated); JSON Patch gets 415.
- LIST on deployments and services, filtered by an equality `labelSelector` (a,b=c,...).
There is no controller: tests set Deployment status themselves (`set_status`, `complete_rollout`,
`fail_rollout`, or PATCH .../status through the client). Every request is logged in `requests`.

Faults: `fail("GET", 429, times=2, path="/deployments/")` answers the next two matching requests with that
status and a Kubernetes Status body (429 with a Retry-After header), before they reach the objects; `times=None`
fails every matching request until `heal()`; `when=` arms a fault only while a condition on the fake holds.
"""

from __future__ import annotations

import copy
import itertools
import threading
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.conftest import Live

KINDS = {
    "deployments": ("apps/v1", "Deployment"),
    "services": ("v1", "Service"),
    "poddisruptionbudgets": ("policy/v1", "PodDisruptionBudget"),
    "trainjobs": ("trainer.kubeflow.org/v1alpha1", "TrainJob"),
    "pods": ("v1", "Pod"),
}
IMMUTABLE = {
    "deployments": ["selector"],
    "services": ["clusterIP", "clusterIPs"],
    "poddisruptionbudgets": [],
    "trainjobs": ["runtimeRef", "trainer"],
    "pods": [],
}


def status_error(code: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        },
        status_code=code,
    )


def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class FakeKube:
    """Run with `with FakeKube() as kube:`; `kube.api_client()` is a real kubernetes ApiClient for it."""

    def __init__(self):
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.conflicts = 0  # answer the next N PUTs with 409, as a racing status write would cause
        self.faults: list[dict] = []  # see fail()
        self._rv = itertools.count(1)
        self._ips = itertools.count(10)
        self._lock = threading.Lock()
        self.logs: dict[tuple[str, str], str] = {}  # (namespace, pod) -> what its log says
        self.app = self._build_app()

    # --- what tests use -------------------------------------------------------------------------
    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        return copy.deepcopy(self.objects.get((plural, namespace, name)))

    def set_status(self, namespace: str, name: str, status: dict) -> None:
        with self._lock:
            obj = self.objects[("deployments", namespace, name)]
            obj["status"] = copy.deepcopy(status)
            obj["metadata"]["resourceVersion"] = str(next(self._rv))

    def complete_rollout(self, namespace: str, name: str) -> None:
        obj = self.objects[("deployments", namespace, name)]
        n = obj["spec"].get("replicas", 1)
        self.set_status(
            namespace,
            name,
            {
                "observedGeneration": obj["metadata"]["generation"],
                "replicas": n,
                "updatedReplicas": n,
                "readyReplicas": n,
                "availableReplicas": n,
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
                ],
            },
        )

    def fail_rollout(self, namespace: str, name: str) -> None:
        """The new pod never became ready: the old one still serves (maxUnavailable 0), deadline passed."""
        obj = self.objects[("deployments", namespace, name)]
        n = obj["spec"].get("replicas", 1)
        self.set_status(
            namespace,
            name,
            {
                "observedGeneration": obj["metadata"]["generation"],
                "replicas": n + 1,
                "updatedReplicas": 1,
                "readyReplicas": n,
                "availableReplicas": n,
                "unavailableReplicas": 1,
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                    {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"},
                ],
            },
        )

    def put(self, plural: str, namespace: str, obj: dict) -> None:
        """Create an object as a controller would (a TrainJob's pods), or set a TrainJob's status."""
        with self._lock:
            obj = copy.deepcopy(obj)
            obj["apiVersion"], obj["kind"] = KINDS[plural]
            obj["metadata"].update(namespace=namespace, resourceVersion=str(next(self._rv)))
            self.objects[(plural, namespace, obj["metadata"]["name"])] = obj

    def fail(self, method: str, code: int, times: int | None = 1, path: str = "", when=None) -> None:
        """Answer the next `times` requests with `method` whose path contains `path` with `code`; with `when`,
        only while `when(fake)` is true (e.g. once the Deployment names a given version)."""
        with self._lock:
            self.faults.append({"method": method, "code": code, "left": times, "path": path, "when": when})

    def heal(self) -> None:
        with self._lock:
            self.faults.clear()

    def _fault(self, method: str, path: str) -> JSONResponse | None:
        for fault in self.faults:
            armed = fault["when"] is None or fault["when"](self)
            if fault["method"] == method and fault["path"] in path and fault["left"] != 0 and armed:
                if fault["left"] is not None:
                    fault["left"] -= 1
                reasons = {401: "Unauthorized", 403: "Forbidden", 409: "Conflict", 429: "TooManyRequests"}
                reason = reasons.get(fault["code"], "InternalError")
                answer = status_error(fault["code"], reason, f"injected {fault['code']} for {method} {path}")
                if fault["code"] == 429:
                    answer.headers["Retry-After"] = "1"
                return answer
        return None

    def writes(self) -> list[tuple[str, str]]:
        return [r for r in self.requests if r[0] != "GET"]

    # --- server lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> FakeKube:
        self._live = Live(self.app).__enter__()
        self.url = self._live.url
        return self

    def __exit__(self, *exc) -> None:
        self._live.__exit__(*exc)

    def api_client(self):
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        return client.ApiClient(config)

    # --- the API --------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI()
        prefixes = {
            "deployments": "/apis/apps/v1",
            "services": "/api/v1",
            "poddisruptionbudgets": "/apis/policy/v1",
            "trainjobs": "/apis/trainer.kubeflow.org/v1alpha1",
            "pods": "/api/v1",
        }
        for plural, prefix in prefixes.items():
            base = prefix + "/namespaces/{namespace}/" + plural
            app.add_api_route(base, self._route(self._create, plural), methods=["POST"])
            app.add_api_route(base, self._route(self._list, plural), methods=["GET"])
            app.add_api_route(base + "/{name}", self._route(self._read, plural), methods=["GET"])
            app.add_api_route(base + "/{name}", self._route(self._replace, plural), methods=["PUT"])
            app.add_api_route(base + "/{name}", self._route(self._patch, plural), methods=["PATCH"])
        app.add_api_route(
            "/apis/trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs/{name}",
            self._route(self._delete, "trainjobs"),
            methods=["DELETE"],
        )
        app.add_api_route("/api/v1/namespaces/{namespace}/pods/{name}/log", self._log, methods=["GET"])
        app.add_api_route(
            "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/status",
            self._route(self._patch_status, "deployments"),
            methods=["PATCH"],
        )
        return app

    def _route(self, handler, plural: str):
        async def endpoint(request: Request, namespace: str, name: str | None = None):
            self.requests.append((request.method, request.url.path))
            body = await request.json() if request.method in ("POST", "PUT", "PATCH") else None
            with self._lock:
                if injected := self._fault(request.method, request.url.path):
                    return injected
                if handler == self._list:
                    return self._list(plural, namespace, request.query_params.get("labelSelector", ""))
                return handler(plural, namespace, name, body, request.headers.get("content-type", ""))

        return endpoint

    def _list(self, plural, namespace, selector: str):
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        items = [
            obj
            for (kind, ns, _), obj in sorted(self.objects.items())
            if kind == plural and ns == namespace and wanted.items() <= (obj["metadata"].get("labels") or {}).items()
        ]
        api_version, kind = KINDS[plural]
        return JSONResponse({"apiVersion": api_version, "kind": f"{kind}List", "metadata": {}, "items": items})

    def _delete(self, plural, namespace, name, body, ctype):
        obj = self.objects.pop((plural, namespace, name), None)
        if obj is None:
            return status_error(404, "NotFound", f'{plural} "{name}" not found')
        return JSONResponse({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})

    async def _log(self, request: Request, namespace: str, name: str):
        from fastapi.responses import PlainTextResponse

        self.requests.append((request.method, request.url.path))
        if (namespace, name) not in self.logs:
            return status_error(404, "NotFound", f'pods "{name}" not found')
        return PlainTextResponse(self.logs[(namespace, name)])

    def _read(self, plural, namespace, name, body, ctype):
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            return status_error(404, "NotFound", f'{plural} "{name}" not found')
        return JSONResponse(obj)

    def _create(self, plural, namespace, name, body, ctype):
        meta = body.get("metadata") or {}
        name = meta.get("name")
        if meta.get("namespace", namespace) != namespace:
            return status_error(400, "BadRequest", "the namespace of the object does not match the URL")
        if (plural, namespace, name) in self.objects:
            return status_error(409, "AlreadyExists", f'{plural} "{name}" already exists')
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = KINDS[plural]
        obj["metadata"].update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(self._rv)),
            creationTimestamp="2026-11-23T00:00:00Z",
        )
        if plural == "deployments":
            obj["metadata"]["generation"], obj["status"] = 1, {}
        elif plural == "services":
            ip = f"10.96.0.{next(self._ips)}"
            obj["spec"].setdefault("clusterIP", ip)
            obj["spec"].setdefault("clusterIPs", [obj["spec"]["clusterIP"]])
        self.objects[(plural, namespace, name)] = obj
        return JSONResponse(obj, status_code=201)

    def _replace(self, plural, namespace, name, body, ctype):
        if self.conflicts > 0:
            self.conflicts -= 1
            return status_error(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            )
        return self._update(plural, namespace, name, lambda live: body, check_rv=True)

    def _patch(self, plural, namespace, name, body, ctype):
        if "json-patch" in ctype:
            return status_error(415, "UnsupportedMediaType", "the fake supports merge patches only")
        return self._update(plural, namespace, name, lambda live: merge_patch(live, body), check_rv=True)

    def _patch_status(self, plural, namespace, name, body, ctype):
        def patched(live):
            return {**live, "status": merge_patch(live.get("status") or {}, body.get("status") or {})}

        return self._update(plural, namespace, name, patched, check_rv=False, status=True)

    def _update(self, plural, namespace, name, make, *, check_rv: bool, status: bool = False):
        live = self.objects.get((plural, namespace, name))
        if live is None:
            return status_error(404, "NotFound", f'{plural} "{name}" not found')
        new = copy.deepcopy(make(copy.deepcopy(live)))
        rv = (new.get("metadata") or {}).get("resourceVersion")
        if check_rv and rv and rv != live["metadata"]["resourceVersion"]:
            return status_error(409, "Conflict", "the object has been modified (stale resourceVersion)")
        if status:
            new = {**live, "status": new["status"]}
        else:
            for key in IMMUTABLE[plural]:
                if key in live["spec"] and new.get("spec", {}).get(key, live["spec"][key]) != live["spec"][key]:
                    return status_error(422, "Invalid", f"spec.{key}: field is immutable")
            # Identity, server-owned fields and status cannot be written through the main resource.
            keep = {
                k: live["metadata"][k]
                for k in ("uid", "creationTimestamp", "namespace", "name", "generation")
                if k in live["metadata"]
            }
            new["metadata"] = {**new.get("metadata", {}), **keep}
            new["apiVersion"], new["kind"] = KINDS[plural]
            if "status" in live:
                new["status"] = live["status"]
            if plural == "services":
                new["spec"].setdefault("clusterIP", live["spec"]["clusterIP"])
                new["spec"].setdefault("clusterIPs", live["spec"]["clusterIPs"])
        new["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
        if new == live:
            return JSONResponse(live)  # a no-op write: no new resourceVersion, no new generation
        if plural == "deployments" and new.get("spec") != live.get("spec"):
            new["metadata"]["generation"] = live["metadata"]["generation"] + 1
        new["metadata"]["resourceVersion"] = str(next(self._rv))
        self.objects[(plural, namespace, name)] = new
        return JSONResponse(new)
