"""Run by the vLLM venv's interpreter (tests/integration/test_vllm_args.py): each command line on stdin (a JSON
list of argument lists) is parsed by vLLM's own OpenAI-server parser and its ModelConfig built, without loading
weights or starting an engine. Prints one JSON object per command line: accepted, or the error vLLM raised."""

import json
import sys

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser


def check(args: list[str]) -> dict:
    try:
        parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(args)
        engine = AsyncEngineArgs.from_cli_args(parsed)
        config = engine.create_model_config()
    except (Exception, SystemExit) as exc:  # argparse exits on an unknown flag
        return {"accepted": False, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "accepted": True,
        "quantization": config.quantization,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "enable_lora": engine.enable_lora,
        "max_model_len": config.max_model_len,
        "served_model_name": parsed.served_model_name,
        "lora_modules": [module.name for module in parsed.lora_modules or []],
    }


print(json.dumps([check(args) for args in json.load(sys.stdin)]))
