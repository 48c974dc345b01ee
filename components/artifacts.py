"""The files one stage hands the next: each output directory's file names, paths and readers, in one place.

A stage writes into its kfp output directory and later stages read from it; wrapping that directory in the
class below names every file once. On the class an attribute is the file's name (`PreparedData.stats_file`
is "stats.json"); on an instance it is the path (`PreparedData(d).stats_file` is d / "stats.json").
"""

from __future__ import annotations

from pathlib import Path

from components.jsonl import read_jsonl
from components.util import read_json, write_json

STAGE_CONFIG = "stage_config.json"  # in every stage's output: the section it ran with
TIMING = "timing.json"  # in every stage's output under kfp: how long the stage took (pipelines/kfp_io.py)
CONTRACT_FILE = "prompt_contract.json"  # in prepared data and the merged model: how a bare message is framed
MANIFEST_FILE = "weights_manifest.json"  # in the registered model: the sha256 of every served file


def record_config(out_dir: Path, stage: str, section) -> None:
    """Keep the section that produced an artifact beside it; register hashes these for lineage."""
    write_json(Path(out_dir) / STAGE_CONFIG, {"stage": stage, "config": section.model_dump()})


class File:
    """A file in a stage's output directory: its name on the class, its path on an instance."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, instance, owner=None):
        return self.name if instance is None else instance.root / self.name


class Output:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def stage_config(self) -> dict | None:
        path = self.root / STAGE_CONFIG
        return read_json(path) if path.exists() else None


class BaseModelDir(Output):
    """base_model: a 16-bit safetensors model directory, and what is known about its weights."""

    info_file = File("llmops_base.json")  # source, revision, weights_sha256, parameters

    def info(self) -> dict:
        return read_json(self.info_file)


class PreparedData(Output):
    """prepare_data: rendered splits, the label set of a label task, counts, and the rows rejected."""

    train_file = File("train.jsonl")
    eval_file = File("eval.jsonl")
    val_file = File("val.jsonl")  # only with data.val_examples
    labels_file = File("labels.json")  # only for label tasks
    stats_file = File("stats.json")
    rejects_file = File("rejects.jsonl")
    contract_file = File(CONTRACT_FILE)  # how a bare message becomes the trained prompt

    def examples(self, split: str) -> list[dict]:
        return read_jsonl(self.root / f"{split}.jsonl")

    def labels(self) -> list[str] | None:
        return read_json(self.labels_file) if self.labels_file.exists() else None

    def stats(self):
        from components.reports import Data

        return Data.read(self.stats_file)


class TrainedAdapter(Output):
    """train: the adapter directory (PEFT's own files and the tokenizer), with the run's numbers."""

    weights_file = File("adapter_model.safetensors")  # PEFT's names (peft.utils.constants), in every checkpoint too
    config_file = File("adapter_config.json")
    metrics_file = File("train_metrics.json")
    history_file = File("history.json")  # the Trainer's log history: loss per logged step
    validation_curve_file = File("validation_curve.json")
    accuracy_plot_file = File("accuracy_over_time.png")

    def metrics(self):
        from components.reports import Train

        return Train.read(self.metrics_file)


class EvalReport(Output):
    """evaluate: base and tuned metrics side by side, every prediction, the tuned confusion matrix."""

    report_file = File("eval_report.json")
    predictions_file = File("predictions.json")
    confusion_plot_file = File("confusion_tuned.png")
    SAMPLES = "sample_predictions.json"  # an MLflow table, not a file in the directory

    def report(self):
        from components.reports import Eval

        return Eval.read(self.report_file)

    def predictions(self) -> list[dict]:
        return read_json(self.predictions_file)


class MergedModel(Output):
    """merge: the model TGI serves (in model/) and the parity report."""

    report_file = File("merge_report.json")

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def report(self):
        from components.reports import Merge

        return Merge.read(self.report_file)


class QuantizeReport(Output):
    """quantize: each variant's scores, the recommended TGI --quantize flag, and what will serve."""

    report_file = File("quantize_report.json")

    def report(self):
        from components.reports import Quantize

        return Quantize.read(self.report_file)


class CheckpointDir(Output):
    """train's checkpoint store (local, mirrored to S3): what a restarted or data-parallel run reads back."""

    resolved_file = File("resolved.json")  # the "auto" choices measured once (components.compute)
    validation_file = File("validation.json")  # validation's record and the best adapter's directory


# register: the run's summary, kept with its MLflow run (the pipeline's exit task hands it back)
REGISTRATION_SUMMARY = "registration.json"
