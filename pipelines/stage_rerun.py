"""`llmops stage NAME --from RUN_DIR`: one model stage run again, alone, on the artifacts a local run left.

Run as: llmops stage merge --from .llmops/kfp/finetune-<timestamp> merge.parity_prompts=8

To debug the merge one should not have to rerun the pipeline. A kfp.local run directory holds a folder per task
that ran (`<task>/<output>`), and its `resolve-config` task's outputs are the sections every stage received. The
stage takes its section from there (with `section.field=value` overrides on top) and its inputs from the run's
task folders. A task kfp's cache answered has no folder in that run: its outputs are in the earlier run that
computed them, found as the newest earlier folder whose recorded section (`stage_config.json`, which every stage
writes beside its output) is the one this run resolved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from components.artifacts import STAGE_CONFIG, MergedModel
from components.config import Section
from components.profiles import apply_overrides, current_key
from pipelines.config import PipelineConfig
from pipelines.run_form import SECTION_OUTPUTS

RESOLVE_TASK = "resolve-config"


@dataclass(frozen=True)
class Stage:
    section: str  # the resolve task's output that configures it
    inputs: tuple[str, ...]  # "<task>/<output>" it reads, in its entry's argument order
    output: str  # the folder of its own output artifact
    entry: Callable[[Section, list[Path], Path], dict]


def _run(module: str) -> Callable[[Section, list[Path], Path], dict]:
    """The stage module's own entry: run(section, *inputs, out)."""

    def call(cfg: Section, inputs: list[Path], out: Path) -> dict:
        import importlib

        return importlib.import_module(f"components.stages.{module}").run(cfg, *inputs, out)

    return call


def _quantize(cfg: Section, inputs: list[Path], out: Path) -> dict:
    from components.stages import quantize

    merged, data = inputs
    return quantize.run(cfg, MergedModel(merged).model_dir, data, out)


BASE, DATA, ADAPTER = "base-model/model", "prepare-data/dataset", "train/adapter"
# The model stages, as the pipeline wires them (pipelines/steps.py); the registry stages need MLflow and a run.
STAGES: dict[str, Stage] = {
    "base-model": Stage("model_cfg", (), "model", _run("base_model")),
    "prepare-data": Stage("data_cfg", (BASE,), "dataset", _run("prepare_data")),
    "train": Stage("train_cfg", (BASE, DATA), "adapter", _run("train")),
    "evaluate": Stage("eval_cfg", (BASE, ADAPTER, DATA), "report", _run("evaluate")),
    "merge": Stage("merge_cfg", (BASE, ADAPTER, DATA), "merged", _run("merge")),
    "quantize": Stage("quantize_cfg", ("merge/merged", DATA), "quantized", _quantize),
}
TASK_OF_OUTPUT = {spec.section: name for name, spec in STAGES.items()}


def resolved_sections(run_dir: Path) -> dict[str, str]:
    """The sections the run's resolve task handed each stage (JSON text, by output name)."""
    path = run_dir / RESOLVE_TASK / "executor_output.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a local pipeline run: no {RESOLVE_TASK}/executor_output.json")
    return json.loads(path.read_text())["parameterValues"]


def section_of(run_dir: Path, output: str, overrides: list[str] | None = None) -> Section:
    """The stage's section as the run resolved it, with `section.field=value` overrides laid on top."""
    name = SECTION_OUTPUTS[output]
    overrides = [current_key(PipelineConfig, o) for o in overrides or []]
    raw = {name: json.loads(resolved_sections(run_dir)[output])}
    if stray := [o for o in overrides or [] if not o.startswith(f"{name}.")]:
        raise ValueError(f"this stage reads the {name} section: {', '.join(stray)} would change nothing")
    raw = apply_overrides(raw, overrides, PipelineConfig)
    return PipelineConfig.model_fields[name].annotation.model_validate(raw[name])


def locate(run_dir: Path, artifact: str) -> Path:
    """`<task>/<output>` of the run: its own folder, else the newest earlier run's whose recorded section is the
    one this run resolved for that task (kfp's cache answered it there)."""
    task = artifact.split("/")[0]
    own = run_dir / artifact
    if own.exists():
        return own
    expected = section_of(run_dir, STAGES[task].section)
    earlier = sorted((d for d in run_dir.parent.glob("*") if d.is_dir() and d.name < run_dir.name), reverse=True)
    for candidate in (d / artifact for d in earlier):
        if (candidate / STAGE_CONFIG).is_file() and _recorded(candidate, type(expected)) == expected:
            return candidate
    raise FileNotFoundError(
        f"{artifact}: not in {run_dir}, and no earlier run in {run_dir.parent} made it with this run's "
        f"{SECTION_OUTPUTS[STAGES[task].section]} section; run `{task}` first: llmops stage {task} --from {run_dir}"
    )


def _recorded(output: Path, section: type[Section]) -> Section | None:
    """The section an output was made with, read with today's defaults (a field added since then compares as
    its default, as the run's own resolved section does); None where it no longer validates."""
    try:
        return section.model_validate(json.loads((output / STAGE_CONFIG).read_text())["config"])
    except ValidationError:
        return None


def rerun(name: str, run_dir: Path, out_root: Path, overrides: list[str] | None = None) -> tuple[Path, dict]:
    """Stage `name` on the run's inputs, into `out_root/<name>-<time>/<output>`: (its output, its result)."""
    if name not in STAGES:
        raise ValueError(f"stage {name!r}: one of {', '.join(STAGES)} (register and gate need a pipeline run)")
    stage = STAGES[name]
    cfg = section_of(run_dir, stage.section, overrides)
    inputs = [locate(run_dir, artifact) for artifact in stage.inputs]
    out = out_root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}" / stage.output
    out.mkdir(parents=True)
    return out, stage.entry(cfg, inputs, out)
