"""Registry tag names live in components/registry_tags.py only: a literal elsewhere is a second spelling
that can drift (the gate writes one, the deployer reads another, and nothing serves)."""

from pathlib import Path

import pytest

from components import registry_tags
from tests.unit.source_scan import ROOT, literals, sources

pytestmark = pytest.mark.unit


OWNER = ROOT / "components" / "registry_tags.py"
NAMES = {value for key, value in vars(registry_tags).items() if key.isupper() and isinstance(value, str)}
# Families only tags use (gate.* is also the gate section's settings, so only its exact names count).
FAMILIES = ("prompt.", "weights.", "eval.base.", "eval.adapter.", "eval.tuned.")


def is_tag(text: str) -> bool:
    return text in NAMES or text.startswith(FAMILIES) or any(f" {n} " in f" {text} " for n in NAMES)


def tag_literals(path: Path, root: Path = ROOT) -> list[str]:
    """Every string constant in the file (f-strings' literal parts too) that names or begins a tag."""
    return literals(path, is_tag, root)


def test_every_tag_name_is_spelled_in_one_module():
    found = [hit for path in sources(OWNER) for hit in tag_literals(path)]
    assert not found, "use components.registry_tags:\n" + "\n".join(found)


def test_the_guard_sees_a_literal_tag(tmp_path):
    """The check can fail: an exact name, a family prefix inside an f-string, and a name in prose all count."""
    source = tmp_path / "stray.py"
    source.write_text(
        'a = tags.get("deploy.status")\n'
        'b = f"prompt.{key}"\n'
        'c = "set the tag recommended_quantize to none"\n'
        'd = "deploy.max_input_tokens must be set"\n'  # a setting's name, not a tag
    )
    hits = [hit.split(": ", 1)[1] for hit in tag_literals(source, tmp_path)]
    assert hits == ["'deploy.status'", "'prompt.'", "'set the tag recommended_quantize to none'"]


def test_statuses_compare_as_the_strings_mlflow_returns():
    assert registry_tags.DeployStatus.DEPLOYED == "deployed"
    assert {"passed": 1}[registry_tags.Verdict.PASSED] == 1
    assert str(registry_tags.DeployStatus.REFUSED) == "refused"  # what set_model_version_tag stores
