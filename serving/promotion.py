"""A promotion's outcome as the deployer records it on the version: served at an endpoint, refused, or failed.

`llmops promote` clears the version's last outcome before it moves the alias to it, so what it then waits for
is the deployer's answer to this promotion (a `deployed` written for another alias, or by a deployer since
stopped, must not pass for it), and waits for `deploy.status` to settle, as `kubectl rollout status` waits for
a rollout. Promoting the version the alias already names clears only a refused or failed outcome: the version
that serves keeps its `deployed`, since clearing it would turn applications away until the next pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from components.registry_tags import ENDPOINT_TAG, REASON_TAG, STATUS_TAG, DeployStatus

RETRIED = (DeployStatus.REFUSED, DeployStatus.FAILED)  # cleared by a promotion, so the deployer decides again


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status: str  # deployed, refused, failed, or waiting (no deployer answered in time)
    message: str


def clear_outcome(client, name: str, version: str, alias: str) -> None:
    mv = client.get_model_version(name, version)
    status, already = mv.tags.get(STATUS_TAG), alias in (mv.aliases or [])
    if status in RETRIED or (status and not already):
        client.delete_model_version_tag(name, version, STATUS_TAG)


def read_outcome(tags: dict, name: str, version: str) -> Outcome | None:
    status = tags.get(STATUS_TAG)
    if status == DeployStatus.DEPLOYED:
        return Outcome(True, status, f"{name}/{version} serves at {tags.get(ENDPOINT_TAG)}")
    if status in RETRIED:
        return Outcome(False, status, f"{name}/{version} {status}: {tags.get(REASON_TAG, 'no reason recorded')}")
    return None


def await_outcome(client, name: str, version: str, timeout_s: float, poll_s: float = 1.0) -> Outcome:
    """Poll the version's tags until the deployer settles them, or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if outcome := read_outcome(client.get_model_version(name, version).tags, name, version):
            return outcome
        if time.monotonic() >= deadline:
            return Outcome(
                False,
                "waiting",
                f"no deployer settled {name}/{version} within {timeout_s:.0f}s: is `llmops deployer` running "
                "(and its webhook registered, or its reconcile interval short)? The alias is set; the deployer "
                "acts on it when it runs",
            )
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
