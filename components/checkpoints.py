"""Training checkpoints that survive the pod: where they live, which one is complete, and preemption.

Two Trainer callbacks live here, one job each: `UploadCheckpoints` mirrors each saved checkpoint to S3, and
`StopOnSigterm` turns a SIGTERM into "save at the next step, then stop".

A checkpoint directory is keyed by the training inputs (train section, base weights, data, code), so
a restarted step, in the same pipeline run or a later one with the same inputs, resumes instead of
starting over. With `train.checkpoint_root` (or LLMOPS_CHECKPOINT_ROOT) on a PVC it is durable as is;
with an s3:// root each saved checkpoint is uploaded, manifest last, and the newest one whose manifest
exists is restored before training.
"""

from __future__ import annotations

import json
import re
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from components.artifacts import BaseModelDir, CheckpointDir, PreparedData, TrainedAdapter
from components.config import TrainSection
from components.environment import CHECKPOINT_ROOT, CODE_DIGEST
from components.util import console, text_sha256

PREFIX = "checkpoint-"
# Validation's record and its best adapter live beside the checkpoints: a resumed run must not forget
# the best adapter it has seen, or it could hand on a worse one. Each best goes to a new best-<step>
# directory; the record names it only once it is complete, so the record is the commit point.
BEST, VALIDATION = "best", CheckpointDir.validation_file
# Names read back from storage are checked before they touch the disk: a step number only, never a path.
CHECKPOINT_NAME, BEST_NAME = re.compile(rf"{PREFIX}(\d+)"), re.compile(rf"{BEST}-(\d+)")


def trusted_name(name, pattern: re.Pattern, source: str) -> str | None:
    """`name` when it is exactly a name this code writes; otherwise a warning, and None (skipped, never followed)."""
    if isinstance(name, str) and pattern.fullmatch(name):
        return name
    console.print(f"warning: skipping {name!r} from {source}: not a {pattern.pattern} name", soft_wrap=True)
    return None


def read_validation(path: Path) -> dict:
    """Validation's saved state; a best adapter whose directory name is not `best-<step>` is dropped."""
    try:
        saved = json.loads(Path(path).read_text())
    except ValueError:
        console.print(f"warning: {path} is not JSON; validation starts afresh")
        return {}
    if not isinstance(saved, dict):
        return {}
    best = saved.get("best")
    if best is not None and not (isinstance(best, dict) and trusted_name(best.get("dir"), BEST_NAME, str(path))):
        saved["best"] = None
    return saved


def any_rank(flag: bool, device) -> bool:
    """True if any data-parallel rank says so: ranks that stop at different steps deadlock the others."""
    return largest_of_ranks(float(flag), device) > 0


def largest_of_ranks(value: float, device) -> float:
    """The largest value any data-parallel rank holds: one figure every rank then acts on alike."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float32, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def is_complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json last, so its presence (and validity) marks a whole checkpoint."""
    state = checkpoint / "trainer_state.json"
    if not (state.exists() and (checkpoint / TrainedAdapter.weights_file).exists()):
        return False
    try:
        json.loads(state.read_text())
    except ValueError:
        return False
    return True


def _step(path: Path | str) -> int:
    return int(str(path).rstrip("/").rsplit("-", 1)[-1])


def last_complete_checkpoint(root: Path) -> Path | None:
    found = [p for p in Path(root).glob(f"{PREFIX}*") if CHECKPOINT_NAME.fullmatch(p.name) and is_complete(p)]
    return max(found, key=_step, default=None)


def run_key(cfg: TrainSection, base_dir: Path, data_dir: Path) -> str:
    base = BaseModelDir(base_dir).info()["weights_sha256"]
    data = PreparedData(data_dir).stats().prepared_sha256
    code = CODE_DIGEST.get() or ""  # edited training code must not resume old checkpoints
    return text_sha256(f"{cfg.to_json()}|{base}|{data}|{code}")[:20]


