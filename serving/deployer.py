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

from components.registry_tags import (
    BACKEND_TAG,
    BASE_MANIFEST_TAG,
    ENDPOINT_TAG,
    GATE_OVERRIDE,
    GATE_OVERRIDE_KEPT_TAG,
    GATE_VERDICT,
    MANIFEST_TAG,
    REASON_TAG,
    RECORDED_MANIFEST,
    SERVED_ENGINE_TAG,
    STATUS_TAG,
    TIME_TAG,
    DeployStatus,
    ModelKind,
    Verdict,
    kind_of,
)
from serving.adapter_rolls import AdapterRolls
from serving.admission import candidate_refusal, promotion_refusal
from serving.backends import Backend, DeployOutcome, ShuttingDown, Target
from serving.placement import keys, place

log = logging.getLogger("llmops.deployer")


class Deployer(AdapterRolls):
    def __init__(
        self,
        backend: Backend,
        alias: str = "champion",
        client=None,
        interval_s: float = 30.0,
        models: list[str] | None = None,
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
        self.recorded: dict[str, dict] = {}  # registration run -> its params (the digests it recorded)
        self.failed_sets: dict[str, tuple] = {}  # base -> an adapter set whose rollout failed (tried once)

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
            served, refused = place(desired, self._refusal, self.alias)
            for name, reason in refused.items():
                target = desired[name]
                try:
                    if target.tags.get(STATUS_TAG) != DeployStatus.REFUSED or target.tags.get(REASON_TAG) != reason:
                        actions.append(self._refuse(target, reason))
                except Exception:  # noqa: BLE001 - the next pass tries again
                    log.exception("refusing %s version %s failed", name, target.version)
                    actions.append(f"error {name}/{target.version}")
            for name, target in served.items():
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

    def _refusal(self, target: Target) -> str | None:
        return (
            candidate_refusal(target.name, target.version)
            or promotion_refusal(target.tags)
            or self._tag_refusal(target)
        )

    def _converge(self, target: Target) -> str | None:
        actual = self.backend.actual(target.name)
        self.state[target.name] = {"desired": target.version, "actual": actual and actual.get("version")}
        same_version = actual and actual.get("version") == target.version and actual.get("run_id") == target.run_id
        if same_version and tuple(actual.get("adapters", ())) == keys(target.adapters):
            # Named by the cluster but not recorded as deployed: a deployer stopped mid-rollout, a rollback that
            # failed, a hand-edited tag. The cluster settles it: wait for the rollout, or roll it back.
            if target.tags.get(STATUS_TAG) != DeployStatus.DEPLOYED:
                outcome = self.backend.finish(target, actual)
                if not outcome.ok and (target.tags.get(STATUS_TAG), target.tags.get(REASON_TAG)) == (
                    DeployStatus.FAILED,
                    outcome.reason,
                ):
                    return None  # settled as failed before (nothing to roll back to), and still so
                return self._record(target, outcome, engine=actual.get("engine"))
            if target.tags.get(ENDPOINT_TAG) != (endpoint := self.backend.endpoint(target.name)):
                return self._retag(target, {ENDPOINT_TAG: endpoint})
            self._record_adapters(target, DeployOutcome.serving(endpoint), actual.get("engine"))
            return None
        if refusal := self._refusal(target) or self.backend.refusal(target):
            self._record_adapters(target, DeployOutcome.failed(f"its base {target.name}/{target.version} was "
                                  f"refused: {refusal}"), status=DeployStatus.REFUSED)  # fmt: skip
            if target.tags.get(STATUS_TAG) != DeployStatus.REFUSED or target.tags.get(REASON_TAG) != refusal:
                return self._refuse(target, refusal)
            return None  # the endpoint keeps what it serves
        if same_version and target.tags.get(STATUS_TAG) == DeployStatus.DEPLOYED:
            return self._roll_adapters(target, actual)  # the base serves on; only its adapter set changes
        if target.tags.get(STATUS_TAG) == DeployStatus.FAILED and target.tags.get(BACKEND_TAG) == self.backend.kind:
            why = f"its base {target.name}/{target.version} failed here before: {target.tags.get(REASON_TAG, '')}"
            self._record_adapters(target, DeployOutcome.failed(why))
            return None  # it failed here before; moving the alias (or deleting the tag) retries
        done = self._deploy(target)
        if actual and actual.get("version") != target.version and done.startswith("deployed"):
            self._supersede(target.name, actual["version"])
        if actual and done.startswith("deployed"):  # adapters the rolled base no longer serves
            self._supersede_adapters(set(actual.get("adapters", ())) - set(keys(target.adapters)))
        return done

    def _supersede(self, name: str, version: str) -> None:
        """The version that served before says it no longer does: an alias moved back to it must not lead
        applications to the endpoint (which serves its successor) until the deployer has deployed it again."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_model_version_tag(name, version, STATUS_TAG, DeployStatus.SUPERSEDED)
        except MlflowException:  # deleted meanwhile: nothing to say it on
            log.warning("could not mark %s version %s superseded", name, version)

    def _tag_refusal(self, target: Target) -> str | None:
        """The version's manifest tag must be the digest its registration run recorded: a run's params never
        change, a tag can, and what serves is checked against the tag (pinned into the pod at deploy time).
        A run registers a merged model, an adapter and a base, each recorded under its own param; an adapter's
        pointer to its base (BASE_MANIFEST_TAG) is pinned the same way."""
        from mlflow.exceptions import MlflowException

        checks = [(MANIFEST_TAG, RECORDED_MANIFEST[kind_of(target.tags)])]
        if kind_of(target.tags) == ModelKind.ADAPTER:
            checks.append((BASE_MANIFEST_TAG, BASE_MANIFEST_TAG))
        for tag, param in checks:
            try:
                if target.run_id not in self.recorded:  # params never change: one read per run
                    self.recorded[target.run_id] = dict(self.client.get_run(target.run_id).data.params)
                recorded = self.recorded[target.run_id].get(param)
            except MlflowException as err:
                return (
                    f"could not read the registration run {target.run_id} to check {tag} ({err.error_code}): "
                    "the deployer needs READ on the run's experiment. Nothing was deployed"
                )
            if not recorded or recorded != target.tags.get(tag):
                return (
                    f"the version's {tag} tag is {target.tags.get(tag) or 'missing'}, but its registration run "
                    f"recorded {param}={recorded or 'none'}: the tag was changed after registration (or the "
                    "version was not registered by the register stage). Nothing was deployed"
                )
        return None

    def _gone(self, desired: dict[str, Target]) -> list[str]:
        """Models served here whose alias (or registration) is gone in two passes in a row, and confirmed gone by
        a direct read: a listing that lacks a model (a search cut short, a permission revoked) never takes an
        endpoint down."""
        served = {n for n in self.backend.managed() if not self.models or n in self.models}
        absent = served - desired.keys()
        self.absent = {name: self.absent.get(name, 0) + 1 for name in absent}
        return sorted(name for name, passes in self.absent.items() if passes >= 2 and self._confirmed_gone(name))

    def _confirmed_gone(self, name: str) -> bool:
        """The registry says, when asked for this model by name, that it or its alias no longer exists. Any other
        answer (a 403 after a revoked permission, an outage) keeps what serves."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(name)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return True
            log.warning(
                "%s is missing from the listing, but reading it said %s: it keeps serving", name, err.error_code
            )
            return False
        return self.alias not in (model.aliases or {})

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
                self.client.set_model_version_tag(name, actual["version"], STATUS_TAG, DeployStatus.RETIRED)
            except MlflowException:  # the model itself was deleted: nothing to tag
                pass
        return f"retired {name}"

    def _refuse(self, target: Target, reason: str) -> str:
        log.warning("refused %s version %s: %s", target.name, target.version, reason)
        self.client.set_model_version_tag(target.name, target.version, TIME_TAG, datetime.now(timezone.utc).isoformat())
        self.client.set_model_version_tag(target.name, target.version, REASON_TAG, reason)
        self.client.set_model_version_tag(target.name, target.version, STATUS_TAG, DeployStatus.REFUSED)
        return f"refused {target.name}/{target.version}"

    def _deploy(self, target: Target) -> str:
        # Reached only past promotion_refusal: a version whose gate did not pass carries a person's override.
        override = target.tags.get(GATE_OVERRIDE, "").strip() if target.tags.get(GATE_VERDICT) != Verdict.PASSED else ""
        if override:
            log.warning(
                "deploying %s version %s although its gate %s: overridden (%s)",
                target.name,
                target.version,
                target.tags.get(GATE_VERDICT) or "never ran",
                override,
            )
        log.info("deploying %s version %s", target.name, target.version)
        self.client.set_model_version_tag(target.name, target.version, STATUS_TAG, DeployStatus.DEPLOYING)
        try:
            outcome = self.backend.deploy(target)
        except ShuttingDown:  # not attempted: deploy.status stays `deploying`, so the next start deploys it
            return f"interrupted {target.name}/{target.version}"
        except Exception as err:  # a broken deploy must not stop the loop; it is recorded on the version
            log.exception("deploy of %s/%s failed", target.name, target.version)
            outcome = DeployOutcome.failed(f"error: {err}"[:500])
        return self._record(target, outcome, override)

    def _record(self, target: Target, outcome: DeployOutcome, override: str = "", engine: str | None = None) -> str:
        """The outcome on the version. The status goes last: whoever sees deploy.status=deployed also finds the
        endpoint and time."""
        ok, endpoint = outcome.ok, outcome.endpoint
        tags = {TIME_TAG: datetime.now(timezone.utc).isoformat(), BACKEND_TAG: self.backend.kind}
        if ok:
            tags[ENDPOINT_TAG] = endpoint
            tags[SERVED_ENGINE_TAG] = engine or self.backend.engine(target)  # what runs, where the backend knows
        else:
            tags[REASON_TAG] = outcome.reason
        if override:
            tags[GATE_OVERRIDE_KEPT_TAG] = override
        tags[STATUS_TAG] = DeployStatus.DEPLOYED if ok else DeployStatus.FAILED
        if ok and self.backend.kind == "local":
            from serving.client import write_local_record

            write_local_record(target.name, self.alias, endpoint, target.version, tags[SERVED_ENGINE_TAG])
        for key, value in tags.items():
            self.client.set_model_version_tag(target.name, target.version, key, value)
        placed = outcome if ok else DeployOutcome.failed(f"its base {target.name}/{target.version} did not deploy: "
                                                          f"{outcome.reason}")  # fmt: skip
        self._record_adapters(target, placed, tags.get(SERVED_ENGINE_TAG))
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
