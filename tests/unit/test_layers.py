"""The layers point one way (docs/ARCHITECTURE.md): toolkit ← stages ← pipelines | serving ← the llmops CLI.

Every import counts, including those inside functions, so a change that breaks a direction fails here.
"""

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("components", "pipelines", "serving", "llmops")
# The tree says which modules are stages: components/stages/. The list checks the folder holds them all.
STAGES = {"base_model", "prepare_data", "train", "evaluate", "merge", "quantize", "register", "gate"}
# What each layer may import from the project. A stage module's own rule (no other stage) is checked apart.
ALLOWED = {
    "components": {"components"},
    "pipelines": {"components", "pipelines"},
    "serving": {"components", "serving"},
    "llmops": {"llmops", "pipelines", "serving"},
}


def project_imports(path: Path) -> set[str]:
    """Dotted names of the project modules a file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from components.stages import train` imports the module components.stages.train
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def dotted(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


@pytest.mark.parametrize("package", PACKAGES)
def test_each_layer_imports_only_the_layers_below_it(package):
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules(package)
        for name in project_imports(path)
        if name.split(".")[0] not in ALLOWED[package]
    }
    assert not wrong, sorted(wrong)


def test_no_stage_imports_another_and_no_toolkit_module_imports_a_stage():
    stages = ROOT / "components" / "stages"
    assert {p.stem for p in stages.glob("*.py")} - {"__init__"} == STAGES  # the folder holds the stages, only
    stage_modules = {f"components.stages.{stage}" for stage in STAGES}
    wrong = set()
    for path in modules("components"):
        me = dotted(path)
        for name in project_imports(path):
            if name in stage_modules and name != me:
                kind = "stage" if me in stage_modules else "toolkit module"
                wrong.add(f"{kind} {me} imports the stage {name}")
    assert not wrong, sorted(wrong)
    assert all(hasattr(__import__(name, fromlist=["run"]), "run") for name in stage_modules)  # each has a run entry


def test_components_read_nothing_from_the_layers_above():
    """Not by import, and not by path: no `pipelines/...` or `serving/...` file is opened from components."""
    pattern = re.compile(r"""["'](pipelines|serving)["'/]""")  # ("llmops" is also the project's name)
    wrong = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in modules("components")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not wrong, wrong


def test_stage_outputs_are_named_only_in_the_artifacts_module():
    from components import artifacts

    names = {
        value.name
        for cls in vars(artifacts).values()
        if isinstance(cls, type)
        for value in vars(cls).values()
        if isinstance(value, artifacts.File)
    }
    # and the module's own file-name constants (STAGE_CONFIG, CONTRACT_FILE, MANIFEST_FILE, ...)
    names |= {
        v for v in vars(artifacts).values() if isinstance(v, str) and re.search(r"\.(json|jsonl|safetensors)$", v)
    }
    expected = {"stats.json", "labels.json", "eval_report.json", "train.jsonl", "prompt_contract.json"}
    assert expected | {"weights_manifest.json", "adapter_model.safetensors", "resolved.json"} <= names
    wrong = [
        f"{path.relative_to(ROOT)}:{n}: {name}"
        for package in ("components", "pipelines", "serving", "llmops")
        for path in modules(package)
        if path.name != "artifacts.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        for name in names
        if f'"{name}"' in line or f"'{name}'" in line
    ]
    assert not wrong, wrong


def test_the_guard_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from serving.client import chat_model\n    import pipelines.run\n")
    assert project_imports(sample) == {"serving.client", "serving.client.chat_model", "pipelines.run"}


def test_the_adapter_file_names_are_peft_own():
    from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

    from components.artifacts import TrainedAdapter

    assert (TrainedAdapter.weights_file, TrainedAdapter.config_file) == (SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME)


def test_the_architecture_document_names_every_module():
    """docs/ARCHITECTURE.md is the map a newcomer reads first: a module it does not name is one they cannot find."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in modules(package)
        if path.name != "__init__.py" and path.name not in text
    ]
    assert not missing, f"name these in docs/ARCHITECTURE.md: {missing}"
