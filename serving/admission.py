"""Whether a registry version may serve, from its name and tags alone: the rules the deployer applies before it
asks any backend (the deployer adds the check of its manifest tag against its registration run)."""

from __future__ import annotations

from components.registry_tags import (
    GATE_OVERRIDE,
    GATE_REASON,
    GATE_VERDICT,
    ModelKind,
    Verdict,
    kind_of,
    production_of,
)


def promotion_refusal(tags: dict) -> str | None:
    """Why a version may not serve, or None. Only a passed gate deploys, unless a person overrides it on
    purpose: the tag GATE_OVERRIDE (gate.override) holds their reason. A base version (the unchanged base its
    adapters were gated against) has no gate of its own: it serves only the adapters whose gate passed."""
    if kind_of(tags) == ModelKind.BASE:
        return None
    if tags.get(GATE_VERDICT) == Verdict.PASSED or tags.get(GATE_OVERRIDE, "").strip():
        return None
    verdict = tags.get(GATE_VERDICT) or "missing"
    why = f": {tags[GATE_REASON]}" if tags.get(GATE_REASON) else ""
    return (
        f"{GATE_VERDICT} is {verdict}{why}. Nothing was deployed; to serve it anyway, set the tag "
        f"{GATE_OVERRIDE} to your reason"
    )


def candidate_refusal(name: str, version: str) -> str | None:
    """A candidates model (where the pipeline registers, with its own login) never serves: only a copy a
    promoter made into the production model does, so the pipeline's login can never deploy."""
    if production := production_of(name):
        return (
            f"{name} holds the pipeline's candidates, and only a production model serves. Nothing was deployed; "
            f"to serve it, copy it into {production}: `llmops promote {name} {version} --reason TEXT`"
        )
    return None