@dataclass
class CheckpointStore:
    """This run's checkpoint directory, mirrored to S3 when the root is an s3:// URI."""

    local: Path
    remote: str | None = None

    @classmethod
    def for_run(cls, cfg: TrainSection, base_dir: Path, data_dir: Path) -> CheckpointStore:
        root = cfg.checkpoint_root or CHECKPOINT_ROOT.get() or str(Path.home() / ".cache/llmops/checkpoints")
        key = run_key(cfg, base_dir, data_dir)
        if root.startswith("s3://"):
            return cls(Path(tempfile.gettempdir()) / "llmops-checkpoints" / key, f"{root.rstrip('/')}/{key}")
        return cls(Path(root) / key)

    @property
    def where(self) -> str:
        return self.remote or str(self.local)

    def restore(self) -> Path | None:
        """The newest complete checkpoint, fetched from S3 first when that is where they live."""
        if self.remote:
            self._fetch_newest()
        return last_complete_checkpoint(self.local)

    def _fetch_newest(self) -> None:
        from components.storage import MANIFEST, client, download_dir, download_file, parse_uri

        bucket, prefix = parse_uri(self.remote)
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/{PREFIX}")
        listed = {
            key[len(prefix) + 1 : -len(MANIFEST) - 1]
            for page in pages
            for key in (o["Key"] for o in page.get("Contents", []))
            if key.endswith(f"/{MANIFEST}")
        }  # the manifest is uploaded last: its presence means complete
        finished = {name for name in listed if trusted_name(name, CHECKPOINT_NAME, self.remote)}
        if finished:
            newest = max(finished, key=_step)
            console.print(f"restoring {newest} from {self.remote}")
            download_dir(f"{self.remote}/{newest}", self.local / newest)
        try:
            download_file(f"{self.remote}/{VALIDATION}", self.local / VALIDATION)
        except FileNotFoundError:
            return  # no validation in this run, or none recorded yet
        best = read_validation(self.local / VALIDATION).get("best")
        if best:
            download_dir(f"{self.remote}/{best['dir']}", self.local / best["dir"])

    def push(self, name: str) -> None:
        """Uploads a file or directory of the local root (validation's state) when the root is on S3.
        Best adapters left behind on S3 by later ones are small (LoRA) and not deleted."""
        if not self.remote:
            return
        from components.storage import upload_dir, upload_file

        path = self.local / name
        (upload_dir if path.is_dir() else upload_file)(path, f"{self.remote}/{name}")


class UploadCheckpoints(TrainerCallback):
    """Each checkpoint the Trainer saves goes to the store's S3 mirror (nothing to do for a PVC root)."""

    def __init__(self, store: CheckpointStore):
        self.store = store

    def on_save(self, args, state, control, **kw):
        if not self.store.remote:
            return
        import torch.distributed as dist

        from components.storage import upload_dir

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its part (its RNG state) before the upload
        if state.is_world_process_zero:  # one uploader under data parallelism
            name = f"{PREFIX}{state.global_step}"
            upload_dir(self.store.local / name, f"{self.store.remote}/{name}")


class StopOnSigterm(TrainerCallback):
    """On SIGTERM (a preempted or drained node) save a checkpoint at the next step and stop.

    Kubernetes then has the grace period to wait for us; the retried step resumes from this checkpoint.
    Creating one installs the signal handler.
    """

    def __init__(self):
        self.received = False  # written by the handler only
        self.signalled = False  # every rank's agreed decision
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        console.print("SIGTERM: saving a checkpoint after this step, then stopping")
        self.received = True

    def on_step_end(self, args, state, control, **kw):
        # The handler's flag is kept apart from the agreed one: a signal landing during the all-reduce runs its
        # handler just before the result is assigned, and one shared flag would lose it to that assignment
        # (both ranks then trained on until torchrun's SIGKILL). Kept, it counts at the next step.
        self.signalled = any_rank(self.received, args.device)  # every rank stops at the same step
        if self.signalled:
            control.should_save = True
            control.should_training_stop = True

    def exit_if_signalled(self) -> None:
        if self.signalled:
            raise SystemExit(128 + signal.SIGTERM)
