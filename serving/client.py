"""The application side: a LangChain chat model for a registered alias, e.g. chat_model("name@champion").

The endpoint URL is found, in order, from LLMOPS_ENDPOINT_URL, the deployment record on the model
version (the `deploy.endpoint` tag the deployer writes), or the record a local `llmops serve` leaves.
Requests time out, and only 429, 503 and connection errors are retried, with backoff.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx2

RETRY_STATUSES = {429, 503}
ENDPOINT_TAG = "deploy.endpoint"
# <service>.<namespace>.svc[.cluster.local]: DNS-1035 labels, as serving/manifests.py names the TGI Services
SERVICE_HOST = re.compile(
    r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.svc(\.cluster\.local)?"
)


def records_dir() -> Path:
    return Path(os.environ.get("LLMOPS_SERVING_DIR", Path(".llmops") / "serving"))


def parse_ref(ref: str) -> tuple[str, str]:
    """'name@alias' or 'models:/name@alias' -> (name, alias)."""
    ref = ref.removeprefix("models:/")
    name, sep, alias = ref.partition("@")
    if not sep or not name or not alias:
        raise ValueError(f"model reference {ref!r} must look like name@alias (e.g. llmops-demo@champion)")
    return name, alias


def write_local_record(name: str, alias: str, url: str, version: str | None) -> Path:
    path = records_dir() / f"{name}@{alias}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"url": url, "version": version, "pid": os.getpid(), "time": time.time()}))
    return path


def _alive(url: str) -> bool:
    try:
        return httpx2.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx2.HTTPError:
        return False


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address (127.evil.example is a name)
        return False


def trusted_endpoint(url: str, ref: str) -> str:
    """A `deploy.endpoint` tag, when it names what the deployer writes: an in-cluster Service or loopback.

    Anyone who may tag a version could otherwise send an application's prompts (and its credentials) to a
    host of their choosing; only the deployer writes this tag, and only these two kinds of address.
    """
    parsed = urlsplit(url)
    host = parsed.hostname or ""
    loopback = host == "localhost" or _is_loopback_ip(host)
    in_cluster = bool(SERVICE_HOST.fullmatch(host))
    if parsed.scheme in ("http", "https") and (loopback or in_cluster) and not parsed.username:
        return url
    raise LookupError(
        f"{ref}: its {ENDPOINT_TAG} tag {url!r} is neither an in-cluster Service (<name>.<namespace>.svc"
        "[.cluster.local]) nor loopback, so it was not written by the deployer; set LLMOPS_ENDPOINT_URL to "
        "call another address on purpose"
    )


def resolve_endpoint(ref: str) -> str:
    if os.environ.get("LLMOPS_ENDPOINT_URL"):
        return os.environ["LLMOPS_ENDPOINT_URL"].rstrip("/")
    name, alias = parse_ref(ref)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            version = MlflowClient().get_model_version_by_alias(name, alias)
        except MlflowException as err:
            raise LookupError(f"no version of {name!r} carries the alias {alias!r}: {err.message}") from err
        if version.tags.get(ENDPOINT_TAG):
            return trusted_endpoint(version.tags[ENDPOINT_TAG], f"{name}@{alias}").rstrip("/")
    record = records_dir() / f"{name}@{alias}.json"
    if record.exists():
        url = json.loads(record.read_text())["url"]
        if _alive(url):
            return url
    raise LookupError(
        f"no endpoint serves {name}@{alias}: deploy it (set the alias with a deployer running) "
        f"or start one with `llmops serve models:/{name}@{alias}`"
    )


class RetryTransport(httpx2.HTTPTransport):
    """Retries 429/503 and connection errors with exponential backoff; anything else is the caller's."""

    def __init__(self, attempts: int = 4, backoff: float = 0.5, **kw):
        super().__init__(**kw)
        self.attempts, self.backoff = attempts, backoff

    def handle_request(self, request):
        for attempt in range(self.attempts):
            last = attempt == self.attempts - 1
            try:
                response = super().handle_request(request)
            except (httpx2.ConnectError, httpx2.RemoteProtocolError):
                if last:
                    raise
            else:
                if response.status_code not in RETRY_STATUSES or last:
                    return response
                response.close()
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")


def install_retries(attempts: int = 4, backoff: float = 0.5, timeout: float = 60.0) -> None:
    """huggingface_hub's InferenceClient (inside langchain-huggingface) takes its HTTP client from this factory."""
    from huggingface_hub import set_client_factory

    set_client_factory(lambda: httpx2.Client(transport=RetryTransport(attempts, backoff), timeout=timeout))


def chat_model(
    ref: str,
    *,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    timeout: float = 60.0,
    streaming: bool = False,
    retries: int = 4,
):
    """A ChatHuggingFace over the endpoint serving `ref` ("name@alias")."""
    from langchain_huggingface import ChatHuggingFace, HuggingFaceEndpoint

    install_retries(attempts=retries, timeout=timeout)
    # TGI's chat route samples unless temperature is 0, and both wrappers default to 0.8: greedy must be explicit.
    temperature = temperature or 0.0
    llm = HuggingFaceEndpoint(
        endpoint_url=resolve_endpoint(ref),
        max_new_tokens=max_new_tokens,
        timeout=timeout,
        streaming=streaming,
        temperature=temperature,
        do_sample=temperature > 0,
    )
    return ChatHuggingFace(llm=llm, temperature=temperature, max_tokens=max_new_tokens)
