"""Each kfp task's cache key covers the code it runs: a fix to one stage leaves the others' caches valid."""

import inspect
import shutil

import pytest

from pipelines import steps
from pipelines.code_digest import PACKAGES, ROOT, module_closure, task_digest

pytestmark = pytest.mark.unit
STAGES = {
    "train": steps.train,
    "evaluate": steps.evaluate,
    "merge": steps.merge,
    "quantize": steps.quantize,
    "prepare_data": steps.prepare_data,
}


@pytest.fixture
def tree(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def digests(root) -> dict[str, str]:
    return {name: task_digest(component, root) for name, component in STAGES.items()}


def edit(root, relative: str) -> None:
    path = root / relative
    path.write_text(path.read_text() + "\n# a fix\n")


def test_a_fix_to_evaluate_reruns_evaluate_only(tree):
    before = digests(tree)
    assert before == digests(ROOT)  # the same code gives the same keys wherever it lives
    edit(tree, "components/stages/evaluate.py")
    after = digests(tree)
    assert after["evaluate"] != before["evaluate"]
    assert {name for name in STAGES if after[name] == before[name]} == {"train", "merge", "quantize", "prepare_data"}


def test_shared_toolkit_code_reaches_every_stage_that_imports_it(tree):
    before = digests(tree)
    edit(tree, "components/inference.py")
    after = digests(tree)
    assert {name for name in STAGES if after[name] != before[name]} == {"train", "evaluate", "merge", "quantize"}
    edit(tree, "components/validation.py")  # imported lazily, inside a function of train
    assert digests(tree)["train"] != after["train"]


def test_closure_follows_imports_inside_functions():
    files = {str(p.relative_to(ROOT)) for p in module_closure(inspect.getsource(steps.train.python_func))}
    assert {
        "components/stages/train.py",
        "components/validation.py",
        "components/parallel.py",
        "pipelines/kfp_io.py",
        "components/__init__.py",
    } <= files
    assert "components/stages/evaluate.py" not in files


def test_every_task_of_the_compiled_pipeline_carries_its_own_digest(tmp_path):
    import yaml

    from pipelines.config import load_config
    from pipelines.finetune import compile_pipeline

    spec = next(yaml.safe_load_all(open(compile_pipeline(load_config("cluster"), str(tmp_path / "f.yaml")))))
    env = {
        name.removeprefix("exec-"): {e["name"]: e["value"] for e in ex["container"]["env"]}["LLMOPS_CODE_DIGEST"]
        for name, ex in spec["deploymentSpec"]["executors"].items()
    }
    assert env["train"] == task_digest(steps.train) and env["evaluate"] == task_digest(steps.evaluate)
    assert len(set(env.values())) == len(env)  # no two tasks share a key: each covers different code
