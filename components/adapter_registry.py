"""A run's LoRA adapter as a version you can promote, beside the base version it serves on.

Called by the register stage (`registry.adapters=true`, the default), inside its MLflow run:
Both go to candidates models, as the merged model does (`llmops promote` copies one into production):
- `<model_name>-base-candidates` holds the base as training saw it (streaming_merge.write_serving_base: the NF4 rounding
  for QLoRA), logged as the same verified pyfunc as the merged model. One version per distinct set of files
  (`weights.files_sha256`): every later run of the same base and rounding reuses it, so one deployment of it
  can serve every adapter trained on it.
- `<model_name>-adapter-candidates` gets one version per pipeline run: the adapter's LoggedModel, its own manifest in
  `weights.manifest_sha256` (pinned by the run's param `weights.adapter_manifest_sha256`), and the base
  version's manifest in `weights.base_manifest_sha256`: the deployer places it only on a running deployment of
  exactly that base, and refuses it, with the reason on the version, where none runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from components import weights_manifest
from components.artifacts import MergedModel, TrainedAdapter
from components.logged_model import log_chat_model
from components.registry_tags import (
    ADAPTER_MANIFEST_TAG,
    ADAPTER_MODEL_TAG,
    ADAPTER_RANK_TAG,
    BASE_MANIFEST_TAG,
    BASE_ROUNDING_TAG,
    BASE_VERSION_TAG,
    FILES_TAG,
    KIND_TAG,
    MANIFEST_TAG,
    MODEL_ID_TAG,
    PIPELINE_RUN_TAG,
    ModelKind,
    candidates_of,
)
from components.streaming_merge import write_serving_base
from components.util import console, read_json


def adapter_model_name(model_name: str) -> str:
    """The production model of `model_name`'s adapters (the pipeline registers in its candidates model)."""
    return f"{model_name}-adapter"


def base_model_name(model_name: str) -> str:
    return f"{model_name}-base"


def files_digest(model_dir: Path) -> str:
    """The manifest digest of a Hugging Face directory's own files: equal for equal bases, whichever run wrote them."""
    with tempfile.TemporaryDirectory() as scratch:
        return weights_manifest.write(Path(model_dir), Path(scratch) / "manifest.json")


def ensure_base_version(client, name: str, model_dir: Path, rounding: str, lineage: dict, run_id: str, create):
    """The version of `name` holding exactly these files, registered now if none does."""
    import mlflow

    digest = files_digest(model_dir)
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get(FILES_TAG) == digest and version.tags.get(MANIFEST_TAG):
            console.print(f"base {name} version {version.version} already holds these files ({rounding})")
            return version
    info, manifest_sha = log_chat_model(model_dir, {}, name="base")
    mlflow.log_param(BASE_MANIFEST_TAG, manifest_sha)  # what the deployer checks the version's tag against
    tags = {
        KIND_TAG: ModelKind.BASE,
        MANIFEST_TAG: manifest_sha,
        FILES_TAG: digest,
        BASE_ROUNDING_TAG: rounding,
        MODEL_ID_TAG: info.model_id,
        **{k: lineage[k] for k in ("base_model", "base_model_sha256", "chat_template")},
    }
    create(name)
    version = client.create_model_version(
        name,
        source=f"models:/{info.model_id}",
        run_id=run_id,
        tags=tags,
        model_id=info.model_id,
        description=f"{lineage['base_model']} as its adapters trained against it ({rounding})",
    )
    console.print(f"registered base {name} version {version.version} ({rounding})")
    return version


def register_adapter(client, model_name: str, paths: dict[str, Path], tags: dict, run_id: str, create) -> dict:
    """Register the run's adapter (and its base, once), from the stage outputs register read (`paths`) and the
    merged version's tags: returns {"adapter": [name, version], "base": [name, version]}. A version of this
    pipeline run already there is returned as it is (a retried register)."""
    import mlflow

    adapter_id, adapter_sha = tags[ADAPTER_MODEL_TAG], tags[ADAPTER_MANIFEST_TAG]
    name = candidates_of(adapter_model_name(model_name))
    pipeline_run = tags[PIPELINE_RUN_TAG]
    shared = {k: v for k, v in tags.items() if k not in (MANIFEST_TAG, MODEL_ID_TAG, ADAPTER_MODEL_TAG)}
    merged = read_json(MergedModel(paths["merged"]).model_dir / "config.json")
    dtype = merged.get("dtype") or merged.get("torch_dtype") or "bfloat16"  # as the merge stored its weights
    with tempfile.TemporaryDirectory() as scratch:
        rounding = write_serving_base(paths["base"], paths["train"], Path(scratch), dtype)
        base_name = candidates_of(base_model_name(model_name))
        base = ensure_base_version(client, base_name, Path(scratch), rounding, tags, run_id, create)
    mlflow.log_param(BASE_MANIFEST_TAG, base.tags[MANIFEST_TAG])  # pins the adapter's pointer to its base
    create(name)
    found = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get(PIPELINE_RUN_TAG) == pipeline_run]
    if found:
        adapter = found[0]
    else:
        rank = read_json(TrainedAdapter(paths["train"]).config_file)["r"]
        adapter_tags = {
            **shared,
            KIND_TAG: ModelKind.ADAPTER,
            MANIFEST_TAG: adapter_sha,
            BASE_MANIFEST_TAG: base.tags[MANIFEST_TAG],
            BASE_VERSION_TAG: f"{base.name}/{base.version}",
            ADAPTER_RANK_TAG: str(rank),
            MODEL_ID_TAG: adapter_id,
        }
        adapter = client.create_model_version(
            name,
            source=f"models:/{adapter_id}",
            run_id=run_id,
            tags=adapter_tags,
            model_id=adapter_id,
            description=f"LoRA adapter (rank {rank}) of pipeline run {pipeline_run}; serves on "
            f"{base.name} version {base.version}",
        )
    console.print(f"registered adapter {name} version {adapter.version} on {base.name} version {base.version}")
    return {"adapter": [name, str(adapter.version)], "base": [base.name, str(base.version)]}
