import json

import pytest
import yaml

from components.config import load_config

pytestmark = pytest.mark.integration


def tiny_config(tiny_source, **extra):
    overrides = [f"model.base_model={tiny_source}", "train.max_steps=4", "train.checkpoint_every=2",
                 "train.learning_rate=0.005", "quantize.eval_examples=4", "merge.parity_prompts=4",
                 "eval.batch_size=8", "registry.model_name=tiny-pipeline"]
    return load_config("local", overrides + [f"{k}={v}" for k, v in extra.items()])


def test_whole_pipeline_runs_then_a_rerun_hits_the_cache(mlflow_server, tiny_source, llmops_cache, tmp_path):
    from mlflow import MlflowClient

    from pipelines.run import run_local

    client = MlflowClient()
    first = run_local(tiny_config(tiny_source, **{"gate.min_gain_over_base": -1.0}), tmp_path)
    assert set(first["stages"]) == {"base_model", "prepare_data", "train", "evaluate", "merge", "quantize"}
    assert not any(s["cached"] for s in first["stages"].values())
    version = client.get_model_version("tiny-pipeline", first["version"])
    assert version.tags["recommended_quantize"] in ("bitsandbytes-nf4", "bitsandbytes", "none")
    assert version.tags["gate.verdict"] == "passed" and version.tags["gate.champion_version"] == "none"
    assert client.get_model_version_by_alias("tiny-pipeline", "challenger").version == first["version"]

    client.set_registered_model_alias("tiny-pipeline", "champion", first["version"])
    second = run_local(tiny_config(tiny_source, **{"gate.min_gain_over_base": 1.0}), tmp_path)
    assert all(s["cached"] for s in second["stages"].values()), second["stages"]
    assert second["version"] != first["version"]  # register is never cached: each pipeline run gets its version
    assert second["wall_seconds"] < first["wall_seconds"]
    failed = client.get_model_version("tiny-pipeline", second["version"])
    assert failed.tags["gate.verdict"] == "failed" and "gain over base" in failed.tags["gate.reason"]
    assert failed.tags["gate.champion_version"] == first["version"]  # compared with the champion too
    assert failed.aliases == []  # stays registered, with no alias
    assert client.get_model_version_by_alias("tiny-pipeline", "challenger").version == first["version"]

    third = run_local(tiny_config(tiny_source, **{"eval.batch_size": 4}), tmp_path)
    cached = {name for name, s in third["stages"].items() if s["cached"]}
    assert cached == {"base_model", "prepare_data", "train", "merge", "quantize"}  # only evaluate saw a change


def test_compiled_pipeline_is_documented_and_wired(tmp_path):
    from pipelines.finetune import compile_pipeline

    path = compile_pipeline(load_config("cluster"), str(tmp_path / "finetune.yaml"))
    spec = next(yaml.safe_load_all(open(path)))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"model_cfg", "data_cfg", "train_cfg", "eval_cfg", "merge_cfg", "quantize_cfg", "register_cfg",
                           "gate_cfg", "challenger_alias", "accelerator_type", "accelerator_count",
                           "node_selector_json", "tolerations_json"}
    assert all(p.get("description") for p in params.values())
    assert json.loads(params["train_cfg"]["defaultValue"])["use_gpu"] is True
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"base-model", "prepare-data", "train", "evaluate", "merge", "quantize", "exit-handler-1",
                          "finalize"}
    assert tasks["finalize"]["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}  # runs however it ends
    assert tasks["finalize"]["dependentTasks"] == ["exit-handler-1"]
    assert "status" in spec["components"]["comp-finalize"]["inputDefinitions"]["parameters"]  # PipelineTaskFinalStatus
    assert spec["root"]["outputDefinitions"]["artifacts"].keys() == {"Output"}  # the summary, from the exit task
    registry = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(registry) == {"register", "gate", "condition-2"}
    assert registry["condition-2"]["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    tasks = {**tasks, **registry}
    assert tasks["register"]["cachingOptions"] == {} == tasks["gate"]["cachingOptions"]  # caching off is empty
    assert tasks["train"]["cachingOptions"] == {"enableCache": True}
    from pipelines.finetune import CACHED_TASKS  # what a failed run's message promises stays cached

    assert {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")} == set(CACHED_TASKS)
    images = {name: ex["container"]["image"] for name, ex in spec["deploymentSpec"]["executors"].items()}
    assert "llmops-gpu" in images["exec-train"] and "llmops-cpu" in images["exec-prepare-data"]
    for executor in spec["deploymentSpec"]["executors"].values():
        assert "pip install" not in " ".join(executor["container"].get("command", []))


def test_a_failed_stage_is_fixed_and_the_rerun_reuses_every_finished_stage(mlflow_server, tiny_source, llmops_cache,
                                                                          tmp_path):
    """The user's path: evaluate breaks after training, the code is fixed, the same command runs again.

    It runs on a copy of the project's packages, so the fix is a real edit to components/evaluate.py.
    """
    import os
    import shutil
    import subprocess
    import sys

    from pipelines.code_digest import PACKAGES, ROOT

    tree = tmp_path / "checkout"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    evaluate = tree / "components" / "evaluate.py"
    fixed = evaluate.read_text()
    evaluate.write_text(fixed.replace('    heading("evaluate")\n', '    raise RuntimeError("a bug in evaluate")\n', 1))
    overrides = [f"model.base_model={tiny_source}", "train.max_steps=4", "train.checkpoint_every=2",
                 "quantize.eval_examples=4", "quantize.variants=[nf4]", "merge.parity_prompts=4", "eval.batch_size=8",
                 "registry.model_name=tiny-resume", "gate.min_gain_over_base=-1"]
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "300"}
    command = [sys.executable, "-m", "pipelines.cli", "run", "--root", str(tmp_path / "root"), *overrides]

    def run():
        return subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=900)

    broken = run()
    assert broken.returncode == 1, broken.stdout[-3000:] + broken.stderr[-3000:]
    assert "a bug in evaluate" in broken.stdout + broken.stderr
    assert ("evaluate failed" in broken.stderr and "(base-model, prepare-data, train)" in broken.stderr
            and "only evaluate and the stages after it will run" in broken.stderr), broken.stderr[-2000:]

    evaluate.write_text(fixed)
    rerun = run()
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in rerun.stdout.splitlines()
             if line.startswith(("ran:", "from the kfp cache"))}
    assert lines["from the kfp cache (same inputs and code)"] == "base-model, prepare-data, train"
    assert set(lines["ran"].split(", ")) >= {"evaluate", "merge", "quantize", "register", "gate"}
