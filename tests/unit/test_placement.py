"""Adapters you can promote: the deployer places each adapter version under the alias on the deployment of the
base it names, rolls that base only when its set of adapters changes, and refuses, on the version, an adapter
whose base, gate or manifest pin does not hold. A fake registry and backend: the deciding alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from serving.backends import DeployOutcome
from serving.deployer import Deployer
from serving.placement import keys

pytestmark = pytest.mark.unit


class Page(list):
    token = None


class Registry:
    """The calls the deployer makes on MlflowClient, over dicts; every tag write is recorded."""

    def __init__(self):
        self.models: dict[str, dict] = {}
        self.params: dict[str, dict] = {}
        self.writes: list[tuple] = []

    def add(self, name: str, version: str, tags: dict, alias: str | None = "champion", recorded: str | None = None):
        model = self.models.setdefault(name, {"aliases": {}, "versions": {}})
        run_id = f"run-{name}-{version}"
        model["versions"][version] = SimpleNamespace(
            name=name, version=version, run_id=run_id, tags=dict(tags), aliases=[]
        )
        param = {"adapter": "weights.adapter_manifest_sha256", "base": "weights.base_manifest_sha256"}.get(
            tags.get("llmops.kind"), "weights.manifest_sha256"
        )
        self.params[run_id] = {param: recorded or tags["weights.manifest_sha256"]}
        if tags.get("llmops.kind") == "adapter":  # its pointer to its base, pinned by its run
            self.params[run_id]["weights.base_manifest_sha256"] = tags["weights.base_manifest_sha256"]
        if alias:
            for other in model["versions"].values():
                other.aliases = [a for a in other.aliases if a != alias]
            model["aliases"][alias] = version
            model["versions"][version].aliases.append(alias)

    def tags(self, name: str, version: str) -> dict:
        return self.models[name]["versions"][version].tags

    def search_registered_models(self, max_results=100, page_token=None):
        return Page(SimpleNamespace(name=n, aliases=dict(m["aliases"])) for n, m in self.models.items())

    def get_registered_model(self, name):
        return SimpleNamespace(name=name, aliases=dict(self.models[name]["aliases"]))

    def get_model_version(self, name, version):
        return self.models[name]["versions"][str(version)]

    def set_model_version_tag(self, name, version, key, value):
        self.writes.append((name, version, key))
        self.tags(name, version)[key] = str(value)

    def delete_model_version_tag(self, name, version, key):
        self.writes.append((name, version, key))
        self.tags(name, version).pop(key, None)

    def get_run(self, run_id):
        return SimpleNamespace(data=SimpleNamespace(params=self.params[run_id]))


class Backend:
    kind = "local"

    def __init__(self):
        self.serving: dict[str, dict] = {}
        self.deploys: list[tuple] = []
        self.broken: set[str] = set()  # adapter keys whose rollout never becomes ready

    def engine(self, target):
        return "vllm"

    def refusal(self, target):
        return None

    def actual(self, name):
        return self.serving.get(name)

    def deploy(self, target):
        self.deploys.append((target.name, target.version, keys(target.adapters)))
        if self.broken & set(keys(target.adapters)):  # rolled back: what served goes on serving
            return DeployOutcome.failed("the rollout did not become ready within 900s and was rolled back")
        self.serving[target.name] = {
            "version": target.version,
            "run_id": target.run_id,
            "adapters": keys(target.adapters),
            "engine": "vllm",
        }
        return DeployOutcome.serving(self.endpoint(target.name))

    def finish(self, target, actual):
        return DeployOutcome.serving(self.endpoint(target.name))

    def endpoint(self, name):
        return f"http://127.0.0.1:9000/{name}"

    def managed(self):
        return set(self.serving)

    def retire(self, name, reason):
        self.serving.pop(name)

    def close(self):
        pass


GATED = {"gate.verdict": "passed"}


def base_tags(digest: str = "base-digest") -> dict:
    return {"llmops.kind": "base", "weights.manifest_sha256": digest}


def adapter_tags(digest: str, base: str = "base-digest") -> dict:
    return {
        "llmops.kind": "adapter",
        "weights.manifest_sha256": digest,
        "weights.base_manifest_sha256": base,
        "llmops.lora_rank": "8",
        **GATED,
    }


@pytest.fixture()
def world():
    registry, backend = Registry(), Backend()
    registry.add("m-base", "1", base_tags())  # a base needs no gate of its own: its adapters were gated
    registry.add("banking-adapter", "1", adapter_tags("a1"))
    registry.add("alpaca-adapter", "1", adapter_tags("b1"))
    return registry, backend, Deployer(backend, client=registry)


def test_two_adapters_of_one_base_share_one_deployment_and_each_says_where_it_serves(world):
    registry, backend, deployer = world
    assert deployer.reconcile_once() == ["deployed m-base/1"]
    assert backend.deploys == [("m-base", "1", ("alpaca-adapter/1@b1", "banking-adapter/1@a1"))]
    for name in ("banking-adapter", "alpaca-adapter"):
        tags = registry.tags(name, "1")
        assert tags["deploy.status"] == "deployed" and tags["deploy.base"] == "m-base/1"
        assert tags["deploy.endpoint"] == backend.endpoint("m-base") and tags["deploy.served_engine"] == "vllm"
    writes = len(registry.writes)
    assert deployer.reconcile_once() == [] and len(backend.deploys) == 1
    assert len(registry.writes) == writes, "a settled pass wrote tags"


def test_an_adapter_on_a_base_nobody_serves_is_refused_with_the_reason_on_its_version(world):
    registry, backend, deployer = world
    registry.add(
        "stray-adapter", "1", {**adapter_tags("c1", base="another-base"), "llmops.base_version": "other-base/4"}
    )
    actions = deployer.reconcile_once()
    assert "refused stray-adapter/1" in actions and "deployed m-base/1" in actions
    tags = registry.tags("stray-adapter", "1")
    assert tags["deploy.status"] == "refused"
    assert "another-base" in tags["deploy.reason"] and "no running deployment has the weights" in tags["deploy.reason"]
    assert "`llmops promote other-base 4 --alias champion --reason TEXT`" in tags["deploy.reason"]
    assert backend.deploys[0][2] == ("alpaca-adapter/1@b1", "banking-adapter/1@a1")
    assert deployer.reconcile_once() == [], "the refusal is written once"
    # its base promoted later: placed, and the refusal no longer stands on it
    registry.add("other-base", "4", base_tags("another-base"))
    assert "deployed other-base/4" in deployer.reconcile_once()
    assert tags["deploy.status"] == "deployed" and "deploy.reason" not in tags


def test_an_adapter_whose_gate_failed_or_whose_pin_was_edited_is_refused_and_not_loaded(world):
    registry, backend, deployer = world
    registry.tags("banking-adapter", "1")["gate.verdict"] = "failed"
    registry.add("edited-adapter", "1", adapter_tags("d1"), recorded="d0")  # the tag differs from the run's param
    deployer.reconcile_once()
    assert backend.deploys == [("m-base", "1", ("alpaca-adapter/1@b1",))]
    assert registry.tags("banking-adapter", "1")["deploy.status"] == "refused"
    assert "gate.verdict is failed" in registry.tags("banking-adapter", "1")["deploy.reason"]
    edited = registry.tags("edited-adapter", "1")["deploy.reason"]
    assert "weights.adapter_manifest_sha256=d0" in edited and "changed after registration" in edited


def test_moving_an_adapters_alias_rolls_its_base_once_and_the_old_version_is_superseded(world):
    registry, backend, deployer = world
    deployer.reconcile_once()
    registry.add("banking-adapter", "2", adapter_tags("a2"))  # the alias moves to version 2
    assert deployer.reconcile_once() == ["deployed m-base/1"]
    assert backend.deploys[-1] == ("m-base", "1", ("alpaca-adapter/1@b1", "banking-adapter/2@a2"))
    assert registry.tags("banking-adapter", "1")["deploy.status"] == "superseded"
    assert registry.tags("banking-adapter", "2")["deploy.status"] == "deployed"
    assert registry.tags("alpaca-adapter", "1")["deploy.status"] == "deployed"
    assert deployer.reconcile_once() == [] and len(backend.deploys) == 2


def test_a_base_deploys_without_a_gate_but_a_merged_model_does_not():
    registry, backend = Registry(), Backend()
    registry.add("m-base", "1", base_tags())
    registry.add("m", "1", {"weights.manifest_sha256": "m1"})
    actions = Deployer(backend, client=registry).reconcile_once()
    assert sorted(actions) == ["deployed m-base/1", "refused m/1"]


def test_a_candidates_model_never_serves_whatever_alias_its_owner_sets():
    """The pipeline's login owns its candidates models and can set `champion` there: a model, a base and an
    adapter under it are each refused, saying how to promote; the production copy of the same version serves."""
    registry, backend = Registry(), Backend()
    registry.add("m-candidates", "3", {"weights.manifest_sha256": "m3", **GATED})
    registry.add("m-base-candidates", "1", base_tags())
    registry.add("m-adapter-candidates", "2", adapter_tags("a2"))
    deployer = Deployer(backend, client=registry)
    actions = deployer.reconcile_once()
    assert sorted(actions) == [
        "refused m-adapter-candidates/2",
        "refused m-base-candidates/1",
        "refused m-candidates/3",
    ]
    assert backend.deploys == []
    reason = registry.tags("m-candidates", "3")["deploy.reason"]
    assert "only a production model serves" in reason and "`llmops promote m-candidates 3 --reason TEXT`" in reason
    registry.add("m", "1", {"weights.manifest_sha256": "m3", **GATED})  # what `llmops promote` copies
    assert "deployed m/1" in deployer.reconcile_once()


def test_an_adapter_set_that_never_becomes_ready_leaves_the_base_and_its_adapters_serving(world):
    """The base keeps the set that served: it and those adapters stay deployed; only the adapter the failed set
    added says failed, and why. The same set is not tried every pass; promoting the adapter again retries it."""
    registry, backend, deployer = world
    deployer.reconcile_once()
    registry.add("banking-adapter", "2", adapter_tags("a2"))
    backend.broken.add("banking-adapter/2@a2")
    assert deployer.reconcile_once() == ["failed m-base/1 adapters"]
    assert registry.tags("m-base", "1")["deploy.status"] == "deployed"
    assert registry.tags("alpaca-adapter", "1")["deploy.status"] == "deployed"
    assert registry.tags("banking-adapter", "1")["deploy.status"] == "deployed"  # still served: not superseded
    failed = registry.tags("banking-adapter", "2")
    assert failed["deploy.status"] == "failed" and "kept the adapters that served" in failed["deploy.reason"]
    assert deployer.reconcile_once() == [] and len(backend.deploys) == 2  # not retried every pass
    backend.broken.clear()
    registry.delete_model_version_tag("banking-adapter", "2", "deploy.status")  # what `llmops promote` clears
    assert deployer.reconcile_once() == ["deployed m-base/1"]
    assert registry.tags("banking-adapter", "2")["deploy.status"] == "deployed"
    assert registry.tags("banking-adapter", "1")["deploy.status"] == "superseded"


def test_an_adapter_with_a_rank_no_engine_takes_or_an_edited_base_pointer_is_refused_alone(world):
    registry, backend, deployer = world
    registry.add("huge-adapter", "1", {**adapter_tags("h1"), "llmops.lora_rank": "1024"})
    registry.add("garbled-adapter", "1", {**adapter_tags("g1"), "llmops.lora_rank": "sixteen"})
    registry.add("moved-adapter", "1", adapter_tags("m1"))
    registry.tags("moved-adapter", "1")["weights.base_manifest_sha256"] = "another-base"
    registry.add("other-base", "1", base_tags("another-base"))
    actions = deployer.reconcile_once()
    assert {"refused huge-adapter/1", "refused garbled-adapter/1", "refused moved-adapter/1"} <= set(actions)
    assert "largest --max-lora-rank" in registry.tags("huge-adapter", "1")["deploy.reason"]
    assert "'sixteen'" in registry.tags("garbled-adapter", "1")["deploy.reason"]
    moved = registry.tags("moved-adapter", "1")["deploy.reason"]
    assert "weights.base_manifest_sha256 tag is another-base" in moved and "changed after registration" in moved
    assert backend.deploys[0] == ("m-base", "1", ("alpaca-adapter/1@b1", "banking-adapter/1@a1"))
    assert ("other-base", "1", ()) in backend.deploys


def test_adapters_on_a_refused_base_say_so(world):
    registry, backend, deployer = world
    registry.tags("m-base", "1")["weights.manifest_sha256"] = "edited"  # the run recorded base-digest
    for name in ("banking-adapter", "alpaca-adapter"):
        registry.tags(name, "1")["weights.base_manifest_sha256"] = "edited"
        registry.params[f"run-{name}-1"]["weights.base_manifest_sha256"] = "edited"
    assert deployer.reconcile_once() == ["refused m-base/1"]
    tags = registry.tags("banking-adapter", "1")
    assert tags["deploy.status"] == "refused" and "its base m-base/1 was refused" in tags["deploy.reason"]


def test_an_application_follows_an_adapter_only_to_the_base_that_says_it_serves_it(world, monkeypatch):
    import mlflow

    from serving.adapter_client import placed_base

    registry, backend, deployer = world
    deployer.reconcile_once()
    monkeypatch.setattr(mlflow, "MlflowClient", lambda: registry)
    adapter = registry.get_model_version("banking-adapter", "1")
    assert placed_base(adapter, "banking-adapter@champion", "champion") == ("m-base", "1")
    # someone who may tag the adapter points it at another model's Service: refused, saying what the base lacks
    registry.add("m", "1", {"weights.manifest_sha256": "m1", **GATED})
    registry.tags("m", "1").update({"deploy.status": "deployed", "deploy.endpoint": backend.endpoint("m")})
    adapter.tags.update({"deploy.base": "m/1", "deploy.endpoint": backend.endpoint("m")})
    with pytest.raises(LookupError, match="lacks llmops.kind=base.*the weights.manifest_sha256 the adapter names"):
        placed_base(adapter, "banking-adapter@champion", "champion")
    with pytest.raises(LookupError, match="the alias live"):
        adapter.tags.update({"deploy.base": "m-base/1", "deploy.endpoint": backend.endpoint("m-base")})
        placed_base(adapter, "banking-adapter@live", "live")
