"""Calls to the Kubernetes API with the official `kubernetes` client: the client, each kind's read, create and
replace, and one call wrapper that retries a busy or unreachable API server with backoff."""

from __future__ import annotations

import functools
import json
import time

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

# 429 (API priority and fairness) and 5xx are the API server being busy or restarting: retried with backoff,
# as client-go does. 401, 403, 404, 409 and 422 say something about the request itself and are not.
RETRIED = (429, 500, 502, 503, 504)
RETRY_ATTEMPTS, BACKOFF_S, BACKOFF_MAX_S = 6, 0.5, 8.0
REQUEST_TIMEOUT_S = (5.0, 30.0)  # connect, read: each attempt's bound
API_ERRORS = (ApiException, HTTPError)  # an answer that refuses, or no answer


def describe(err: ApiException | HTTPError) -> str:
    """`403 Forbidden: <the API's message>`, without the response headers the exception's text carries."""
    if not isinstance(err, ApiException):
        return f"no answer ({type(err).__name__})"
    try:
        message = json.loads(err.body or "{}").get("message", "")
    except ValueError:
        message = ""
    return f"{err.status} {err.reason}" + (f": {message[:300]}" if message else "")


@functools.cache
def default_client() -> k8s.ApiClient:
    """In a pod, its ServiceAccount; elsewhere, the current kubeconfig context."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return k8s.ApiClient()


def kind_ops(kind: str, api_client: k8s.ApiClient):
    if kind == "Deployment":
        api = k8s.AppsV1Api(api_client)
        return api.read_namespaced_deployment, api.create_namespaced_deployment, api.replace_namespaced_deployment
    if kind == "Service":
        api = k8s.CoreV1Api(api_client)
        return api.read_namespaced_service, api.create_namespaced_service, api.replace_namespaced_service
    if kind == "PodDisruptionBudget":
        api = k8s.PolicyV1Api(api_client)
        return (
            api.read_namespaced_pod_disruption_budget,
            api.create_namespaced_pod_disruption_budget,
            api.replace_namespaced_pod_disruption_budget,
        )
    raise ValueError(f"apply does not handle kind {kind!r}")


def retriable(err: Exception) -> bool:
    """The API server busy or away: a 429 or 5xx, or no answer at all (HTTPError: refused, reset, timed out)."""
    return isinstance(err, HTTPError) or (isinstance(err, ApiException) and err.status in RETRIED)


def call(fn, *args, **kwargs) -> dict:
    """One API call, retried with exponential backoff (or the server's Retry-After) while the server is busy.
    Each attempt is bounded (REQUEST_TIMEOUT_S): a hung API server must not hold the reconcile loop forever.

    Raw JSON instead of the generated models: what we store and compare must be exactly what the server holds.
    """
    kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT_S)
    for attempt in range(RETRY_ATTEMPTS):
        try:
            return json.loads(fn(*args, **kwargs, _preload_content=False).data)
        except API_ERRORS as err:
            if not retriable(err) or attempt == RETRY_ATTEMPTS - 1:
                raise
            wait = min(BACKOFF_S * 2**attempt, BACKOFF_MAX_S)
            retry_after = (getattr(err, "headers", None) or {}).get("Retry-After", "")
            time.sleep(min(float(retry_after), BACKOFF_MAX_S) if retry_after.isdigit() else wait)
    raise AssertionError("unreachable")


def read_object(kind: str, name: str, namespace: str, api_client: k8s.ApiClient) -> dict | None:
    try:
        return call(kind_ops(kind, api_client)[0], name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
