"""The application side of an adapter version: the base deployment that serves it, checked against the base's own
version, what that server answers to, and the prompt contract a client frames a bare message with."""

from __future__ import annotations

import httpx2

from components.registry_tags import (
    BASE_MANIFEST_TAG,
    ENDPOINT_TAG,
    KIND_TAG,
    MANIFEST_TAG,
    PLACED_ON_TAG,
    PROMPT_SYSTEM,
    PROMPT_USER_PREFIX,
    STATUS_TAG,
    DeployStatus,
    ModelKind,
    kind_of,
)


def placed_base(adapter, ref: str, alias: str) -> tuple[str, str]:
    """(name, version) of the base deployment an adapter version serves on, when the base agrees: it is a base
    version under the same alias, deployed at the same endpoint, with the manifest the adapter names. Tags on the
    adapter alone (anyone who may tag it can write them) never send an application to another model's Service."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tags = adapter.tags
    name, _, number = tags.get(PLACED_ON_TAG, "").rpartition("/")
    if not name:
        raise LookupError(f"{ref} is an adapter with no {PLACED_ON_TAG} tag: no base deployment serves it")
    try:
        base = MlflowClient().get_model_version(name, number)
    except MlflowException as err:
        raise LookupError(f"{ref}: its base {name}/{number} cannot be read: {err.message}") from err
    held = {
        f"{KIND_TAG}={ModelKind.BASE}": kind_of(base.tags) == ModelKind.BASE,
        f"the alias {alias}": alias in (base.aliases or []),
        f"{STATUS_TAG}={DeployStatus.DEPLOYED}": base.tags.get(STATUS_TAG) == DeployStatus.DEPLOYED,
        f"the adapter's {ENDPOINT_TAG}": base.tags.get(ENDPOINT_TAG) == tags.get(ENDPOINT_TAG),
        f"the {MANIFEST_TAG} the adapter names": base.tags.get(MANIFEST_TAG) == tags.get(BASE_MANIFEST_TAG),
    }
    if missing := [what for what, ok in held.items() if not ok]:
        raise LookupError(f"{ref}: its base {name}/{number} lacks {', '.join(missing)}; not following it")
    return name, number


def served_models(url: str) -> list[str]:
    """The names an OpenAI-speaking server answers to: the model and, on vLLM and ours, each adapter loaded."""
    try:
        return [m.get("id", "") for m in httpx2.get(f"{url}/v1/models", timeout=5.0).json().get("data", [])]
    except (httpx2.HTTPError, ValueError, AttributeError):
        return []


def contract_of(tags: dict) -> tuple[str, str]:
    """An adapter's prompt contract, as its version's tags carry it: (system prompt, user prefix)."""
    return tags.get(PROMPT_SYSTEM, ""), tags.get(PROMPT_USER_PREFIX, "")
