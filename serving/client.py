"""The application side: a LangChain chat model for a registered alias, e.g. chat_model("name@champion").

The endpoint URL is found, in order, from LLMOPS_ENDPOINT_URL, the deployment record on the model
version (the `deploy.endpoint` tag the deployer writes), or the record a local `llmops serve` leaves.
The engine behind it picks the LangChain class: ChatHuggingFace for TGI (and our TGI-protocol server),
ChatOpenAI on vLLM's /v1. Requests time out, and only 429, 503 and connection errors are retried, with backoff.
`constrained=True` holds the answer to the version's label set (`prompt.label_set`) on either engine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx2

from components.environment import ENDPOINT_URL, SERVING_DIR, TRACKING_URI
from components.registry_tags import (
    ENDPOINT_TAG,
    PROMPT_LABEL_SET,
    REASON_TAG,
    SERVED_ENGINE_TAG,
    STATUS_TAG,
    DeployStatus,
    ModelKind,
    kind_of,
)
from serving.adapter_client import contract_of, placed_base, served_models
from serving.manifests import object_name
from serving.settings import DeploySection

RETRY_STATUSES = {429, 503}
SERVING_NAMESPACE = DeploySection.model_fields["namespace"].default  # where the deployer's Services live


def records_dir() -> Path:
    return Path(SERVING_DIR.get())


def parse_ref(ref: str) -> tuple[str, str]:
    """'name@alias' or 'models:/name@alias' -> (name, alias)."""
    ref = ref.removeprefix("models:/")
    name, sep, alias = ref.partition("@")
    if not sep or not name or not alias:
        raise ValueError(f"model reference {ref!r} must look like name@alias (e.g. llmops-demo@champion)")
    return name, alias


def write_local_record(name: str, alias: str, url: str, version: str | None, engine: str = "tgi") -> Path:
    path = records_dir() / f"{name}@{alias}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"url": url, "version": version, "engine": engine, "pid": os.getpid(), "time": time.time()}
    path.write_text(json.dumps(record))
    return path


def _alive(url: str) -> bool:
    try:
        return httpx2.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx2.HTTPError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address (127.evil.example is a name)
        return False


def trusted_endpoint(url: str, ref: str, namespace: str = SERVING_NAMESPACE, service_of: str | None = None) -> str:
    """A `deploy.endpoint` tag, when it names what the deployer writes: the model's own Service in the serving
    namespace, or loopback (where `served_version` must then agree).

    Anyone who may tag a version could otherwise send an application's prompts (and its credentials) to a
    host of their choosing, or to another Service of theirs; only the deployer may create Services in the
    serving namespace (infra/k8s/base/deployer-rbac.yaml), and it names each after its model.
    """
    name = service_of or parse_ref(ref)[0]  # an adapter's endpoint is its base's Service
    parsed = urlsplit(url)
    host = parsed.hostname or ""
    loopback = _is_loopback(host)
    service = f"{object_name(name)}.{namespace}.svc"
    in_cluster = host in (service, f"{service}.cluster.local")
    if parsed.scheme in ("http", "https") and (loopback or in_cluster) and not parsed.username:
        return url
    raise LookupError(
        f"{ref}: its {ENDPOINT_TAG} tag {url!r} is neither {name}'s Service in the serving namespace "
        f"({service}[.cluster.local]) nor loopback, so it was not written by the deployer; set {ENDPOINT_URL.name} "
        "to call another address on purpose"
    )


def served_version(url: str, name: str) -> str | None:
    """The version of `name` the server at `url` says it serves: our server's and TGI's /info model_id, or the
    `models:/name/VERSION` name vLLM serves under."""
    try:
        info = httpx2.get(f"{url}/info", timeout=5.0)
        if info.status_code == 200:
            model_id = str(info.json().get("model_id", ""))
            return model_id.rsplit("/", 1)[1] if model_id.startswith(f"models:/{name}/") else None
    except (httpx2.HTTPError, ValueError, AttributeError):
        return None
    ids = served_models(url)  # vLLM: no /info; its second served name says the version
    prefix = f"models:/{name}/"
    return next((i.removeprefix(prefix) for i in ids if i.startswith(prefix)), None)


def deployed_endpoint(version, ref: str, namespace: str = SERVING_NAMESPACE) -> str:
    """The endpoint the deployer recorded for `version`, when what it recorded holds: the version is
    `deploy.status=deployed`, the tag names its own Service (or loopback), and a loopback server says it
    serves this very version."""
    tags = version.tags
    if tags.get(STATUS_TAG) != DeployStatus.DEPLOYED:
        why = f": {tags[REASON_TAG]}" if tags.get(REASON_TAG) else ""
        raise LookupError(
            f"{ref} names version {version.version}, which is deploy.status={tags.get(STATUS_TAG) or 'unset'}{why}; "
            "nothing the deployer started serves it"
        )
    if not tags.get(ENDPOINT_TAG):
        raise LookupError(f"{ref} names version {version.version}, which is deployed but has no {ENDPOINT_TAG} tag")
    name, number = version.name, version.version
    if kind_of(tags) == ModelKind.ADAPTER:  # it serves on its base's deployment, which the deployer named
        name, number = placed_base(version, ref, parse_ref(ref)[1])
    url = trusted_endpoint(tags[ENDPOINT_TAG], ref, namespace, service_of=name).rstrip("/")
    host = urlsplit(url).hostname or ""
    if _is_loopback(host) and served_version(url, name) != number:
        raise LookupError(f"{ref}: the server at {url} does not serve version {number} of {name}")
    if _is_loopback(host) and name != version.name and version.name not in served_models(url):
        raise LookupError(f"{ref}: the server at {url} serves {name} without the adapter {version.name}")
    return url


@dataclass(frozen=True)
class Endpoint:
    url: str
    engine: str | None  # tgi or vllm, as the deployer or `llmops serve` recorded it; None: ask the server
    model: str  # the name the engine serves it under (vLLM checks it; TGI ignores it)
    labels: tuple[str, ...] = ()  # the version's label set, for constrained answers
    adapter: bool = False  # an adapter version: `model` names the adapter on its base's server
    contract: tuple[str, str] = ("", "")  # the system prompt and user prefix it was trained with


def find_endpoint(ref: str, namespace: str = SERVING_NAMESPACE) -> Endpoint:
    name, alias = parse_ref(ref)
    override = ENDPOINT_URL.get()
    version = _aliased(name, alias, strict=not override)  # read once: its endpoint, its labels, its number
    labels = label_set(version.tags) if version else ()
    if override:
        if version and kind_of(version.tags) == ModelKind.ADAPTER:  # the override names the base's server
            return Endpoint(override.rstrip("/"), None, name, labels, True, contract_of(version.tags))
        return Endpoint(override.rstrip("/"), None, name, labels)
    if version and (version.tags.get(ENDPOINT_TAG) or version.tags.get(STATUS_TAG)):
        url = deployed_endpoint(version, f"{name}@{alias}", namespace)
        if kind_of(version.tags) == ModelKind.ADAPTER:
            return Endpoint(url, version.tags.get(SERVED_ENGINE_TAG), name, labels, True, contract_of(version.tags))
        return Endpoint(url, version.tags.get(SERVED_ENGINE_TAG), name, labels)
    record = records_dir() / f"{name}@{alias}.json"
    if record.exists():
        found = json.loads(record.read_text())
        # with a registry at hand, the server must serve the alias's version
        if _alive(found["url"]) and (version is None or served_version(found["url"], name) == version.version):
            return Endpoint(found["url"], found.get("engine", "tgi"), name, labels)
    raise LookupError(
        f"no endpoint serves {name}@{alias}: deploy it (set the alias with a deployer running) "
        f"or start one with `llmops serve models:/{name}@{alias}`"
    )


def label_set(tags: dict) -> tuple[str, ...]:
    return tuple(json.loads(tags[PROMPT_LABEL_SET])) if tags.get(PROMPT_LABEL_SET) else ()


def _aliased(name: str, alias: str, strict: bool):
    """The version behind name@alias when a registry is set (None without one); a missing alias is a
    LookupError when `strict`, else None."""
    if not TRACKING_URI.is_set():
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if strict:
            raise LookupError(f"no version of {name!r} carries the alias {alias!r}: {err.message}") from err
        return None


def engine_of(url: str) -> str:
    """TGI (and our server) answer /info; vLLM has no such route."""
    try:
        return "tgi" if httpx2.get(f"{url}/info", timeout=5.0).status_code == 200 else "vllm"
    except httpx2.HTTPError:
        return "tgi"


# The characters Rust's regex crate (TGI, llguidance) treats as syntax; escaping any other one is an error there.
REGEX_SYNTAX = set("\\.+*?()|[]{}^$#&-~")


def label_regex(labels: tuple[str, ...]) -> str:
    """A regex matching exactly one of the labels, valid for Python, Rust (TGI) and llguidance alike."""

    def escaped(label: str) -> str:
        return "".join("\\" + c if c in REGEX_SYNTAX else c for c in label)

    return "(" + "|".join(escaped(label) for label in labels) + ")"


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
    constrained: bool = False,
    namespace: str = SERVING_NAMESPACE,
):
    """A LangChain chat model over the endpoint serving `ref` ("name@alias"): ChatHuggingFace on TGI and our
    server, ChatOpenAI on vLLM. An adapter version ("name-adapter@champion") is reached on its base's endpoint,
    named by `model` over the OpenAI route of either engine, its prompt contract applied to bare messages.
    constrained=True: every answer is one label of the version's label set, decoded
    under that constraint by the engine itself (TGI's regex grammar; vLLM's structured outputs)."""
    endpoint = find_endpoint(ref, namespace)
    engine = endpoint.engine or engine_of(endpoint.url)
    if constrained and not endpoint.labels:
        raise LookupError(f"{ref} has no {PROMPT_LABEL_SET} tag: only a label task's version can answer constrained")
    # Both engines sample unless temperature is 0, and the wrappers default to sampling: greedy must be explicit.
    temperature = temperature or 0.0
    if engine == "vllm" or endpoint.adapter:  # an adapter is named by `model`, which only the OpenAI route reads
        from serving.contract_chat import ContractChatOpenAI

        extra = None
        if constrained:
            extra = (
                {"structured_outputs": {"choice": list(endpoint.labels)}}
                if engine == "vllm"
                else {"response_format": {"type": "regex", "value": label_regex(endpoint.labels)}}
            )
        return ContractChatOpenAI(
            contract=endpoint.contract,
            base_url=f"{endpoint.url}/v1",
            api_key="EMPTY",  # vLLM started without --api-key checks none
            model=endpoint.model,
            temperature=temperature,
            max_tokens=max_new_tokens,
            timeout=timeout,
            max_retries=retries,  # the openai client retries 429, 5xx and connection errors with backoff
            streaming=streaming,
            extra_body=extra,
        )
    from langchain_huggingface import ChatHuggingFace, HuggingFaceEndpoint

    install_retries(attempts=retries, timeout=timeout)
    llm = HuggingFaceEndpoint(
        endpoint_url=endpoint.url,
        max_new_tokens=max_new_tokens,
        timeout=timeout,
        streaming=streaming,
        temperature=temperature,
        do_sample=temperature > 0,
    )
    chat = ChatHuggingFace(llm=llm, temperature=temperature, max_tokens=max_new_tokens)
    if constrained:
        return chat.bind(response_format={"type": "regex", "value": label_regex(endpoint.labels)})
    return chat
