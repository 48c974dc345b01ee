"""The deployer: registry alias → serving. Webhooks make it fast; the reconcile loop makes it right.

Desired state: the version behind the alias (`deploy.alias`, default champion) of every registered model.
Actual state: the Deployment's annotations (plus /info model_sha where the server reports one), or the
local server's /info. A reconcile pass deploys only where the two differ, so a lost webhook, a replayed
one, or a restart of the deployer all converge on the same state without repeating work.

A pass also heals what a crash or a person left behind: a version the cluster names but whose tags do not say
`deployed` (a deployer stopped mid-rollout, a rollback that failed, a hand-edited tag) is settled from the
cluster: its rollout finished, or rolled back; a serving version's drifted endpoint tag is restored; and a
model whose alias or registration has been gone for two passes stops serving (scaled to zero).
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone

from serving.backends import ShuttingDown, Target

log = logging.getLogger("llmops.deployer")
STATUS_TAG, TIME_TAG, ENDPOINT_TAG, BACKEND_TAG = "deploy.status", "deploy.time", "deploy.endpoint", "deploy.backend"
REASON_TAG, OVERRIDE_TAG = "deploy.reason", "gate.override"


def promotion_refusal(tags: dict) -> str | None:
    """Why a version may not serve, or None. Only a passed gate deploys, unless a person overrides it on
    purpose: the tag gate.override holds their reason."""
    if tags.get("gate.verdict") == "passed" or tags.get(OVERRIDE_TAG, "").strip():
        return None
    verdict = tags.get("gate.verdict") or "missing"
    why = f": {tags['gate.reason']}" if tags.get("gate.reason") else ""
    return (
        f"gate.verdict is {verdict}{why}. Nothing was deployed; to serve it anyway, set the tag "
        f"{OVERRIDE_TAG} to your reason"
    )


class Deployer:
    def __init__(
        self, backend, alias: str = "champion", client=None, interval_s: float = 30.0, models: list[str] | None = None
    ):
        from mlflow import MlflowClient

        self.backend, self.alias, self.interval_s = backend, alias, interval_s
        self.models = set(models or ())  # an allowlist of registered model names; empty: every model
        self.client = client or MlflowClient()
        self.wake = threading.Event()
        self.lock = threading.Lock()  # webhooks and the timer never deploy at the same time
        self.state: dict[str, dict] = {}
        self.passes = 0
        self.page_size = 100
        self.absent: dict[str, int] = {}  # served model -> consecutive passes its alias was missing

    def registered(self):
        """Every registered model, page by page (the registry answers at most `page_size` per call)."""
        token = None
        while True:
            page = self.client.search_registered_models(max_results=self.page_size, page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def desired(self) -> dict[str, Target]:
        targets = {}
        for model in self.registered():
            if self.models and model.name not in self.models:
                continue
            version = (model.aliases or {}).get(self.alias)
            if version is not None:
                mv = self.client.get_model_version(model.name, str(version))
                targets[model.name] = Target(model.name, mv.version, mv.run_id, dict(mv.tags))
        return targets

    def reconcile_once(self) -> list[str]:
        """One pass over every model; returns what it did, e.g. ["deployed m/3"]. One model's trouble (an API
        error, a bug) is logged and reported as `error m/3`, and the pass goes on to the others."""
        with self.lock:
            self.passes += 1
            actions = []
            desired = self.desired()
            for name, target in desired.items():
                try:
                    if action := self._converge(target):
                        actions.append(action)
                except Exception:  # noqa: BLE001 - the next pass tries again
                    log.exception("reconcile of %s version %s failed", name, target.version)
                    actions.append(f"error {name}/{target.version}")
            for name in self._gone(desired):
                try:
                    actions.append(self._retire(name))
                except Exception:  # noqa: BLE001
                    log.exception("retiring %s failed", name)
                    actions.append(f"error {name}")
            return actions

    def _converge(self, target: Target) -> str | None:
        actual = self.backend.actual(target.name)
        self.state[target.name] = {"desired": target.version, "actual": actual and actual.get("version")}
        if actual and actual.get("version") == target.version and actual.get("run_id") == target.run_id:
            # Named by the cluster but not recorded as deployed: a deployer stopped mid-rollout, a rollback that
            # failed, a hand-edited tag. The cluster settles it: wait for the rollout, or roll it back.
            if target.tags.get(STATUS_TAG) != "deployed":
                ok, said = self.backend.finish(target, actual)
                if not ok and (target.tags.get(STATUS_TAG), target.tags.get(REASON_TAG)) == ("failed", said):
                    return None  # settled as failed before (nothing to roll back to), and still so
                return self._record(target, ok, said)
            if target.tags.get(ENDPOINT_TAG) != (endpoint := self.backend.endpoint(target.name)):
                return self._retag(target, {ENDPOINT_TAG: endpoint})
            return None
        if refusal := promotion_refusal(target.tags):
            if target.tags.get(STATUS_TAG) != "refused" or target.tags.get(REASON_TAG) != refusal:
                return self._refuse(target, refusal)
            return None  # the endpoint keeps what it serves
        if target.tags.get(STATUS_TAG) == "failed" and target.tags.get(BACKEND_TAG) == self.backend.kind:
            return None  # it failed here before; moving the alias (or deleting the tag) retries
        return self._deploy(target)

    def _gone(self, desired: dict[str, Target]) -> list[str]:
        """Models served here whose alias (or registration) is gone in two passes in a row: one registry answer
        that lacks a model (a search cut short, a permission change) never takes an endpoint down."""
        served = {n for n in self.backend.managed() if not self.models or n in self.models}
        absent = served - desired.keys()
        self.absent = {name: self.absent.get(name, 0) + 1 for name in absent}
        return sorted(name for name, passes in self.absent.items() if passes >= 2)

    def _retag(self, target: Target, tags: dict) -> str:
        log.warning("%s version %s serves, but its tags said %s; restored", target.name, target.version, tags)
        for key, value in tags.items():
            self.client.set_model_version_tag(target.name, target.version, key, value)
        return f"retagged {target.name}/{target.version}"

    def _retire(self, name: str) -> str:
        """The alias (or the model) is gone: stop serving it, and say so on the version that served, if it exists."""
        actual = self.backend.actual(name)
        reason = f"the alias {self.alias} no longer names a version of {name}"
        log.warning("scaling %s to zero: %s", name, reason)
        self.backend.retire(name, reason)
        self.state.pop(name, None)
        if actual:
            from mlflow.exceptions import MlflowException

            try:
                self.client.set_model_version_tag(name, actual["version"], REASON_TAG, reason)
                self.client.set_model_version_tag(name, actual["version"], STATUS_TAG, "retired")
            except MlflowException:  # the model itself was deleted: nothing to tag
                pass
        return f"retired {name}"

    def _refuse(self, target: Target, reason: str) -> str:
        log.warning("refused %s version %s: %s", target.name, target.version, reason)
        self.client.set_model_version_tag(target.name, target.version, REASON_TAG, reason)
        self.client.set_model_version_tag(target.name, target.version, STATUS_TAG, "refused")
        return f"refused {target.name}/{target.version}"

    def _deploy(self, target: Target) -> str:
        # Reached only past promotion_refusal: a version whose gate did not pass carries a person's override.
        override = target.tags.get(OVERRIDE_TAG, "").strip() if target.tags.get("gate.verdict") != "passed" else ""
        if override:
            log.warning(
                "deploying %s version %s although its gate %s: overridden (%s)",
                target.name,
                target.version,
                target.tags.get("gate.verdict") or "never ran",
                override,
            )
        log.info("deploying %s version %s", target.name, target.version)
        self.client.set_model_version_tag(target.name, target.version, STATUS_TAG, "deploying")
        try:
            ok, endpoint = self.backend.deploy(target)  # on failure, the second item is the reason
        except ShuttingDown:  # not attempted: deploy.status stays `deploying`, so the next start deploys it
            return f"interrupted {target.name}/{target.version}"
        except Exception as err:  # a broken deploy must not stop the loop; it is recorded on the version
            log.exception("deploy of %s/%s failed", target.name, target.version)
            ok, endpoint = False, f"error: {err}"[:500]
        return self._record(target, ok, endpoint, override)

    def _record(self, target: Target, ok: bool, endpoint: str, override: str = "") -> str:
        """The outcome on the version. The status goes last: whoever sees deploy.status=deployed also finds the
        endpoint and time."""
        tags = {TIME_TAG: datetime.now(timezone.utc).isoformat(), BACKEND_TAG: self.backend.kind}
        if ok:
            tags[ENDPOINT_TAG] = endpoint
        else:
            tags[REASON_TAG] = endpoint
        if override:
            tags["deploy.gate_override"] = override
        tags[STATUS_TAG] = "deployed" if ok else "failed"
        if ok and self.backend.kind == "local":
            from serving.client import write_local_record

            write_local_record(target.name, self.alias, endpoint, target.version)
        for key, value in tags.items():
            self.client.set_model_version_tag(target.name, target.version, key, value)
        self.state[target.name] = {
            "desired": target.version,
            "actual": target.version if ok else None,
            "status": tags[STATUS_TAG],
        }
        return f"{tags[STATUS_TAG]} {target.name}/{target.version}"

    def notify(self) -> None:
        self.wake.set()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                for action in self.reconcile_once():
                    log.info(action)
            except Exception:  # the registry or the cluster may be briefly away; try again next pass
                log.exception("reconcile pass failed")
            self.wake.wait(self.interval_s)
            self.wake.clear()
