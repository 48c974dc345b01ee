import json
from pathlib import Path

import pytest

from components.config import RegistrySection
from components.stages import register

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def registered_here(mlflow_server):
    """The session's registry outlives this module: the models its tests register are deleted at its end."""
    from mlflow import MlflowClient

    client = MlflowClient()
    before = {m.name for m in client.search_registered_models(max_results=1000)}
    try:
        yield
    finally:
        for model in client.search_registered_models(max_results=1000):
            if model.name not in before:
                client.delete_registered_model(model.name)


def run_stages(base: Path, data: Path, adapter: Path, root: Path, variants: list[str]) -> dict:
    """evaluate, merge and quantize on a trained adapter: the stage outputs register reads."""
    from components.config import EvalSection, MergeSection, QuantizeSection
    from components.stages import evaluate, merge, quantize

    evaluate.run(EvalSection(batch_size=8), base, adapter, data, root / "eval")
    merge.run(MergeSection(parity_prompts=8), base, adapter, data, root / "merged")
    quantize.run(QuantizeSection(variants=variants), root / "merged" / "model", data, root / "quant")
    return {
        "base": base,
        "data": data,
        "train": adapter,
        "eval": root / "eval",
        "merged": root / "merged",
        "quantize": root / "quant",
    }


@pytest.fixture(scope="module")
def stage_outputs(tiny_base, demo_prepared, tiny_adapter, tmp_path_factory):
    return run_stages(tiny_base, demo_prepared, tiny_adapter, tmp_path_factory.mktemp("stages"), ["nf4"])


def test_version_is_an_mlflow_model_with_lineage_metrics_params_and_data(mlflow_server, stage_outputs, tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.chat_pyfunc import artifact_paths
    from components.prompt_contract import read_contract

    client = MlflowClient()
    result = register.run(RegistrySection(model_name="tiny-reg"), stage_outputs, "pipeline-run-1")
    version = client.get_model_version("tiny-reg-candidates", result["version"])
    for tag in (
        "base_model",
        "base_model_sha256",
        "dataset_sha256",
        "config_sha256",
        "git_commit",
        "llmops.pipeline_run",
        "recommended_quantize",
        "chat_template_sha256",
        "chat_template",
        "eval.tuned.exact_match",
        "weights.manifest_sha256",
        "llmops.adapter_model_id",
    ):
        assert version.tags.get(tag), tag
    assert version.tags["llmops.pipeline_run"] == "pipeline-run-1" and len(version.tags["config_sha256"]) == 64
    assert version.tags["chat_template"] == "own"  # the tiny base ships ChatML, which model.chat_template=auto keeps
    model_id = version.tags["llmops.model_id"]
    assert version.source == f"models:/{model_id}"  # created from the LoggedModel, not from a folder

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/tiny-reg-candidates/{result['version']}", dst_path=str(tmp_path)
        )
    )
    served, manifest = artifact_paths(local)
    assert (local / "MLmodel").is_file() and manifest.is_file()
    assert AutoModelForCausalLM.from_pretrained(served).config.model_type == "llama"
    assert AutoTokenizer.from_pretrained(served).chat_template  # in tokenizer_config.json, where TGI reads it
    assert read_contract(served)["labels"] == json.loads((stage_outputs["data"] / "labels.json").read_text())

    # The LoggedModel carries the configuration, the metrics (linked to the eval dataset) and the data.
    logged = client.get_logged_model(model_id)
    assert logged.params["train.lora_r"] == "8" and logged.params["evaluate.batch_size"] == "8"
    linked = {m.key: m for m in logged.metrics}
    assert linked["eval.tuned.exact_match"].value == pytest.approx(result["eval.tuned.exact_match"])
    assert linked["eval.tuned.exact_match"].dataset_name == "eval"
    inputs = client.get_run(result["run_id"]).inputs.dataset_inputs
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}.get("mlflow.data.context") for i in inputs}
    assert contexts == {"train": "training", "eval": "eval"}
    assert all(len(i.dataset.digest) >= 8 for i in inputs)
    adapter = client.get_logged_model(version.tags["llmops.adapter_model_id"])
    assert (
        adapter.source_run_id == result["run_id"]
        and adapter.tags["base_model_sha256"] == version.tags["base_model_sha256"]
    )
    assert {a.path for a in client.list_logged_model_artifacts(adapter.model_id)} >= {"adapter_config.json"}
    # One copy of the weights: the run holds the reports, not the model files again.
    assert {a.path for a in client.list_artifacts(result["run_id"])} == {"reports"}


