"""`llmops stage NAME --from RUN_DIR` (pipelines/stage_rerun.py): the section and the inputs a local run left."""

import json

import pytest

from components.artifacts import STAGE_CONFIG
from pipelines.config import load_config
from pipelines.run_form import SECTION_OUTPUTS
from pipelines.stage_rerun import locate, rerun, section_of

pytestmark = pytest.mark.unit


def a_run(root, name, cfg, tasks=()):
    """A kfp.local run directory: the resolve task's sections, and a folder per task that ran."""
    run = root / name
    sections = {output: getattr(cfg, section).to_json() for output, section in SECTION_OUTPUTS.items()}
    (run / "resolve-config").mkdir(parents=True)
    (run / "resolve-config" / "executor_output.json").write_text(json.dumps({"parameterValues": sections}))
    for task, output, section in tasks:
        (run / task / output).mkdir(parents=True)
        record = {"stage": task, "config": getattr(cfg, section).model_dump()}
        (run / task / output / STAGE_CONFIG).write_text(json.dumps(record))
    return run


def test_a_cached_input_comes_from_the_newest_earlier_run_that_made_it_with_this_section(tmp_path):
    cfg = load_config("local")
    other = load_config("local", ["model.dtype=float16"])
    base = ("base-model", "model", "model")
    made_it = a_run(tmp_path, "finetune-2026-01-02", cfg, [base, ("train", "adapter", "train")])
    a_run(tmp_path, "finetune-2026-01-03", other, [base])  # newer, but another base-model section
    a_run(tmp_path, "finetune-2026-01-09", cfg, [base])  # later than the run asked about: not its cache
    run = a_run(tmp_path, "finetune-2026-01-05", cfg, [("merge", "merged", "merge")])

    assert locate(run, "base-model/model") == made_it / "base-model" / "model"
    assert locate(run, "merge/merged") == run / "merge" / "merged"  # a task that ran in this run: its own
    with pytest.raises(FileNotFoundError, match="llmops stage prepare-data --from"):
        locate(run, "prepare-data/dataset")


def test_overrides_reach_the_stage_section_and_nothing_else(tmp_path):
    run = a_run(tmp_path, "finetune-1", load_config("local"))
    assert section_of(run, "merge_cfg", ["merge.parity_prompts=3"]).parity_prompts == 3
    with pytest.raises(ValueError, match="reads the merge section: train.max_steps=2 would change nothing"):
        section_of(run, "merge_cfg", ["train.max_steps=2"])
    with pytest.raises(ValueError, match="register and gate need a pipeline run"):
        rerun("register", run, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a local pipeline run"):
        rerun("merge", tmp_path, tmp_path / "out")


def test_every_stage_opens_with_how_to_run_it_and_the_model_stages_run_alone():
    """Each stage module's docstring gives its "Run as:" line within its first paragraphs; the model stages name
    their own `llmops stage` command, which exists (the registry stages run as pipeline tasks)."""
    import importlib

    from pipelines.stage_rerun import STAGES as RUNNABLE
    from tests.unit.test_layers import STAGES

    for module in STAGES:
        doc = importlib.import_module(f"components.stages.{module}").__doc__
        opening = "\n\n".join(doc.split("\n\n")[:2])
        assert "Run as: " in opening, f"components/stages/{module}.py: no 'Run as:' line at the top of its docstring"
        command = module.replace("_", "-")
        assert (f"llmops stage {command}" in opening) == (command in RUNNABLE), module
