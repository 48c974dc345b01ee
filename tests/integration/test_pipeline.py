import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import load_config

pytestmark = pytest.mark.integration
CANDIDATES = "tiny-pipeline-candidates"


TINY = [
    "train.max_steps=4",
    "train.checkpoint_every=2",
    "train.learning_rate=0.005",
    "quantize.eval_examples=4",
    "quantize.variants=[nf4]",
    "merge.parity_prompts=4",
    "eval.batch_size=8",
    "registry.model_name=tiny-pipeline",  # the pipeline registers in tiny-pipeline-candidates
]


class Checkout:
    """A copy of the project's packages, run as `llmops run` in a subprocess: edits to it are real code changes."""

    def __init__(self, root: Path, tiny_source: Path):
        from pipelines.code_digest import PACKAGES, ROOT

        self.tree, self.runs = root / "checkout", root / "runs"
        for package in (*PACKAGES, "llmops"):  # llmops: the entry point `python -m llmops` runs
            shutil.copytree(ROOT / package, self.tree / package, ignore=shutil.ignore_patterns("__pycache__"))
        self.base = [f"model.base_model={tiny_source}", *TINY]
        self.env = {**os.environ, "PYTHONPATH": str(self.tree), "COLUMNS": "300"}

    def run(self, *overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "llmops", "run", "--root", str(self.runs), *self.base, *overrides]
        return subprocess.run(command, cwd=self.tree, env=self.env, capture_output=True, text=True, timeout=900)


def outcome_lines(stdout: str) -> dict[str, list[str]]:
    """The summary's `ran:` and `from the kfp cache ...:` lines, as task names."""
    out = {}
    for line in stdout.splitlines():
        for key, prefix in (("ran", "ran:"), ("cached", "from the kfp cache (same inputs and code):")):
            if line.startswith(prefix):
                names = line.removeprefix(prefix).strip()
                out[key] = [] if names == "none" else names.split(", ")
    return out


def registered_version(stdout: str) -> str:
    found = re.search(r"registered tiny-pipeline-candidates version (\d+)", stdout)
    assert found, stdout[-3000:]
    return found.group(1)