def test_a_registered_adapter_serves_only_as_registered(mlflow_server, stage_outputs, tiny_base, tmp_path, monkeypatch):
    """`llmops serve --adapter ID=models:/...` takes the run's adapter, checked file by file against the manifest
    registration pinned: the files trained, and a changed byte (in the cache or in the store) is refused by name."""
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from components.weights_manifest import VerificationError
    from llmops.cli import app
    from serving.model_refs import parse_adapters
    from tests.integration.test_verified_weights import flip_a_byte

    client = MlflowClient()
    result = register.run(RegistrySection(model_name="tiny-adapter-reg"), stage_outputs, "pipeline-adapter")
    version = client.get_model_version("tiny-adapter-reg-candidates", result["version"])
    pinned = version.tags["weights.adapter_manifest_sha256"]
    assert client.get_run(result["run_id"]).data.params["weights.adapter_manifest_sha256"] == pinned
    monkeypatch.setenv("LLMOPS_SERVING_DIR", str(tmp_path / "cache"))
    ref = f"models:/tiny-adapter-reg-candidates/{result['version']}"

    served = Path(parse_adapters([f"a={ref}"])["a"])
    trained = {p.name: p.read_bytes() for p in stage_outputs["train"].iterdir() if p.is_file()}
    assert {name: (served / name).read_bytes() for name in trained} == trained
    assert {p.name for p in served.iterdir()} == set(trained) | {"weights_manifest.json"}

    flip_a_byte(served / "adapter_config.json")  # the cached copy, between two serves
    with pytest.raises(VerificationError, match="adapter_config.json differs"):
        parse_adapters([f"a={ref}"])

    model_id = version.tags["llmops.adapter_model_id"]
    stored = next(Path(mlflow_server.root).glob(f"artifacts/*/models/{model_id}/artifacts/adapter_model.safetensors"))
    flip_a_byte(stored)
    refused = CliRunner().invoke(
        app,
        ["serve", str(tiny_base), "--adapter", f"a={ref}", "--port", "1"],
        env={"LLMOPS_SERVING_DIR": str(tmp_path / "fresh")},
    )
    assert refused.exit_code == 3 and "adapter_model.safetensors differs" in refused.output, refused.output


def test_the_adapter_is_a_version_of_its_own_model_on_one_shared_base_version(
    mlflow_server, stage_outputs, tiny_base, tmp_path, monkeypatch
):
    """Two runs: two adapter versions, one base version (the NF4 rounding QLoRA trained against, not the 16-bit
    base), each pinned by its registration run's params, and each adapter naming that base by its manifest."""
    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from components.stages.merge import dequantized_nf4
    from serving.model_refs import local_model, parse_adapters

    client = MlflowClient()
    first = register.run(RegistrySection(model_name="tiny-lora"), stage_outputs, "lora-a")
    second = register.run(RegistrySection(model_name="tiny-lora"), stage_outputs, "lora-b")
    assert first["base"] == second["base"] == ["tiny-lora-base-candidates", "1"]
    assert (first["adapter"], second["adapter"]) == (
        ["tiny-lora-adapter-candidates", "1"],
        ["tiny-lora-adapter-candidates", "2"],
    )
    assert len(client.search_model_versions("name='tiny-lora-base-candidates'")) == 1
    adapter = client.get_model_version("tiny-lora-adapter-candidates", "1")
    base = client.get_model_version("tiny-lora-base-candidates", "1")
    assert (adapter.tags["llmops.kind"], base.tags["llmops.kind"]) == ("adapter", "base")
    assert adapter.tags["weights.base_manifest_sha256"] == base.tags["weights.manifest_sha256"]
    assert adapter.tags["llmops.lora_rank"] == "8" and base.tags["llmops.base_rounding"].startswith("nf4-")
    recorded = client.get_run(adapter.run_id).data.params["weights.adapter_manifest_sha256"]
    assert recorded == adapter.tags["weights.manifest_sha256"]
    base_param = client.get_run(base.run_id).data.params["weights.base_manifest_sha256"]
    assert base_param == base.tags["weights.manifest_sha256"]

    monkeypatch.setenv("LLMOPS_SERVING_DIR", str(tmp_path / "cache"))
    served = load_file(next(local_model("models:/tiny-lora-base-candidates/1").path.glob("*.safetensors")))
    rounding = base.tags["llmops.base_rounding"]
    trained = dequantized_nf4(tiny_base, "-dq" in rounding, rounding.split("-")[1]).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(served[name].float(), trained[name].to(served[name].dtype).float())
    original = load_file(next(Path(tiny_base).glob("*.safetensors")))[name]
    assert not torch.equal(served[name].float(), original.to(served[name].dtype).float())
    files = Path(parse_adapters(["a=models:/tiny-lora-adapter-candidates/1"])["a"])
    assert (files / "adapter_model.safetensors").read_bytes() == (
        stage_outputs["train"] / "adapter_model.safetensors"
    ).read_bytes()


