"""Every command the README documents, run as a user types it, on SmolLM2 and real data.

The commands run as subprocesses in a fresh workspace: `make run` on the demo data, the README's
promote-and-chat flow through the deployer, `llmops serve` of a registered alias, `llmops compile`, and
the BANKING77 profile on all 77 labels with their real names. Overrides are added only where time
demands it (few training steps, small eval slices), and each command is first checked to stand in the
README as written, so a command that changes there without changing here fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
import torch
import yaml

from tests.conftest import ROOT, free_port, shared_path, wait_for
from tests.e2e.workspace import ANSWER, QUESTION, documented, healthy, stop

pytestmark = pytest.mark.e2e


def test_make_run_registers_a_tuned_demo_model_that_the_registry_reproduces(workspace, demo_run, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from components.chat_pyfunc import artifact_paths
    from components.config import EvalSection
    from components.inference import LabelTrie, load_model, load_tokenizer, predict_labels
    from components.jsonl import read_jsonl
    from components.literal_text import model_input
    from components.prompt_contract import read_contract
    from components.scoring import score_model

    assert "registered llmops-demo-candidates version 1" in demo_run.stdout
    assert f"MLflow UI: {workspace.tracking_uri}" in demo_run.stdout
    # What a person reads: under 150 lines, no executor JSON, no bar redrawn in a pipe
    printed = (demo_run.stdout + demo_run.stderr).splitlines()
    assert len(printed) < 150, "\n".join(printed)
    assert not any("\r" in line or "executor_input" in line or re.search(r"━\s*\d+/\d+", line) for line in printed)
    assert re.search(r"^\s*train step \d+/\d+ · loss \d", demo_run.stdout, re.M)
    version = MlflowClient().get_model_version("llmops-demo-candidates", "1")
    assert float(version.tags["eval.tuned.exact_match"]) > float(version.tags["eval.base.exact_match"]) + 0.5
    assert version.tags["gate.verdict"] == "passed" and version.aliases == ["challenger"]
    assert version.tags["prompt.user_prefix"].startswith("Classify the message into one of these labels:")

    # The registry holds an MLflow model: pyfunc answers the README's question from the alias.
    pyfunc = mlflow.pyfunc.load_model("models:/llmops-demo-candidates@challenger")
    assert pyfunc.predict({"messages": [{"role": "user", "content": QUESTION}]}) == [ANSWER]

    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri="models:/llmops-demo-candidates/1", dst_path=str(tmp_path))
    )
    served, _ = artifact_paths(local)
    quant = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/reports/quantize_report.json")
    data_dir = sorted(workspace.root.glob("kfp/finetune-*/prepare-data/dataset"))[0]  # the demo run: the first
    examples = read_jsonl(data_dir / "eval.jsonl")[: quant["examples"]]
    labels = read_contract(served)["labels"]
    # Scored as the quantize stage scored the merge (its default dtype, its eval settings, the same rows):
    # the registry's own files reproduce what the pipeline measured, to the example.
    model, tok = load_model(served), load_tokenizer(served)
    scored = score_model(model, tok, examples, EvalSection(), labels, "registered")
    metrics = scored.metrics
    assert metrics["exact_match"] == pytest.approx(quant["results"]["merged"]["exact_match"], abs=1e-9)
    assert metrics["label_accuracy"] >= metrics["exact_match"]
    # scoring decodes under the constraint only rows whose free answer is no label's path; all rows so decoded agree
    prompts = [model_input(e) for e in examples]
    assert scored.constrained == predict_labels(model, tok, prompts, LabelTrie(tok, labels), EvalSection().batch_size)
    assert float(version.tags["eval.tuned.exact_match"]) == pytest.approx(quant["served"]["exact_match"], abs=1e-4)


def test_one_stage_reruns_alone_on_what_make_run_left(workspace, demo_run):
    """`llmops stage` (the README's line for debugging one stage): prepare-data again with one setting changed,
    its section and its base model from make run's own folders, its output beside them."""
    documented("llmops stage merge merge.parity_prompts=8")
    run_dir = next(d for d in sorted(workspace.root.glob("kfp/finetune-*")) if (d / "prepare-data").is_dir())
    done = workspace.llmops(
        "stage", "prepare-data", "--from", str(run_dir), "--root", str(workspace.root), "data.val_examples=5"
    )
    assert f"prepare-data from {run_dir}" in done.stdout and '"validation": 5' in done.stdout
    (out,) = workspace.root.glob("stages/prepare-data-*/dataset")
    assert len((out / "val.jsonl").read_text().splitlines()) == 5
    made = json.loads((run_dir / "prepare-data" / "dataset" / "stage_config.json").read_text())["config"]
    assert json.loads((out / "stage_config.json").read_text())["config"] == made | {"val_examples": 5}


def test_readme_promote_then_chat_answers_with_the_label(workspace, champion):
    from openai import OpenAI

    from serving.client import chat_model

    documented(f'.venv/bin/llmops chat "{QUESTION}" --model llmops-demo@champion')
    _, status = champion
    assert status["deploy.status"] == "deployed", status
    # the local profile's engine is auto: real vLLM where `make vllm` installed it, else our server
    from serving.vllm_local import missing, python_path

    assert status["deploy.served_engine"] == ("tgi" if missing(python_path()) else "vllm"), status
    answer = workspace.llmops("chat", QUESTION, "--model", "llmops-demo@champion").stdout.strip()
    assert answer == ANSWER

    with pytest.MonkeyPatch.context() as env:
        env.setenv("LLMOPS_SERVING_DIR", str(workspace.root / "serving"))
        assert chat_model("llmops-demo@champion").invoke(QUESTION).content.strip() == ANSWER
    openai = OpenAI(base_url=status["deploy.endpoint"] + "/v1", api_key="-")
    reply = openai.chat.completions.create(  # vLLM answers to the registered name; ours to any
        model="llmops-demo", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=16
    )
    assert reply.choices[0].message.content.strip() == ANSWER


def test_serve_a_registered_alias(workspace, demo_run):
    from openai import OpenAI

    documented("`llmops serve models:/llmops-demo@champion`")
    port = free_port()
    workspace.env["MLFLOW_TRACKING_URI"] = workspace.tracking_uri
    server = workspace.start("serve", "models:/llmops-demo-candidates@challenger", "--port", str(port))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(url) or server.poll() is not None, 180, "llmops serve to answer /health")
        assert server.poll() is None, (workspace.path / "serve.log").read_text()[-3000:]
        info = requests.get(f"{url}/info", timeout=10).json()
        assert info["model_id"] == "models:/llmops-demo-candidates/1"
        reply = OpenAI(base_url=f"{url}/v1", api_key="-").chat.completions.create(
            model="tgi",
            messages=[{"role": "user", "content": "My credit card is missing, please block it"}],
            temperature=0,
            max_tokens=16,
        )
        assert reply.choices[0].message.content.strip() == ANSWER
    finally:
        stop(server)


