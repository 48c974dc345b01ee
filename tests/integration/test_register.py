import json

import pytest

from components import register
from components.config import RegisterSection

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stage_outputs(tiny_base, demo_prepared, tiny_adapter, tmp_path_factory):
    from components import evaluate, merge, quantize
    from components.config import EvalSection, MergeSection, QuantizeSection

    root = tmp_path_factory.mktemp("stages")
    evaluate.run(EvalSection(batch_size=8), tiny_base, tiny_adapter, demo_prepared, root / "eval")
    merge.run(MergeSection(parity_prompts=8), tiny_base, tiny_adapter, demo_prepared, root / "merged")
    quantize.run(QuantizeSection(eval_examples=4, variants=["nf4"]), root / "merged" / "model", demo_prepared, root / "quant")
    return {"base": tiny_base, "data": demo_prepared, "train": tiny_adapter, "eval": root / "eval",
            "merged": root / "merged", "quantize": root / "quant"}


def test_version_carries_lineage_and_loads_from_the_registry(mlflow_server, stage_outputs, tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = register.run(RegisterSection(model_name="tiny-reg"), stage_outputs, "pipeline-run-1")
    version = MlflowClient().get_model_version("tiny-reg", result["version"])
    for tag in ("base_model", "base_model_sha256", "dataset_sha256", "config_sha256", "git_commit",
                "llmops.pipeline_run", "recommended_quantize", "chat_template_sha256", "eval.tuned.exact_match"):
        assert version.tags.get(tag), tag
    assert version.tags["llmops.pipeline_run"] == "pipeline-run-1"
    assert len(version.tags["config_sha256"]) == 64

    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/tiny-reg/{result['version']}", dst_path=str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(local)
    tok = AutoTokenizer.from_pretrained(local)
    assert model.config.model_type == "llama" and tok.chat_template
    assert json.loads((tmp_path / "labels.json").read_text()) == json.loads((stage_outputs["data"] / "labels.json").read_text())
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.metrics["eval.tuned.exact_match"] == pytest.approx(result["eval.tuned.exact_match"])
    artifacts = {a.path for a in MlflowClient().list_artifacts(result["run_id"])}
    assert {"model", "adapter", "reports"} <= artifacts


def test_registering_the_same_pipeline_run_twice_reuses_the_version(mlflow_server, stage_outputs):
    from mlflow import MlflowClient

    first = register.run(RegisterSection(model_name="tiny-once"), stage_outputs, "run-a")
    again = register.run(RegisterSection(model_name="tiny-once"), stage_outputs, "run-a")
    other = register.run(RegisterSection(model_name="tiny-once"), stage_outputs, "run-b")
    assert again["reused"] and again["version"] == first["version"] != other["version"]
    assert len(MlflowClient().search_model_versions("name='tiny-once'")) == 2


def test_stage_runs_log_to_mlflow(mlflow_server, tiny_base, tmp_path):
    from mlflow import MlflowClient

    from components import prepare_data
    from components.config import DataSection

    stats = prepare_data.run(DataSection(), tiny_base, tmp_path / "data")
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], "tags.`llmops.stage` = 'prepare_data'",
        order_by=["attributes.start_time DESC"], max_results=1)
    assert runs and runs[0].data.metrics["data.rejected"] == stats["rejected"] == 3
    assert runs[0].data.metrics["data.reject_reasons.duplicate"] == 1
    names = {a.path for a in MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert "rejects.jsonl" in names


# Labels as users' data carry them: BANKING77's "?", a "/", a ":", spaces, letters beyond ASCII, and two
# ("card?", "card!") that become the same MLflow name once their invalid characters are replaced.
AWKWARD = ["reverted_card_payment?", "card/lost", "fx:rate", "top up failed", "carte_perdue_é", "card?", "card!"]


def test_labels_with_any_characters_pass_evaluate_and_register(mlflow_server, tiny_base, tiny_adapter, tmp_path):
    import csv

    import mlflow
    from mlflow import MlflowClient

    from components import evaluate, merge, prepare_data, quantize
    from components.config import DataSection, EvalSection, MergeSection, QuantizeSection
    from components.demo_data import generate_rows

    source = tmp_path / "awkward.csv"
    texts = [row["text"] for row in generate_rows(70, 3)]
    with open(source, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": text, "label": AWKWARD[i % len(AWKWARD)]} for i, text in enumerate(texts))
    stages = {"base": tiny_base, "train": tiny_adapter, "data": tmp_path / "data", "eval": tmp_path / "eval",
              "merged": tmp_path / "merged", "quantize": tmp_path / "quant"}
    prepare_data.run(DataSection(path=str(source), eval_fraction=0.5), tiny_base, stages["data"])
    report = evaluate.run(EvalSection(batch_size=8), tiny_base, tiny_adapter, stages["data"], stages["eval"])
    merge.run(MergeSection(parity_prompts=4, parity_threshold=0.0), tiny_base, tiny_adapter, stages["data"],
              stages["merged"])
    quantize.run(QuantizeSection(eval_examples=4, variants=["nf4"]), stages["merged"] / "model", stages["data"],
                 stages["quantize"])
    result = register.run(RegisterSection(model_name="awkward-labels"), stages, "pipeline-awkward")

    assert set(report["tuned"]["per_class"]) == set(AWKWARD)  # the report keeps every label exactly
    client = MlflowClient()
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             "tags.`llmops.stage` = 'evaluate'", order_by=["attributes.start_time DESC"])[0]
    f1 = {name: value for name, value in run.data.metrics.items() if name.startswith("eval.tuned.f1.")}
    assert len(f1) == len(AWKWARD)  # one metric per label: the two that collide did not overwrite each other
    renamed = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/metric_names.json")
    originals = {renamed.get(name, name).removeprefix("eval.tuned.f1.") for name in f1}
    assert originals == set(AWKWARD)
    assert f1["eval.tuned.f1.reverted_card_payment_"] == report["tuned"]["per_class"]["reverted_card_payment?"]["f1"]
    version = client.get_model_version("awkward-labels", result["version"])
    assert version.tags["prompt.labels"] == str(len(AWKWARD))
