"""Which adapters serve on which deployment: decided from the registry alone, before any backend is asked.

A registered adapter version (`llmops.kind=adapter`, components/adapter_registry.py) never gets a deployment of
its own. Under the deployer's alias it is placed on the deployment of the base version whose manifest digest
its `weights.base_manifest_sha256` names (one deployment per base, many adapters); a base version serves
whatever adapters are placed on it. An adapter whose gate, manifest pin or base does not hold is refused, and
the reason goes on its version. The deployer then rolls a base only when its set of adapters changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from components.registry_tags import (
    ADAPTER_RANK_TAG,
    BASE_MANIFEST_TAG,
    BASE_VERSION_TAG,
    MANIFEST_TAG,
    ModelKind,
    kind_of,
)
from serving.backends import Target
from serving.engines import EngineRefusal, max_lora_rank

ADAPTERS_DIR = "adapters"  # beside the model in the pod's data volume: /data/adapters/<name>


@dataclass(frozen=True)
class PlacedAdapter:
    """An adapter version placed on a base deployment, served under its registered model's name."""

    name: str
    version: str
    manifest: str  # the digest pinned when it was placed: what every pod start checks its files against
    rank: int
    tags: dict = field(default_factory=dict, compare=False)  # its version's tags, as this pass read them

    @property
    def key(self) -> str:
        """How the backend records it (a pod annotation, the local server's record): enough to see a change."""
        return f"{self.name}/{self.version}@{self.manifest}"

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def keys(adapters: tuple[PlacedAdapter, ...]) -> tuple[str, ...]:
    return tuple(sorted(a.key for a in adapters))


def parse_key(key: str) -> tuple[str, str]:
    """(name, version) of a recorded key."""
    name_version = key.partition("@")[0]
    name, _, version = name_version.rpartition("/")
    return name, version


def place(
    targets: dict[str, Target], refusal: Callable[[Target], str | None], alias: str
) -> tuple[dict[str, Target], dict[str, str]]:
    """(the models and bases to deploy, each base with its adapters; {adapter model: why it cannot serve})."""
    adapters = {n: t for n, t in targets.items() if kind_of(t.tags) == ModelKind.ADAPTER}
    served = {n: t for n, t in targets.items() if n not in adapters}
    bases = {t.tags.get(MANIFEST_TAG): n for n, t in served.items() if kind_of(t.tags) == ModelKind.BASE}
    placed: dict[str, list[PlacedAdapter]] = {n: [] for n in served}
    refused = {}
    for name, target in sorted(adapters.items()):
        if why := refusal(target):
            refused[name] = why
            continue
        needed = target.tags.get(BASE_MANIFEST_TAG)
        if needed not in bases:
            base_name, _, base_version = target.tags.get(BASE_VERSION_TAG, "").rpartition("/")
            how = f": `llmops promote {base_name} {base_version} --alias {alias} --reason TEXT`" if base_name else ""
            refused[name] = (
                f"its base ({BASE_MANIFEST_TAG} {needed or 'missing'}) is not a base version under the alias "
                f"{alias}: no running deployment has the weights it was trained on. Promote its base first{how}; "
                "nothing was deployed"
            )
            continue
        try:  # a tag anyone may edit: checked here, so a bad one refuses this adapter and not its base
            rank = int(target.tags.get(ADAPTER_RANK_TAG) or 16)
            max_lora_rank([rank])
        except (ValueError, EngineRefusal) as err:
            refused[name] = f"{ADAPTER_RANK_TAG}={target.tags.get(ADAPTER_RANK_TAG)!r} cannot be served: {err}"
            continue
        placed[bases[needed]].append(
            PlacedAdapter(name, target.version, target.tags.get(MANIFEST_TAG, ""), rank, target.tags)
        )
    return {n: replace(t, adapters=tuple(placed[n])) for n, t in served.items()}, refused