def test_compile_config_and_demo_data(workspace):
    documented("`llmops compile --profile cluster -o finetune.yaml`")
    workspace.llmops("compile", "--profile", "cluster", "-o", "finetune.yaml")
    spec = next(yaml.safe_load_all((workspace.path / "finetune.yaml").read_text()))
    assert spec["pipelineInfo"]["name"] == "finetune" and "train" in spec["root"]["dag"]["tasks"]
    assert "max_steps: 3" in workspace.llmops("config", "train.max_steps=3").stdout
    workspace.llmops("demo-data", "-o", "demo")
    assert len((workspace.path / "demo" / "tickets.csv").read_text().splitlines()) > 300


def test_banking77_profile_registers_a_version_on_all_77_labels(workspace, demo_run):
    from mlflow import MlflowClient

    data = shared_path("data", "banking77", "train.csv")
    documented('make run DATA=../shared/data/banking77/train.csv ARGS="--profile banking77"')
    assert data == ROOT.parent / "shared" / "data" / "banking77" / "train.csv"  # the README's relative path
    # A few steps prove the wiring on the full label set; the profile's hour proves quality (make bench quality).
    # (quantize.variants=[]: the demo run above scores both variants; here the merge serves as it is)
    quick = (
        "train.max_steps=2 train.eval_every=2 train.checkpoint_every=2 train.max_minutes=10 "
        "data.max_eval_examples=12 data.val_examples=12 quantize.variants=[] merge.parity_prompts=4"
    )
    done = workspace.make(
        "run",
        timeout=1200,
        DATA="../shared/data/banking77/train.csv",
        ARGS=f"--profile banking77 --root {workspace.root} {quick}",
    )
    found = re.search(r"registered llmops-banking77-candidates version (\d+)", done.stdout)
    assert found, done.stdout[-3000:]
    # train.max_minutes is the run's budget: training's clock is the run's, and the summary sets it beside the stages
    assert "run budget 10 min:" in done.stdout and "left to train" in done.stdout, done.stdout[-3000:]
    budget = re.search(r"keeping ([\d.]+) min for the stages after it; they took ([\d.]+) min", done.stdout)
    assert budget and float(budget.group(1)) > 1, done.stdout[-3000:]  # the fixed part alone is over a minute
    # The printed summary is kept beside the run; each stage's process recorded its peak memory, and the summary
    # names the stage with the largest. `make bench` renders the same file.
    from pipelines.run import SUMMARY, peak_stage
    from tests.benchmarks import banking77_run

    summary = json.loads(sorted(workspace.root.glob(f"kfp/finetune-*/{SUMMARY}"))[-1].read_text())
    assert str(summary["version"]) == found.group(1) and summary["budget"]["after_seconds"] > 0
    assert all(info["peak_rss_bytes"] > 50e6 for info in summary["stages"].values())  # an idle interpreter: ~10 MB
    stage, peak = peak_stage(summary["stages"])
    assert f"peak memory {peak / 1e9:.2f} GB, set by the {stage} stage" in done.stdout, done.stdout[-3000:]
    rendered = dict((row[0], row[1]) for row in banking77_run.rows(summary))
    assert rendered["whole run, wall time (min)"] == f"{summary['wall_seconds'] / 60:.1f}"
    assert rendered[f"peak memory (GB), set by {stage}"] == f"{peak / 1e9:.2f}"
    version = MlflowClient().get_model_version("llmops-banking77-candidates", found.group(1))
    assert version.tags["prompt.labels"] == "77"
    # Two steps may or may not beat the base: the verdict must follow from the gain the gate recorded
    from components.config import GateSection

    tags, least = version.tags, GateSection().min_gain_over_base
    assert tags["gate.metric"] == "exact_match" and tags["gate.champion_version"] == "none"  # the profile's gate
    assert tags["gate.verdict"] == ("passed" if float(tags["gate.gain_over_base"]) >= least else "failed"), tags
    import mlflow

    report = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/reports/eval_report.json")
    assert len(report["labels"]) == 77 and "reverted_card_payment?" in report["labels"]
    assert "from the kfp cache (same inputs and code): base-model" in done.stdout  # the demo run's base model