def test_pyfunc_from_the_alias_answers_like_the_server(mlflow_server, stage_outputs):
    import mlflow
    from mlflow import MlflowClient

    from components.chat_pyfunc import load_verified
    from serving.model_refs import local_model
    from tests.conftest import Live, server_app

    result = register.run(RegistrySection(model_name="tiny-pyfunc"), stage_outputs, "pipeline-pyfunc")
    MlflowClient().set_registered_model_alias("tiny-pyfunc-candidates", "challenger", result["version"])
    chats = [[{"role": "user", "content": text}] for text in ("I lost my card", "Where is my parcel?", "refund")]
    rows = [{"messages": chat} for chat in chats]
    answers = load_verified("models:/tiny-pyfunc-candidates@challenger").predict(rows, params={"max_tokens": 6})
    # The README's plain load still works (it checks nothing) and answers the same.
    plain = mlflow.pyfunc.load_model("models:/tiny-pyfunc-candidates@challenger")
    assert plain.predict(rows, params={"max_tokens": 6}) == answers
    served = local_model("models:/tiny-pyfunc-candidates@challenger").path
    with Live(server_app(str(served), max_total_tokens=512)) as live:
        for chat, answer in zip(chats, answers):
            body = live.post("/v1/chat/completions", {"messages": chat, "max_tokens": 6, "temperature": 0}).json()
            assert body["choices"][0]["message"]["content"] == answer


def test_registering_the_same_pipeline_run_twice_reuses_the_version(mlflow_server, stage_outputs):
    from mlflow import MlflowClient

    first = register.run(RegistrySection(model_name="tiny-once"), stage_outputs, "run-a")
    again = register.run(RegistrySection(model_name="tiny-once"), stage_outputs, "run-a")
    other = register.run(RegistrySection(model_name="tiny-once"), stage_outputs, "run-b")
    assert again["reused"] and again["version"] == first["version"] != other["version"]
    assert len(MlflowClient().search_model_versions("name='tiny-once-candidates'")) == 2


