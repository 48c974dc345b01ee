"""The command lines the deployer renders for vLLM, read by the real vLLM (installed by `make vllm`): its own
OpenAI-server parser and ModelConfig accept every flag and value we pass, and refuse what serving/engines.py
refuses for it. Needs no model weights: a Llama's config.json stands in for the fetched directory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from serving import manifests
from serving.placement import PlacedAdapter
from serving.settings import DeploySection
from serving.vllm_local import missing, python_path

pytestmark = pytest.mark.integration

if reason := missing(python_path()):
    pytest.skip(f"real vLLM is not installed here: {reason}", allow_module_level=True)

HERE = Path(__file__).resolve().parent
MODEL = HERE.parents[0] / "fixtures" / "model_configs" / "llama-3.2-1b"
RUN_ID = "0123456789abcdef0123456789abcdef"


def vllm_reads(*command_lines: list[str]) -> list[dict]:
    """What vLLM makes of each command line (one interpreter start for all: importing vLLM costs seconds)."""
    done = subprocess.run(
        [str(python_path()), str(HERE / "vllm_parse.py")],
        input=json.dumps(command_lines),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def rendered(cfg: DeploySection, quantize: str = "none", adapters: tuple = ()) -> list[str]:
    """The vLLM container's arguments, the fetched directory replaced by a config-only model directory."""
    tags = {"recommended_quantize": quantize}
    dep = manifests.render_deployment(cfg, name="llmops-demo", version="3", run_id=RUN_ID, tags=tags, adapters=adapters)
    args = list(dep["spec"]["template"]["spec"]["containers"][0]["args"])
    args[args.index("--model") + 1] = str(MODEL)
    return args


def test_vllm_accepts_every_flag_the_deployer_renders():
    one_gpu = DeploySection(engine="vllm")
    sharded = DeploySection(engine="vllm", accelerator_count=2, max_total_tokens=4096)
    extra = DeploySection(
        engine="vllm",
        extra_args={"vllm": ["--enable-prefix-caching", "--max-num-seqs", "32", "--kv-cache-dtype", "fp8"]},
    )
    adapters = tuple(PlacedAdapter(name, "2", f"digest-{name}", 8) for name in ("banking", "alpaca"))
    plain, split, tuned = vllm_reads(rendered(one_gpu), rendered(sharded, adapters=adapters), rendered(extra))
    for read in (plain, split, tuned):
        assert read["accepted"], read["error"]
        assert read["quantization"] is None and read["served_model_name"] == ["llmops-demo", "models:/llmops-demo/3"]
    assert plain["tensor_parallel_size"] == 1 and split["tensor_parallel_size"] == 2
    assert split["max_model_len"] == 4096
    assert split["enable_lora"] and sorted(split["lora_modules"]) == ["alpaca", "banking"]
    assert not plain["enable_lora"]


def test_vllm_refuses_the_bitsandbytes_quantization_engines_py_refuses_for_it():
    """vLLM 0.32 has no bitsandbytes method: were it to gain one again, this fails and the refusal can go."""
    from serving.engines import EngineRefusal

    args = rendered(DeploySection(engine="vllm"))
    (read,) = vllm_reads([*args, "--quantization", "bitsandbytes"])
    assert not read["accepted"] and "Unknown quantization method: bitsandbytes" in read["error"]
    with pytest.raises(EngineRefusal, match="no bitsandbytes"):
        rendered(DeploySection(engine="vllm"), quantize="bitsandbytes-nf4")