def demo_outputs(workspace) -> tuple[Path, Path, Path]:
    """make run's base model, adapter and prepared data: from the first run that produced them (a later run in
    this workspace may take them from kfp's cache instead)."""
    run_dir = next(
        d
        for d in sorted(workspace.root.glob("kfp/finetune-*"))
        if (d / "base-model" / "model" / "config.json").is_file() and (d / "train" / "adapter").is_dir()
    )
    return run_dir / "base-model" / "model", run_dir / "train" / "adapter", run_dir / "prepare-data" / "dataset"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the plan is checked on a GPU only where there is one")
def test_on_a_gpu_evaluation_allocates_what_its_plan_says(workspace, demo_run, tmp_path):
    """The evaluate stage on the GPU, at two batches: torch.cuda.max_memory_allocated within 25% of its plan
    without the CUDA context (which the allocator does not count)."""
    from components import memory_plan
    from components.artifacts import PreparedData
    from components.config import EvalSection
    from tests.benchmarks import memory_plan as memory_plan_bench

    base, adapter, data = demo_outputs(workspace)
    longest = memory_plan.longest_row(PreparedData(data).examples("eval"))
    shape, lora = memory_plan.model_shape(base), memory_plan.adapter_params(adapter)
    for batch in (8, 32):
        out = tmp_path / f"{batch}"
        allocated = memory_plan_bench.growth("evaluate", {"batch_size": batch}, base, adapter, data, out, on_gpu=True)
        plan = memory_plan.eval_plan(shape, EvalSection(batch_size=batch), longest, lora, gpu=True)
        planned = plan.total - plan.items["runtime"]
        assert 0.75 <= planned / allocated <= 1.25, (batch, allocated / 1e6, planned / 1e6)


def test_the_streaming_merge_of_smollm2_stays_within_its_planned_memory(workspace, demo_run, tmp_path):
    """make run's own base and adapter, the base re-saved in 60 MB shards: the merge's peak RSS growth, measured
    in its own process, stays under the plan (components.memory_plan.streaming_merge_bytes) with 25% slack."""
    from transformers import AutoModelForCausalLM

    from components import memory_plan
    from components.stages import merge
    from tests.benchmarks import memory_plan as memory_plan_bench

    base, adapter, _ = demo_outputs(workspace)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base, dtype="bfloat16").save_pretrained(sharded, max_shard_size="60MB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) >= 4
    settings = {"dtype": "float16", "nf4": merge.trained_base(adapter)}
    growth = memory_plan_bench.growth("stream_merge", settings, sharded, adapter, tmp_path / "out")
    shape = memory_plan.model_shape(base)
    adapter_bytes = memory_plan.adapter_params(adapter) * 4
    planned = memory_plan.streaming_merge_bytes(shape, max(p.stat().st_size for p in shards), adapter_bytes)
    assert 0 < growth <= planned * 1.25, (growth / 1e6, planned / 1e6)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == len(shards)
