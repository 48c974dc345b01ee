"""Register the merged model in the MLflow model registry as an MLflow model, with lineage tags.

Run as: a task of `llmops run` (it needs the run's MLflow server and its pipeline run name).

The version is created from a LoggedModel (components/logged_model.py): a pyfunc around the merged
directory with a sha256 manifest of every served file, whose digest becomes the version's tag
`weights.manifest_sha256`. TGI's init container and `llmops serve` verify the files against it.
The version's headline metrics (`eval.tuned.*`) are those of what will serve: the merge under the
recommended `--quantize` flag; `eval.adapter.*` keeps the adapter on the 16-bit base for comparison.
Re-running register for the same pipeline run returns the existing version instead of a second one.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from components.adapter_registry import register_adapter
from components.artifacts import (
    REGISTRATION_SUMMARY,
    BaseModelDir,
    EvalReport,
    MergedModel,
    Output,
    PreparedData,
    QuantizeReport,
    TrainedAdapter,
)
from components.config import RegistrySection
from components.environment import GIT_COMMIT
from components.environment import experiment as experiment_name
from components.logged_model import (
    is_logged_model_whole,
    log_adapter_model,
    log_chat_model,
    log_datasets,
)
from components.prompt_contract import read_contract
from components.registry_tags import (
    ADAPTER_MANIFEST_TAG,
    ADAPTER_MODEL_TAG,
    GATE_REASON,
    GATE_VERDICT,
    MANIFEST_TAG,
    MODEL_ID_TAG,
    PIPELINE_RUN_TAG,
    PROMPT_ANSWER_FORMAT,
    PROMPT_LABEL_SET,
    PROMPT_LABELS,
    PROMPT_SYSTEM,
    PROMPT_USER_PREFIX,
    QUANTIZE_TAG,
    eval_tag,
)
from components.tracking import configure_retries, flatten, numeric, safe_names
from components.util import console, heading, read_json, text_sha256

HEADLINE = ("exact_match", "label_accuracy", "perplexity")


def git_commit() -> str:
    if GIT_COMMIT.is_set():
        return GIT_COMMIT.get()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def chat_template_hash(model_dir: Path) -> str:
    template = read_json(Path(model_dir) / "tokenizer_config.json").get("chat_template")
    if not template:
        raise ValueError(f"{model_dir}/tokenizer_config.json has no chat_template; TGI would serve without one")
    return text_sha256(template if isinstance(template, str) else repr(template))


def contract_tags(model_dir: Path) -> dict:
    """The prompt contract on the version, where a person promoting it can read what the model expects."""
    contract = read_contract(model_dir)
    if contract is None:
        return {}
    tags = {
        PROMPT_SYSTEM: contract["system_prompt"],
        PROMPT_USER_PREFIX: contract["user_prefix"],
        PROMPT_ANSWER_FORMAT: contract["answer_format"],
        PROMPT_LABELS: str(len(contract["labels"])),
    }
    if contract["labels"]:  # the set an application constrains answers to (serving.client, constrained=True)
        tags[PROMPT_LABEL_SET] = json.dumps(contract["labels"], ensure_ascii=False, separators=(",", ":"))
    return tags


def lineage(paths: dict[str, Path], pipeline_run: str) -> tuple[dict, dict]:
    """(tags, metrics) describing where the version came from and how good it is."""
    base = BaseModelDir(paths["base"]).info()
    data = PreparedData(paths["data"]).stats()
    train = TrainedAdapter(paths["train"]).metrics()
    evald = EvalReport(paths["eval"]).report()
    base_scores, adapter_scores = (scores.model_dump(exclude_none=True) for scores in (evald.base, evald.tuned))
    quant = QuantizeReport(paths["quantize"]).report()
    merge = MergedModel(paths["merged"]).report()
    configs = [c for c in (Output(p).stage_config() for p in paths.values()) if c]
    tags = {
        "base_model": base["source"],
        "base_model_sha256": base["weights_sha256"],
        "dataset_sha256": data.source_sha256,
        "prepared_dataset_sha256": data.prepared_sha256,
        "config_sha256": text_sha256(repr(sorted((c["stage"], c["config"]) for c in configs))),
        "git_commit": git_commit(),
        PIPELINE_RUN_TAG: pipeline_run,
        QUANTIZE_TAG: quant.recommended_quantize,  # the report names its field as the tag
        "chat_template_sha256": chat_template_hash(MergedModel(paths["merged"]).model_dir),
        "chat_template": base.get("chat_template", "own"),  # the format trained and served (model.chat_template)
        "task_format": data.format,
        **contract_tags(MergedModel(paths["merged"]).model_dir),
    }
    served = quant.served.model_dump(exclude_none=True)
    metrics = {
        **{eval_tag("base", k): base_scores[k] for k in HEADLINE if k in base_scores},
        **{eval_tag("adapter", k): adapter_scores[k] for k in HEADLINE if k in adapter_scores},
        **{eval_tag("tuned", k): served[k] for k in HEADLINE if k in served},  # what serves: merged, under the flag
        eval_tag("tuned", "examples"): served["examples"],
        eval_tag("base", "examples"): evald.base.n,
        "merge.parity": merge.parity,
        "train.steps": train.steps,
        "train.loss": train.train_loss,
        "data.rejected": data.rejected,
        "data.train": data.train,
        "data.eval": data.eval,
    }
    tags.update({k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in metrics.items()})
    return tags, metrics


# A version without these is useless downstream (gate, deployer, lineage), so it never counts as registered.
REQUIRED_TAGS = (
    "base_model",
    "base_model_sha256",
    "dataset_sha256",
    "prepared_dataset_sha256",
    "config_sha256",
    "git_commit",
    PIPELINE_RUN_TAG,
    QUANTIZE_TAG,
    "chat_template_sha256",
    MANIFEST_TAG,
)


def is_complete(client, version) -> bool:
    """All lineage tags, and a whole logged model behind the version."""
    if any(not version.tags.get(tag) for tag in REQUIRED_TAGS) or not version.source.startswith("models:/"):
        return False
    return is_logged_model_whole(client, version.source.removeprefix("models:/"))


def versions_of_run(client, name: str, pipeline_run: str) -> list:
    found = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get(PIPELINE_RUN_TAG) == pipeline_run]
    return sorted(found, key=lambda v: int(v.version))


def keep_one_complete_version(client, name: str, pipeline_run: str):
    """The one complete version of this pipeline run, or None; every other version of the run is deleted.

    Others come from a create request that the server committed but whose response was lost (the client
    retries the POST), or from a version left without its tags or files: neither may be served or gated.
    """
    keep = None
    for version in versions_of_run(client, name, pipeline_run):
        if keep is None and is_complete(client, version):
            keep = version
            continue
        why = "a duplicate" if keep else "incomplete"
        # Read again, one version by name: a version an alias names may serve, whatever a listing or its tags
        # say (a tag edited by hand makes a served version look incomplete), and is never deleted here.
        aliases = client.get_model_version(name, version.version).aliases
        if aliases:
            console.print(
                f"keeping version {version.version} of {name} although {why} for pipeline run {pipeline_run}: "
                f"the alias {', '.join(aliases)} names it"
            )
            continue
        console.print(f"deleting version {version.version} of {name}: {why} for pipeline run {pipeline_run}")
        client.delete_model_version(name, version.version)
    return keep


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Fine-tuned by the llmops finetune pipeline.")
        except MlflowException as err:  # a retried create whose first attempt went through
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def log_run_contents(paths: dict[str, Path], metrics: dict, params: dict[str, str]) -> None:
    import mlflow

    mlflow.log_metrics(safe_names(metrics)[0])
    mlflow.log_params(params)
    data, evald = PreparedData(paths["data"]), EvalReport(paths["eval"])
    mlflow.log_metrics(safe_names({f"data.{k}": v for k, v in numeric(data.stats().model_dump()).items()})[0])
    for report in (
        evald.report_file,
        QuantizeReport(paths["quantize"]).report_file,
        MergedModel(paths["merged"]).report_file,
        data.stats_file,
        data.rejects_file,
        TrainedAdapter(paths["train"]).history_file,
        evald.confusion_plot_file,
    ):
        if report.exists():
            mlflow.log_artifact(str(report), "reports")


def model_params(paths: dict[str, Path]) -> dict[str, str]:
    """Every stage's configuration, flattened: the LoggedModel's params."""
    params = {}
    for path in paths.values():
        if record := Output(path).stage_config():
            params.update({f"{record['stage']}.{k}": str(v)[:500] for k, v in flatten(record["config"]).items()})
    return safe_names(params)[0]


def log_models(paths: dict[str, Path], metrics: dict, params: dict[str, str], run) -> dict:
    """The served model and the adapter as LoggedModels, metrics linked to the served one; returns tags to add."""
    import mlflow

    _, eval_ds = log_datasets(paths["data"])
    info, manifest_sha = log_chat_model(MergedModel(paths["merged"]).model_dir, params)
    # The run's params never change; the version's tag can. The deployer checks the tag against this.
    mlflow.log_param(MANIFEST_TAG, manifest_sha)
    mlflow.log_metrics(safe_names(metrics)[0], model_id=info.model_id, dataset=eval_ds)
    adapter_id, adapter_sha = log_adapter_model(
        paths["train"], run.info.run_id, run.info.experiment_id, BaseModelDir(paths["base"]).info()["weights_sha256"]
    )
    mlflow.log_param(ADAPTER_MANIFEST_TAG, adapter_sha)
    return {
        MANIFEST_TAG: manifest_sha,
        ADAPTER_MODEL_TAG: adapter_id,
        ADAPTER_MANIFEST_TAG: adapter_sha,
        MODEL_ID_TAG: info.model_id,
    }


def run(cfg: RegistrySection, paths: dict[str, Path], pipeline_run: str) -> dict:
    import mlflow
    from mlflow import MlflowClient

    heading("register")
    configure_retries()
    paths = {k: Path(v) for k, v in paths.items()}
    tags, metrics = lineage(paths, pipeline_run)
    client = MlflowClient()
    if found := keep_one_complete_version(client, cfg.candidates, pipeline_run):
        console.print(f"version {found.version} of {cfg.candidates} already holds pipeline run {pipeline_run}")
        adapter = {}
        if cfg.adapters:  # a register cut short after the version: its adapter is registered now (idempotent)
            with mlflow.start_run(run_id=found.run_id):
                create = lambda n: ensure_registered_model(client, n)  # noqa: E731
                adapter = register_adapter(client, cfg.model_name, paths, dict(found.tags), found.run_id, create)
        return {
            "name": cfg.candidates,
            "version": found.version,
            "run_id": found.run_id,
            "reused": True,
            "quantize": tags[QUANTIZE_TAG],
            **adapter,
            **metrics,
        }
    mlflow.set_experiment(experiment_name(cfg.experiment))
    with mlflow.start_run(run_name=f"finetune {pipeline_run}", tags={"llmops.stage": "register", **tags}) as run:
        params = model_params(paths)  # the run's params and the LoggedModel's are the same configuration
        log_run_contents(paths, metrics, params)
        tags.update(log_models(paths, metrics, params, run))
        ensure_registered_model(client, cfg.candidates)
        # Created last, tags in the same request: a version never exists without its files or lineage.
        model_id = tags[MODEL_ID_TAG]
        client.create_model_version(
            cfg.candidates,
            source=f"models:/{model_id}",
            run_id=run.info.run_id,
            tags=tags,
            model_id=model_id,
            description=f"base {tags['base_model']}; served exact match "
            f"{metrics[eval_tag('tuned', 'exact_match')]:.3f} under --quantize {tags[QUANTIZE_TAG]} "
            f"(base {metrics[eval_tag('base', 'exact_match')]:.3f})",
        )
        version = keep_one_complete_version(client, cfg.candidates, pipeline_run)
        if version is None:
            raise RuntimeError(f"the new version of {cfg.candidates} for {pipeline_run} is incomplete; deleted it")
        adapter = {}
        if cfg.adapters:  # the adapter as a version you can promote, on its base's version
            create = lambda n: ensure_registered_model(client, n)  # noqa: E731
            adapter = register_adapter(client, cfg.model_name, paths, tags, run.info.run_id, create)
    console.print(f"registered {cfg.candidates} version {version.version} (run {run.info.run_id})")
    return {
        "name": cfg.candidates,
        "version": version.version,
        "run_id": run.info.run_id,
        "reused": False,
        "quantize": tags[QUANTIZE_TAG],
        **adapter,
        **metrics,
    }


def record_summary(summary: dict) -> None:
    """Kept with the register run, so the pipeline's exit task can hand it back as the pipeline output."""
    from mlflow import MlflowClient

    MlflowClient().log_dict(summary["run_id"], summary, REGISTRATION_SUMMARY)