def test_stage_runs_log_to_mlflow(mlflow_server, tiny_base, tmp_path):
    from mlflow import MlflowClient

    from components.config import DataSection
    from components.stages import prepare_data

    stats = prepare_data.run(DataSection(), tiny_base, tmp_path / "data")
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()],
        "tags.`llmops.stage` = 'prepare_data'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
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

    from components.config import DataSection, EvalSection, MergeSection, QuantizeSection
    from components.demo_data import generate_rows
    from components.stages import evaluate, merge, prepare_data, quantize

    source = tmp_path / "awkward.csv"
    texts = [row["text"] for row in generate_rows(70, 3)]
    with open(source, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": text, "label": AWKWARD[i % len(AWKWARD)]} for i, text in enumerate(texts))
    stages = {
        "base": tiny_base,
        "train": tiny_adapter,
        "data": tmp_path / "data",
        "eval": tmp_path / "eval",
        "merged": tmp_path / "merged",
        "quantize": tmp_path / "quant",
    }
    prepare_data.run(DataSection(path=str(source), eval_fraction=0.5), tiny_base, stages["data"])
    report = evaluate.run(EvalSection(batch_size=8), tiny_base, tiny_adapter, stages["data"], stages["eval"])
    merge.run(
        MergeSection(parity_prompts=4, parity_threshold=0.0), tiny_base, tiny_adapter, stages["data"], stages["merged"]
    )
    quantize.run(QuantizeSection(variants=["nf4"]), stages["merged"] / "model", stages["data"], stages["quantize"])
    result = register.run(RegistrySection(model_name="awkward-labels"), stages, "pipeline-awkward")

    assert set(report["tuned"]["per_class"]) == set(AWKWARD)  # the report keeps every label exactly
    client = MlflowClient()
    run = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`llmops.stage` = 'evaluate'",
        order_by=["attributes.start_time DESC"],
    )[0]
    f1 = {name: value for name, value in run.data.metrics.items() if name.startswith("eval.tuned.f1.")}
    assert len(f1) == len(AWKWARD)  # one metric per label: the two that collide did not overwrite each other
    renamed = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/metric_names.json")
    originals = {renamed.get(name, name).removeprefix("eval.tuned.f1.") for name in f1}
    assert originals == set(AWKWARD)
    assert f1["eval.tuned.f1.reverted_card_payment_"] == report["tuned"]["per_class"]["reverted_card_payment?"]["f1"]
    version = client.get_model_version("awkward-labels-candidates", result["version"])
    assert version.tags["prompt.labels"] == str(len(AWKWARD))


# Measured on the seeded tiny learner: 34 of 36 bare answers start with a label, 0.944 with the right one.
LABELS_SHARE, RIGHT_SHARE = 0.9, 0.85


def test_a_registered_label_version_answers_a_bare_message_with_a_label(
    mlflow_server, mapping_base, with_validation, early_stopped, tmp_path
):
    """What an application sends: the customer's message alone, with no system prompt and no label list.
    The registered version frames it as training did and answers with one of its labels."""
    from mlflow import MlflowClient

    from components.jsonl import read_jsonl
    from components.prompt_contract import read_contract
    from serving.model_refs import local_model
    from tests.conftest import Live, server_app

    outputs = run_stages(mapping_base, with_validation, early_stopped[2] / "adapter", tmp_path, variants=[])
    result = register.run(RegistrySection(model_name="tiny-labels"), outputs, "pipeline-labels")
    MlflowClient().set_registered_model_alias("tiny-labels-candidates", "champion", result["version"])

    served = local_model("models:/tiny-labels-candidates@champion").path
    labels = read_contract(served)["labels"]
    rows = read_jsonl(with_validation / "eval.jsonl")
    with Live(server_app(str(served), max_total_tokens=512)) as live:
        bare, framed = [], []
        for row in rows:
            message = row["prompt"].split("Message: ")[1].split("<|im_end|>")[0]  # the text the user typed
            assert message and "Classify" not in message
            reply = live.post(
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": message}], "max_tokens": 12, "temperature": 0},
            )
            bare.append(reply.json()["choices"][0]["message"]["content"])
            as_trained = live.post("/generate", {"inputs": row["prompt"], "parameters": {"max_new_tokens": 12}})
            framed.append(as_trained.json()["generated_text"])
    assert bare == framed  # the bare message reached the model as the prompt it was trained on
    # The tiny model learns the labels (constrained accuracy ≥ LABEL_TARGET) but not where to stop, so a free
    # answer is a label followed by more tokens: it is read as the longest label it starts with.
    said = [max((lab for lab in labels if answer.startswith(lab)), key=len, default=None) for answer in bare]
    right = sum(label == row["answer"] for label, row in zip(said, rows)) / len(rows)
    assert sum(s is not None for s in said) / len(rows) >= LABELS_SHARE, bare
    assert right >= RIGHT_SHARE, list(zip(said, (row["answer"] for row in rows)))
