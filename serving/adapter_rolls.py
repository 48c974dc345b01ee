"""The deployer's side of adapters placed on a base (serving/placement.py decides which): rolling the base with a
new adapter set, and saying on each adapter version where it serves, or why not.

A mixin of serving.deployer.Deployer: it uses the deployer's registry client, backend, `_record` and `_supersede`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from components.registry_tags import (
    BACKEND_TAG,
    ENDPOINT_TAG,
    PLACED_ON_TAG,
    REASON_TAG,
    SERVED_ENGINE_TAG,
    STATUS_TAG,
    TIME_TAG,
    DeployStatus,
)
from serving.backends import DeployOutcome, ShuttingDown, Target
from serving.placement import keys, parse_key

log = logging.getLogger("llmops.deployer")


class AdapterRolls:
    def _roll_adapters(self, target: Target, actual: dict) -> str | None:
        """The serving base rolled with a new adapter set. A rollout that never becomes ready leaves the set that
        served (the backend rolls back): the base and those adapters stay deployed, and only the adapters it
        added say failed, and why. The same set is not tried again until one of them is promoted again."""
        served = set(actual.get("adapters", ()))
        added = [a for a in target.adapters if a.key not in served]
        if added and all(a.tags.get(STATUS_TAG) == DeployStatus.FAILED for a in added):
            return None  # `llmops promote` clears an adapter's failed outcome, and the next pass retries
        if not added and self.failed_sets.get(target.name) == keys(target.adapters):
            return None
        log.info("rolling %s version %s with adapters %s", target.name, target.version, keys(target.adapters))
        try:
            outcome = self.backend.deploy(target)
        except ShuttingDown:
            return f"interrupted {target.name}/{target.version}"
        except Exception as err:  # noqa: BLE001 - recorded on the adapters, the loop goes on
            log.exception("adapter roll of %s/%s failed", target.name, target.version)
            outcome = DeployOutcome.failed(f"error: {err}"[:500])
        if outcome.ok:
            self.failed_sets.pop(target.name, None)
            self._supersede_adapters(served - set(keys(target.adapters)))
            return self._record(target, outcome)
        self.failed_sets[target.name] = keys(target.adapters)
        why = f"its base {target.name}/{target.version} kept the adapters that served: {outcome.reason}"
        for adapter in added:
            self._record_one(adapter, target, DeployOutcome.failed(why), None, DeployStatus.FAILED)
        return f"failed {target.name}/{target.version} adapters"

    def _supersede_adapters(self, removed: set[str]) -> None:
        for name, version in sorted(parse_key(key) for key in removed):
            self._supersede(name, version)

    def _record_adapters(
        self, target: Target, outcome: DeployOutcome, engine: str | None = None, status: DeployStatus | None = None
    ) -> None:
        """Each adapter placed on the base says where it serves (the base's endpoint, under its own name), or why
        not; only tags that differ are written, so a settled pass writes nothing."""
        for adapter in target.adapters:
            self._record_one(adapter, target, outcome, engine, status)

    def _record_one(self, adapter, target: Target, outcome: DeployOutcome, engine, status) -> None:
        current = adapter.tags  # read by this pass's desired(): a settled pass reads and writes nothing more
        tags = {PLACED_ON_TAG: f"{target.name}/{target.version}", BACKEND_TAG: self.backend.kind}
        if outcome.ok:
            tags.update({ENDPOINT_TAG: outcome.endpoint, SERVED_ENGINE_TAG: engine or self.backend.engine(target)})
        else:
            tags[REASON_TAG] = outcome.reason
        tags[STATUS_TAG] = status or (DeployStatus.DEPLOYED if outcome.ok else DeployStatus.FAILED)
        changed = {k: v for k, v in tags.items() if current.get(k) != v}
        if outcome.ok and REASON_TAG in current:  # a refusal from before its base served no longer holds
            self.client.delete_model_version_tag(adapter.name, adapter.version, REASON_TAG)
        if changed:
            changed[TIME_TAG] = datetime.now(timezone.utc).isoformat()
            changed[STATUS_TAG] = tags[STATUS_TAG]  # last, as for a model
            for key, value in changed.items():
                self.client.set_model_version_tag(adapter.name, adapter.version, key, value)
