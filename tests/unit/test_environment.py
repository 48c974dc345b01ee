"""Environment variables live in components/environment.py only: a name spelled in another module is a variable
nobody can find (`llmops config --env` lists what llmops reads) or a second spelling that can drift."""

import re
from pathlib import Path

import pytest

from components import environment
from tests.unit.source_scan import ROOT, literals, sources

pytestmark = pytest.mark.unit


OWNER = ROOT / "components" / "environment.py"
VARIABLE = re.compile(r"\b(?:LLMOPS|MLFLOW|HF|AWS|VLLM|KUBERNETES|TOKENIZERS|ONEDNN)_[A-Z0-9_]*[A-Z0-9]\b")


def env_literals(path: Path, root: Path = ROOT) -> list[str]:
    """Every string constant (docstrings aside) that names a variable."""
    return literals(path, lambda text: bool(VARIABLE.search(text)), root, with_docstrings=False)


def test_every_environment_variable_is_named_in_one_module():
    found = [hit for path in sources(OWNER) for hit in env_literals(path)]
    assert not found, "use components.environment:\n" + "\n".join(found)


def test_the_guard_sees_a_variable_in_code_and_in_prose(tmp_path):
    source = tmp_path / "stray.py"
    source.write_text(
        '"""A module that reads LLMOPS_CACHE (its docstring may say so)."""\n'
        'a = os.environ.get("LLMOPS_CACHE")\n'
        'b = f"set LLMOPS_ENDPOINT_URL to {url}"\n'
        'c = "mlflow_tracking_uri is a setting"\n'  # a setting's name, not a variable
    )
    hits = [hit.split(": ", 1)[1] for hit in env_literals(source, tmp_path)]
    assert hits == ["'LLMOPS_CACHE'", "'set LLMOPS_ENDPOINT_URL to '"]


def test_int8_scoring_bounds_onednns_kernel_cache_for_its_block_and_keeps_a_users_value(monkeypatch):
    """The bound is set for the block that runs the process's first kernels (a quantize or gate process), and undone
    after it, so an in-process caller does not hand it to the training processes it starts later."""
    import os

    from components.inference import bounded_int8_kernels

    monkeypatch.delenv(environment.ONEDNN_CACHE.name, raising=False)
    with bounded_int8_kernels():
        assert os.environ[environment.ONEDNN_CACHE.name] == "8"
    assert environment.ONEDNN_CACHE.name not in os.environ
    monkeypatch.setenv(environment.ONEDNN_CACHE.name, "64")
    with bounded_int8_kernels():
        assert os.environ[environment.ONEDNN_CACHE.name] == "64"
    assert os.environ[environment.ONEDNN_CACHE.name] == "64"


def test_mlflow_experiment_name_wins_over_the_pipelines_own_and_the_config(monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("LLMOPS_EXPERIMENT", raising=False)
    assert environment.experiment("from-config") == "from-config"
    monkeypatch.setenv("LLMOPS_EXPERIMENT", "from-run")
    assert environment.experiment("from-config") == "from-run"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mlflows-own")
    assert environment.experiment("from-config") == "mlflows-own"


def test_config_env_lists_every_variable_read_with_its_value_and_hides_secrets(monkeypatch):
    from typer.testing import CliRunner

    from llmops.cli import app

    monkeypatch.setenv("LLMOPS_WEBHOOK_SECRET", "hunter2-never-printed")
    monkeypatch.setenv("LLMOPS_SERVING_DIR", "/srv/records")
    monkeypatch.delenv("LLMOPS_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.setenv("COLUMNS", "250")
    out = CliRunner().invoke(app, ["config", "--env"]).output
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 3}
    assert set(lines) >= {v.name for v in environment.READ}
    assert "/srv/records" in lines["LLMOPS_SERVING_DIR"]
    assert "(unset; 90)" in lines["LLMOPS_SHUTDOWN_TIMEOUT"]  # the default it falls back to
    assert "(set)" in lines["LLMOPS_WEBHOOK_SECRET"] and "hunter2" not in out


def test_tests_set_the_environment_through_monkeypatch():
    """A test (or fixture) that writes os.environ itself leaks into every later test when it forgets to restore
    it, or restores it wrong; pytest's MonkeyPatch undoes what it set. (tests/benchmarks are `make bench`'s
    scripts, not tests.)"""
    import ast

    def writes(node: ast.AST) -> bool:
        environ = lambda n: isinstance(n, ast.Attribute) and n.attr == "environ"  # noqa: E731
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            return any(isinstance(t, ast.Subscript) and environ(t.value) for t in targets)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and environ(node.func.value):
            return node.func.attr in ("update", "pop", "clear", "__setitem__", "__delitem__", "popitem")
        return False

    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if "benchmarks" not in path.parts
        for node in ast.walk(ast.parse(path.read_text()))
        if writes(node)
    ]
    assert not found, "set it with monkeypatch (pytest.MonkeyPatch.context() in a session fixture):\n" + "\n".join(
        found
    )
