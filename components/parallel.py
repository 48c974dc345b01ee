"""Data-parallel training in one pod: torchrun starts cfg.per_node workers of the train stage.

One worker per GPU on NCCL; on CPU the same code path runs on gloo, which is how it is tested here.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from components.artifacts import TrainedAdapter
from components.checkpoints import CheckpointStore
from components.compute import run_choices
from components.config import TrainSection
from components.environment import NODE_RANK, SHUTDOWN_TIMEOUT
from components.util import console


def launch(worker: str, cfg: TrainSection, base_dir: Path, data_dir: Path, out_dir: Path, nodes: int = 1) -> dict:
    """Run the stage module `worker` (`python -m worker CFG BASE DATA OUT`) under torchrun with
    cfg.per_node workers in this pod; rank 0 writes the outputs. With `nodes` > 1 this pod is one node of a
    TrainJob: torchrun takes the rendezvous from the PET_* variables Kubeflow Trainer sets, and only node 0 (where
    global rank 0 runs) has outputs; the other nodes return no metrics."""
    # torchrun SIGKILLs workers this long after passing on a SIGTERM: it must cover a step plus a save
    grace = SHUTDOWN_TIMEOUT.get()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *(["--standalone"] if nodes == 1 else []),
        f"--nproc-per-node={cfg.per_node}",
        f"--shutdown-timeout={grace}",
        "-m",
        worker,
        cfg.to_json(),
        str(base_dir),
        str(data_dir),
        str(out_dir),
    ]
    store = CheckpointStore.for_run(cfg, base_dir, data_dir)
    store.restore()  # fetched once here, not raced by every worker
    run_choices(cfg, base_dir, data_dir, store.local)  # measured once, so every rank trains alike
    where = f"{cfg.per_node} processes" + (f" on each of {nodes} nodes" if nodes > 1 else "")
    console.print(f"data-parallel training: {where} on {'nccl' if cfg.use_gpu else 'gloo'}")
    proc, signalled = subprocess.Popen(cmd), []

    def forward(signum, frame):  # torchrun sends SIGTERM on to every worker and waits for them to exit
        signalled.append(signum)
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if signalled:  # the workers saved a checkpoint together; exit as a single-process run would, for the retry
        raise SystemExit(128 + signal.SIGTERM)
    out = TrainedAdapter(out_dir)
    if code == 0 and nodes > 1 and NODE_RANK.get() != "0":
        return {}  # rank 0 wrote the adapter on node 0
    if code != 0 or not out.metrics_file.exists():
        raise RuntimeError(
            f"data-parallel training failed: torchrun exited with {code} (see the workers' output above)"
        )
    return out.metrics().model_dump()
