"""What `llmops run` lets through from kfp.local's task output (pipelines/run_output.py)."""

import io

import pytest

from pipelines.run_output import _TaskLines

pytestmark = pytest.mark.unit

TASK = """\
    [KFP Executor 2026-12-02 15:54:12,590 INFO]: Looking for component `train` in --component_module_path `/tmp/x.py`
    [KFP Executor 2026-12-02 15:54:12,591 INFO]: Got executor_input:
    {
        "inputs": {
            "parameterValues": {"train_cfg": "{}"}
        }
    }
    compute dtype bfloat16: bf16 matmul 4.0x fp32 on this machine
    /venv/lib/python3.11/site-packages/mlflow/data/registry.py:148: UserWarning: The source can be read two ways
      return _dataset_source_registry.resolve(
    Loading weights: 100%|██████████| 20/20 [00:00<00:00, 15720.78it/s]


    train step 12/60 · loss 2.345 · 310 tok/s · ETA 00:02:10
    [KFP Executor 2026-12-02 15:54:16,063 INFO]: Wrote executor output file to /tmp/executor_output.json
"""


def test_a_task_keeps_its_own_lines_and_drops_kfp_plumbing_and_library_noise():
    out = io.StringIO()
    lines = _TaskLines(out)
    for chunk in (TASK[:100], TASK[100:]):  # output arrives in pieces, not lines
        lines.write(chunk)
    assert out.getvalue().splitlines() == [
        "    compute dtype bfloat16: bf16 matmul 4.0x fp32 on this machine",
        "",
        "    train step 12/60 · loss 2.345 · 310 tok/s · ETA 00:02:10",
    ]