def finalize(cfg: RegistrySection, pipeline_run: str, state: str) -> dict:
    """The pipeline's exit task: whatever happened, leave MLflow consistent for this pipeline run.

    Runs tagged with this pipeline run (the registration runs) still RUNNING are marked FAILED: a register
    step killed outright never ends its run, and a retried create may leave an orphan behind. Versions of
    it that are incomplete or duplicated are deleted (keep_one_complete_version). Returns the registration
    summary, if any.
    The model stages' own runs are not tagged with the pipeline run and are left as they are.
    """
    import mlflow
    from mlflow import MlflowClient

    configure_retries()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name(cfg.experiment))
    open_runs = (
        []
        if experiment is None
        else client.search_runs(
            [experiment.experiment_id],
            f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run}' and attributes.status = 'RUNNING'",
        )
    )
    for stale in open_runs:
        client.set_terminated(stale.info.run_id, "FAILED")
    version = keep_one_complete_version(client, cfg.candidates, pipeline_run)
    summary = {"state": state, "failed_runs": [r.info.run_id for r in open_runs]}
    if version is not None:
        summary.update(
            mlflow.artifacts.load_dict(f"runs:/{version.run_id}/{REGISTRATION_SUMMARY}")
            if state == "SUCCEEDED"
            else {"name": cfg.candidates, "version": version.version, "run_id": version.run_id}
        )
        current = client.get_model_version(cfg.candidates, version.version)  # a search leaves aliases out
        if verdict := current.tags.get(GATE_VERDICT):
            aliases = ", ".join(current.aliases) or "no alias"
            summary["gate"] = f"{verdict} ({current.tags.get(GATE_REASON, '')}); {aliases}"
    console.print(
        f"pipeline run {pipeline_run} {state}: {len(open_runs)} open MLflow run(s) marked FAILED"
        + (f"; version {version.version} of {cfg.candidates}" if version else "; no version registered")
    )
    return summary
