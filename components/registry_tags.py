"""Every model-version tag the pipeline and the deployer agree on: its name, who writes it, and its values.

The families `gate.*` (the gate stage), `prompt.*` and `weights.*` (register), `deploy.*` (the deployer; a
person sets only `deploy.engine`) and the registry tags register writes (`recommended_quantize`, `llmops.*`)
are named here and nowhere else: tests/unit/test_registry_tags.py fails on a tag literal in any other module.
Statuses are StrEnums, so a tag read back from MLflow (a plain string) compares equal to its member.
"""

from enum import StrEnum

# gate.*: the gate stage's verdict on a registered version
GATE_VERDICT = "gate.verdict"
GATE_REASON = "gate.reason"
GATE_METRIC = "gate.metric"
GATE_GAIN_OVER_BASE = "gate.gain_over_base"
GATE_GAIN_OVER_CHAMPION = "gate.gain_over_champion"
GATE_CHAMPION_VERSION = "gate.champion_version"
GATE_OVERRIDE = "gate.override"  # set by a person: the reason to serve a version the gate failed


class Verdict(StrEnum):
    PASSED = "passed"
    FAILED = "failed"


# prompt.*: the prompt contract the model was trained on (register, from components/prompt_contract.py)
PROMPT_SYSTEM = "prompt.system_prompt"
PROMPT_USER_PREFIX = "prompt.user_prefix"
PROMPT_ANSWER_FORMAT = "prompt.answer_format"
PROMPT_LABELS = "prompt.labels"  # how many labels
PROMPT_LABEL_SET = "prompt.label_set"  # the labels, as a JSON list: what a constrained answer may be

# weights.*: what serves, pinned (components/weights_manifest.py)
MANIFEST_TAG = "weights.manifest_sha256"
ADAPTER_MANIFEST_TAG = "weights.adapter_manifest_sha256"  # the LoRA adapter's files, checked before it serves
BASE_MANIFEST_TAG = "weights.base_manifest_sha256"  # on an adapter version: the base version it must serve on
FILES_TAG = "weights.files_sha256"  # a base version's Hugging Face files alone: one version per distinct base

# register's registry tags
QUANTIZE_TAG = "recommended_quantize"  # the serving flag quantize measured as best (none, bitsandbytes, -nf4)
PIPELINE_RUN_TAG = "llmops.pipeline_run"
ADAPTER_MODEL_TAG = "llmops.adapter_model_id"  # the LoggedModel holding the run's LoRA adapter
MODEL_ID_TAG = "llmops.model_id"  # the LoggedModel the version was registered from
KIND_TAG = "llmops.kind"  # a ModelKind; a version without it is a merged model
ADAPTER_RANK_TAG = "llmops.lora_rank"  # on an adapter version: its LoRA rank (vLLM's --max-lora-rank)
BASE_ROUNDING_TAG = "llmops.base_rounding"  # on a base version: nf4 (what QLoRA trained against) or 16bit
BASE_VERSION_TAG = "llmops.base_version"  # on an adapter version: name/version of the base registered with it


class ModelKind(StrEnum):
    """What a version holds. A merged model serves alone; an adapter serves on the running deployment of the
    base version its BASE_MANIFEST_TAG names; a base serves the adapters placed on it."""

    MODEL = "model"
    ADAPTER = "adapter"
    BASE = "base"


def kind_of(tags: dict) -> ModelKind:
    return ModelKind(tags.get(KIND_TAG) or ModelKind.MODEL)


# promotion.*: written by `llmops promote` on a production version (serving/promotion.py)
PROMOTED_FROM_TAG = "promotion.from"  # the candidate it was copied from, name/version
PROMOTED_BY_TAG = "promotion.by"  # the MLflow login that promoted it last (the server's own answer)
PROMOTION_REASON_TAG = "promotion.reason"  # why, in the promoter's words
PROMOTION_TIME_TAG = "promotion.time"

# One registered model per environment, as MLflow recommends: the pipeline registers every version in a
# candidates model it owns; a promoter copies a gated candidate into the production model, the only one the
# deployer serves. The pipeline's login may read the production model and never write it.
CANDIDATES_SUFFIX = "-candidates"


def candidates_of(production: str) -> str:
    """The registered model the pipeline registers `production`'s candidates in."""
    return f"{production}{CANDIDATES_SUFFIX}"


def production_of(name: str) -> str | None:
    """The production model a candidates model promotes into; None for a name that is no candidates model."""
    return name.removesuffix(CANDIDATES_SUFFIX) if name.endswith(CANDIDATES_SUFFIX) else None


# The registration run's param that pins each kind's MANIFEST_TAG: a run's params never change, a tag can.
RECORDED_MANIFEST = {
    ModelKind.MODEL: MANIFEST_TAG,
    ModelKind.ADAPTER: ADAPTER_MANIFEST_TAG,
    ModelKind.BASE: BASE_MANIFEST_TAG,
}

# deploy.*: written by the deployer, waited on by `llmops promote`, followed by applications
STATUS_TAG = "deploy.status"  # a DeployStatus
REASON_TAG = "deploy.reason"  # why refused, failed or retired
ENDPOINT_TAG = "deploy.endpoint"  # where a deployed version answers
TIME_TAG = "deploy.time"
BACKEND_TAG = "deploy.backend"  # kubernetes or local
SERVED_ENGINE_TAG = "deploy.served_engine"  # the engine it serves on
ENGINE_TAG = "deploy.engine"  # set by a person: the engine this version asks for
GATE_OVERRIDE_KEPT_TAG = "deploy.gate_override"  # a person's gate.override, kept with the deploy it allowed
PLACED_ON_TAG = "deploy.base"  # on an adapter version: name/version of the base deployment that serves it
DEPLOYER_TAGS = (STATUS_TAG, REASON_TAG, ENDPOINT_TAG, TIME_TAG, BACKEND_TAG, SERVED_ENGINE_TAG,
                 GATE_OVERRIDE_KEPT_TAG, PLACED_ON_TAG)  # fmt: skip  # the deployer's own record of a version


class DeployStatus(StrEnum):
    DEPLOYING = "deploying"
    DEPLOYED = "deployed"
    REFUSED = "refused"  # the deployer would not apply it (gate, manifest, engine, allowlist)
    FAILED = "failed"  # applied, and the rollout did not become ready
    SUPERSEDED = "superseded"  # served once; the alias has moved on
    RETIRED = "retired"  # its model lost the alias or left the allowlist, and was scaled down


def eval_tag(condition: str, metric: str) -> str:
    """`eval.<condition>.<metric>`: condition is base, adapter (on the 16-bit base) or tuned (what serves)."""
    return f"eval.{condition}.{metric}"