def test_a_failed_stage_is_fixed_and_reruns_reuse_every_finished_stage(
    mlflow_server, tiny_source, llmops_cache, tmp_path
):
    """The user's path through `llmops run`: evaluate breaks after training, the code is fixed, the same
    command runs again; a later run with unchanged inputs comes from the cache. The gate is judged each time
    against the base and the champion. (tests/unit/test_code_digest.py shows which stages each file reaches.)"""
    from mlflow import MlflowClient

    checkout = Checkout(tmp_path, tiny_source)
    evaluate = checkout.tree / "components" / "stages" / "evaluate.py"
    fixed = evaluate.read_text()
    evaluate.write_text(fixed.replace('    heading("evaluate")\n', '    raise RuntimeError("a bug in evaluate")\n', 1))
    broken = checkout.run("gate.min_gain_over_base=-1")
    assert broken.returncode == 1, broken.stdout[-3000:] + broken.stderr[-3000:]
    assert "a bug in evaluate" in broken.stdout + broken.stderr
    assert (
        "evaluate failed" in broken.stderr
        and "(base-model, prepare-data, train)" in broken.stderr
        and "only evaluate and the stages after it will run" in broken.stderr
    ), broken.stderr[-2000:]

    evaluate.write_text(fixed)  # the fix: a real edit to evaluate's code, which train never imports
    first = checkout.run("gate.min_gain_over_base=-1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert outcome_lines(first.stdout)["cached"] == ["base-model", "prepare-data", "train"]
    # What a person reads: no executor JSON, kfp task headings, training progress, the verdict, the next steps.
    assert "executor_input" not in first.stdout + first.stderr and "[KFP Executor" not in first.stdout
    assert "Executing task" in first.stdout + first.stderr
    assert re.search(r"^\s*train step 4/4\b", broken.stdout, re.M)  # the run that trained (the first one caches it)
    assert "Gate: passed" in first.stdout and "model version:  http" in first.stdout
    assert first.stdout.rstrip().splitlines()[-1].startswith("next: `llmops deployer &` then `llmops promote")
    assert {"evaluate", "merge", "quantize", "register", "gate"} <= set(outcome_lines(first.stdout)["ran"])
    client = MlflowClient()
    version = client.get_model_version(CANDIDATES, registered_version(first.stdout))
    # The flag the measured numbers imply, recomputed from the quantize report the register run keeps and the
    # thresholds of the config this run used: nf4 (the only variant measured) if it is within both, else none.
    import mlflow

    limits = load_config("local", [*checkout.base, "gate.min_gain_over_base=-1"]).quantize
    report = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/reports/quantize_report.json")
    assert set(report["results"]) == {"merged", "nf4"} and report["thresholds"] == {
        "max_accuracy_drop": limits.max_accuracy_drop,
        "max_perplexity_increase": limits.max_perplexity_increase,
    }
    merged, nf4 = report["results"]["merged"], report["results"]["nf4"]
    metric = "label_accuracy" if "label_accuracy" in merged else "exact_match"  # a label task judges labels
    within = (
        merged[metric] - nf4[metric] <= limits.max_accuracy_drop
        and nf4["perplexity"] / merged["perplexity"] - 1.0 <= limits.max_perplexity_increase
    )
    assert version.tags["recommended_quantize"] == ("bitsandbytes-nf4" if within else "none"), report["results"]
    assert version.tags["gate.verdict"] == "passed" and version.tags["gate.champion_version"] == "none"
    assert client.get_model_version_by_alias(CANDIDATES, "challenger").version == version.version

    # promoted as `llmops promote` does: copied into the production model, which holds champion
    champion = client.copy_model_version(f"models:/{CANDIDATES}/{version.version}", "tiny-pipeline")
    client.set_registered_model_alias("tiny-pipeline", "champion", champion.version)
    second = checkout.run("gate.min_gain_over_base=1.0")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert set(outcome_lines(second.stdout)["cached"]) == {
        "base-model",
        "prepare-data",
        "train",
        "evaluate",
        "merge",
        "quantize",
    }
    failed = client.get_model_version(CANDIDATES, registered_version(second.stdout))
    assert failed.version != version.version  # register is never cached: each pipeline run gets its version
    assert failed.tags["gate.verdict"] == "failed" and "gain over base" in failed.tags["gate.reason"]
    assert failed.tags["gate.champion_version"] == champion.version  # compared with the production champion too
    assert failed.aliases == []  # stays registered, with no alias
    assert client.get_model_version_by_alias(CANDIDATES, "challenger").version == version.version


def test_compiled_pipeline_is_documented_and_wired(tmp_path):
    from pipelines.finetune import compile_pipeline

    path = compile_pipeline(load_config("cluster"), str(tmp_path / "finetune.yaml"))
    spec = next(yaml.safe_load_all(open(path)))
    params = spec["root"]["inputDefinitions"]["parameters"]
    from pipelines.run_form import FORM

    assert list(params) == sorted([*FORM, "config_overrides"])  # flat: no section JSON in the run form
    assert all(p.get("description") for p in params.values())
    assert {params[name]["parameterType"] for name in ("max_steps", "lora_rank", "accelerator_count")} == {
        "NUMBER_INTEGER"
    }
    assert params["learning_rate"]["parameterType"] == "NUMBER_DOUBLE"
    resolve_inputs = spec["root"]["dag"]["tasks"]["resolve-config"]["inputs"]["parameters"]
    profile = json.loads(resolve_inputs["profile_json"]["runtimeValue"]["constant"])
    assert profile["train"]["use_gpu"] is True  # the compiled profile travels as the resolve task's constant
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {
        "resolve-config",
        "base-model",
        "prepare-data",
        "train",
        "evaluate",
        "merge",
        "quantize",
        "exit-handler-1",
        "finalize",
    }
    assert tasks["finalize"]["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}  # runs however it ends
    assert tasks["finalize"]["dependentTasks"] == ["exit-handler-1"]
    assert "status" in spec["components"]["comp-finalize"]["inputDefinitions"]["parameters"]  # PipelineTaskFinalStatus
    assert spec["root"]["outputDefinitions"]["artifacts"].keys() == {"Output"}  # the summary, from the exit task
    registry = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(registry) == {"register", "gate", "condition-2"}
    assert (
        registry["condition-2"]["triggerPolicy"]["condition"]
        == "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    )
    tasks = {**tasks, **registry}
    assert tasks["register"]["cachingOptions"] == {} == tasks["gate"]["cachingOptions"]  # caching off is empty
    assert tasks["train"]["cachingOptions"] == {"enableCache": True}
    from pipelines.finetune import CACHED_TASKS  # what a failed run's message promises stays cached

    assert {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")} == set(CACHED_TASKS)
    images = {name: ex["container"]["image"] for name, ex in spec["deploymentSpec"]["executors"].items()}
    assert "llmops-gpu" in images["exec-train"] and "llmops-cpu" in images["exec-prepare-data"]
    for executor in spec["deploymentSpec"]["executors"].values():
        assert "pip install" not in " ".join(executor["container"].get("command", []))


def test_a_wrong_form_value_fails_the_first_task_and_no_stage_starts(tmp_path, capfd, caplog):
    """The Kubeflow run form through kfp.local: the resolve task refuses the value, naming the parameter."""
    from kfp import local

    from pipelines.finetune import build_pipeline
    from pipelines.run import watch_tasks

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    with watch_tasks() as outcomes, pytest.raises(RuntimeError):
        build_pipeline(load_config("local"))(data_format="xls")
    output = "".join(capfd.readouterr()) + caplog.text  # kfp.local passes the task's output through logging
    assert "data_format (data.format): Input should be 'auto', 'alpaca', 'chat' or 'label'. Given: 'xls'" in output
    assert outcomes.tasks["resolve-config"] == "failed"
    assert not set(outcomes.tasks) & {"base-model", "prepare-data", "train", "evaluate", "merge", "quantize"}
