"""One node of a TrainJob (pipelines/trainjob.py): fetch the inputs, train under torchrun, node 0 uploads.

Run as (Kubeflow Trainer runs it on every node): python -m pipelines.trainjob_node CFG_JSON BASE_URI DATA_URI OUT_URI

Each node downloads the base model and the data the train task uploaded (checked against their manifests),
restores the newest durable checkpoint, and runs the train stage under torchrun
with the rendezvous Trainer's torch runtime set (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT).
Global rank 0 runs on node 0, which writes the adapter and uploads it to OUT_URI for the waiting train task.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from components import storage
from components.config import TrainSection
from components.environment import NODE_RANK
from components.parallel import launch


def local(uri: str, into: Path) -> Path:
    """A local directory holding `uri`: downloaded (and checked against its manifest) from S3, or as it is."""
    return storage.download_dir(uri, into) if uri.startswith("s3://") else Path(uri)


def main(argv: list[str]) -> None:
    cfg = TrainSection.model_validate_json(argv[0])
    work = Path(tempfile.mkdtemp(prefix="llmops-node-"))
    base, data = local(argv[1], work / "base"), local(argv[2], work / "data")
    out = work / "adapter"
    launch("components.stages.train", cfg, base, data, out, nodes=cfg.nodes)
    if NODE_RANK.get() == "0":
        storage.upload_dir(out, argv[3])


if __name__ == "__main__":
    main(sys.argv[1:])
