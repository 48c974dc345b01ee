"""A promotion's outcome as the deployer records it on the version: served at an endpoint, refused, or failed.

`llmops promote` clears the version's last outcome before it moves the alias to it, so what it then waits for
is the deployer's answer to this promotion (a `deployed` written for another alias, or by a deployer since
stopped, must not pass for it), and waits for `deploy.status` to settle, as `kubectl rollout status` waits for
a rollout. Promoting the version the alias already names clears only a refused or failed outcome: the version
that serves keeps its `deployed`, since clearing it would turn applications away until the next pass.

Promoting a candidate (a version of `<model>-candidates`, where the pipeline registers) first copies it into the
production model `<model>` with MLflow's `copy_model_version`, as MLflow recommends between environments: the
copy keeps the candidate's files, run and tags, and gets the promoter's login (as the server authenticated it),
reason and time. A candidate whose gate did not pass is copied only with an override, which the production
version keeps as `gate.override`. Promoting the same candidate again reuses its copy.
"""

from __future__ import annotations

import getpass
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from components.registry_tags import (
    DEPLOYER_TAGS,
    ENDPOINT_TAG,
    GATE_OVERRIDE,
    GATE_REASON,
    GATE_VERDICT,
    PROMOTED_BY_TAG,
    PROMOTED_FROM_TAG,
    PROMOTION_REASON_TAG,
    PROMOTION_TIME_TAG,
    REASON_TAG,
    STATUS_TAG,
    DeployStatus,
    ModelKind,
    Verdict,
    kind_of,
    production_of,
)

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


class PromotionRefused(Exception):
    """Nothing was copied and no alias moved; the message says why and what would promote it."""


def who_promotes() -> str:
    """The login MLflow's auth app authenticated this client as (its /users/current): the server's word, not
    ours. A server without logins (the laptop's) has no such route; the OS user is recorded, marked so."""
    import mlflow
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    uri = mlflow.get_tracking_uri()
    if uri.startswith("http"):
        answer = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/users/current", "GET", max_retries=2)
        if answer.status_code == 200:
            return answer.json()["user"]["username"]
    return f"{getpass.getuser()} (no MLflow login)"


def copy_candidate(client, name: str, version: str, who: str, reason: str, override: str = "") -> tuple[str, str]:
    """(production model, its version) holding candidate `name`/`version`: copied now, or the earlier copy."""
    production, candidate = production_of(name), client.get_model_version(name, version)
    passed = kind_of(candidate.tags) == ModelKind.BASE or candidate.tags.get(GATE_VERDICT) == Verdict.PASSED
    if not passed and not override.strip():
        verdict = candidate.tags.get(GATE_VERDICT) or "missing"
        raise PromotionRefused(
            f"{name}/{version}: {GATE_VERDICT} is {verdict} ({candidate.tags.get(GATE_REASON, 'no reason')}). "
            f"Nothing was copied to {production}; to promote it anyway, pass --override with your reason "
            f"(kept on the production version as {GATE_OVERRIDE})"
        )
    if not reason.strip():
        raise PromotionRefused(f"say why {name}/{version} should serve: --reason TEXT (kept on the production version)")
    source = f"models:/{name}/{version}"
    copies = [v for v in client.search_model_versions(f"name='{production}'") if v.source == source]
    copy = copies[0] if copies else client.copy_model_version(source, production)
    # The copy carries every candidate tag: an override the pipeline's login wrote, or a deployer's refusal of
    # the candidate, must not pass for this promotion's.
    for stale in (*DEPLOYER_TAGS, GATE_OVERRIDE):
        if stale in copy.tags:
            client.delete_model_version_tag(production, copy.version, stale)
    if override.strip():
        client.set_model_version_tag(production, copy.version, GATE_OVERRIDE, override.strip())
    client.set_model_version_tag(production, copy.version, PROMOTED_FROM_TAG, f"{name}/{version}")
    record_promotion(client, production, copy.version, who, reason)
    return production, str(copy.version)


def record_promotion(client, name: str, version: str, who: str, reason: str) -> None:
    """Who moved an alias to this version last, why, and when."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for key, value in ((PROMOTED_BY_TAG, who), (PROMOTION_REASON_TAG, reason.strip() or "none given"),
                       (PROMOTION_TIME_TAG, stamp)):  # fmt: skip
        client.set_model_version_tag(name, version, key, value)
