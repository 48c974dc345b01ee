"""What each serving engine is told: TGI's launcher arguments, or vLLM's OpenAI server arguments.

One place decides which engine serves a version (its `deploy.engine` tag, else the profile's per-model
choice, else the profile's default), how the version's recommended quantization maps onto that engine, and
which extra engine flags a profile may pass. The Kubernetes manifests and the local backend both build their
command lines here, so a version refused for one is refused for the other with the same reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from components import environment
from components.registry_tags import ENGINE_TAG, QUANTIZE_TAG

Engine = Literal["tgi", "vllm"]
ENGINES: tuple[Engine, ...] = ("tgi", "vllm")
# Each engine's process environment wherever it runs: offline (no Hub), no usage reports.
ENGINE_ENV: dict[Engine, dict[str, str]] = environment.ENGINE_ENV
QUANTIZE_VALUES = ("bitsandbytes-nf4", "bitsandbytes", "none")  # what components/stages/register.py writes


class EngineRefusal(ValueError):
    """The version, or a profile setting, asks for something the engine cannot honour; the message says why."""


def engine_for(tags: dict, default: str, per_model: dict[str, str] | None = None, name: str = "") -> Engine:
    """The version's `deploy.engine` tag, else the profile's choice for this model, else its default."""
    engine = tags.get(ENGINE_TAG) or (per_model or {}).get(name) or default
    if engine not in ENGINES:
        raise EngineRefusal(f"{ENGINE_TAG}={engine!r} is not one of {', '.join(ENGINES)}")
    return engine


def quantize_args(engine: Engine, tags: dict) -> list[str]:
    """The version's recommended quantization as this engine's flag, or a refusal naming why it cannot be."""
    value = tags.get(QUANTIZE_TAG, "none")
    if value not in QUANTIZE_VALUES:
        raise EngineRefusal(f"{QUANTIZE_TAG}={value!r} is not one of {QUANTIZE_VALUES}")
    if value == "none":
        return []
    if engine == "tgi":
        return ["--quantize", value]
    # vLLM 0.32 (deploy.vllm_image) has no bitsandbytes method at all: its ModelConfig refuses
    # `--quantization bitsandbytes` ("Unknown quantization method"), checked against the real vLLM by
    # tests/integration/test_vllm_args.py. Its in-flight methods (fp8 and others) are
    # not what the quantize stage scored, so none is chosen for a version.
    raise EngineRefusal(
        f"{QUANTIZE_TAG}={value} cannot be served by vLLM: vLLM 0.32 has no bitsandbytes quantization. Serve this "
        f"version with deploy.engine=tgi, or set the version's tag {QUANTIZE_TAG} to none (16-bit) after checking "
        "the quantize report"
    )


@dataclass(frozen=True)
class Flag:
    kind: Literal["int", "float", "switch", "choice", "json"]
    choices: tuple[str, ...] = ()
    json_keys: tuple[str, ...] = ()  # for kind json: the keys an object may have


# Engine flags a profile may add (deploy.extra_args): parallelism, batching, context length, speculative
# decoding. Everything else is refused: flags that choose what is loaded or where from (--model,
# --tokenizer, --revision, --download-dir), run code from the model (--trust-remote-code), change the prompt
# contract (--chat-template), or move the server (--host, --port) are owned by the deployer.
VETTED: dict[Engine, dict[str, Flag]] = {
    "vllm": {
        "--tensor-parallel-size": Flag("int"),
        "--pipeline-parallel-size": Flag("int"),
        "--max-model-len": Flag("int"),
        "--max-num-seqs": Flag("int"),
        "--max-num-batched-tokens": Flag("int"),
        "--gpu-memory-utilization": Flag("float"),
        "--block-size": Flag("int"),
        "--seed": Flag("int"),
        "--enable-prefix-caching": Flag("switch"),
        "--no-enable-prefix-caching": Flag("switch"),
        "--enable-chunked-prefill": Flag("switch"),
        "--enforce-eager": Flag("switch"),
        "--kv-cache-dtype": Flag("choice", ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")),
        # ngram speculation only: a draft model would be a second, unverified download.
        "--speculative-config": Flag(
            "json", json_keys=("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
        ),
    },
    "tgi": {
        "--num-shard": Flag("int"),
        "--max-concurrent-requests": Flag("int"),
        "--max-batch-total-tokens": Flag("int"),
        "--max-batch-size": Flag("int"),
        "--max-waiting-tokens": Flag("int"),
        "--speculate": Flag("int"),
        "--cuda-memory-fraction": Flag("float"),
        "--kv-cache-dtype": Flag("choice", ("fp8", "fp8_e4m3fn", "fp8_e5m2")),
    },
}
OWNED = {  # flags the deployer sets itself, with where a user changes them instead
    "--model": "the registered version", "--model-id": "the registered version",
    "--served-model-name": "the registered model's name", "--quantize": f"the version's {QUANTIZE_TAG} tag",
    "--quantization": f"the version's {QUANTIZE_TAG} tag", "--port": "deploy.port", "--host": "the deployer",
    "--hostname": "the deployer", "--max-input-tokens": "deploy.max_input_tokens",
    "--max-total-tokens": "deploy.max_total_tokens", "--max-batch-prefill-tokens": "deploy.max_batch_prefill_tokens",
    "--enable-lora": "adapter promotion", "--lora-modules": "adapter promotion", "--lora-adapters": "adapter promotion",
}  # fmt: skip


def _check_value(engine: Engine, name: str, flag: Flag, value: str | None) -> None:
    where = f"deploy.extra_args.{engine}: {name}"
    if flag.kind == "switch":
        if value is not None:
            raise EngineRefusal(f"{where} is a switch and takes no value (got {value!r})")
        return
    if value is None:
        raise EngineRefusal(f"{where} needs a value")
    try:
        if flag.kind == "int" and not (value.isascii() and value.isdigit() and int(value) >= 1):
            raise ValueError("must be a whole number, at least 1")
        if flag.kind == "float" and not 0 < float(value) <= 1:
            raise ValueError("must be in (0, 1]")
        if flag.kind == "choice" and value not in flag.choices:
            raise ValueError(f"must be one of {', '.join(flag.choices)}")
        if flag.kind == "json":
            obj = json.loads(value)
            extra = set(obj) - set(flag.json_keys) if isinstance(obj, dict) else {"(not an object)"}
            if extra or obj.get("method") != "ngram":
                raise ValueError(f"only ngram speculation with the keys {', '.join(flag.json_keys)} is allowed")
    except (ValueError, TypeError) as err:
        raise EngineRefusal(f"{where} {value!r}: {err}") from None


def vetted_args(engine: Engine, args: list[str]) -> list[str]:
    """`args` as given (`--flag value`, `--flag=value` or a switch) when every flag is on the engine's vetted
    list with a valid value; else EngineRefusal naming the first that is not."""
    allowed, out, i = VETTED[engine], [], 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in OWNED:
            raise EngineRefusal(f"deploy.extra_args.{engine}: {name} is set by the deployer from {OWNED[name]}")
        if name not in allowed:
            raise EngineRefusal(
                f"deploy.extra_args.{engine}: {name} is not a vetted {engine} flag "
                f"(vetted: {', '.join(sorted(allowed))})"
            )
        flag = allowed[name]
        if not eq and flag.kind != "switch":
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
            i += value is not None
        _check_value(engine, name, flag, value if (eq or flag.kind != "switch") else None)
        out += [name] if flag.kind == "switch" else [name, value]
        i += 1
    return out


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's accepted --max-lora-rank values


def max_lora_rank(ranks: list[int]) -> int:
    """The least --max-lora-rank vLLM accepts that holds every adapter (16, vLLM's default, at the least)."""
    need = max([16, *ranks])
    for rank in VLLM_LORA_RANKS:
        if rank >= need:
            return rank
    raise EngineRefusal(f"a LoRA adapter of rank {need} is above vLLM's largest --max-lora-rank, {VLLM_LORA_RANKS[-1]}")


SHARD_FLAG = {"tgi": "--num-shard", "vllm": "--tensor-parallel-size"}


def sharded(engine: Engine, shards: int, extra: list[str]) -> list[str]:
    """The engine's tensor-parallel flag for a pod with `shards` GPUs (vLLM would use one of them, and TGI every GPU
    it sees), unless the profile's vetted extra flags choose the split themselves."""
    flag = SHARD_FLAG[engine]
    if shards <= 1 or any(arg.partition("=")[0] == flag for arg in extra):
        return []
    return [flag, str(shards)]


def tgi_args(
    *,
    model_dir: str,
    port: int,
    tags: dict,
    limits: dict[str, int],
    extra: list[str],
    adapters: dict[str, str] | None = None,
    shards: int = 1,
) -> list[str]:
    """TGI's launcher arguments. `limits`: max_input_tokens, max_total_tokens, max_batch_prefill_tokens.
    `adapters` (name -> directory) are loaded at start; a request names one by `adapter_id` (or chat `model`)."""
    if limits["max_batch_prefill_tokens"] < limits["max_input_tokens"]:
        raise EngineRefusal("deploy.max_batch_prefill_tokens must be >= deploy.max_input_tokens (TGI refuses to start)")
    # --hostname: TGI's launcher reads $HOSTNAME, which Kubernetes sets to the pod name.
    return [
        "--model-id",
        model_dir,
        *quantize_args("tgi", tags),
        "--max-input-tokens",
        str(limits["max_input_tokens"]),
        "--max-total-tokens",
        str(limits["max_total_tokens"]),
        "--max-batch-prefill-tokens",
        str(limits["max_batch_prefill_tokens"]),
        "--hostname",
        "0.0.0.0",
        "--port",
        str(port),
        *sharded("tgi", shards, extra),
        *vetted_args("tgi", extra),
    ] + (["--lora-adapters", ",".join(f"{a}={path}" for a, path in sorted(adapters.items()))] if adapters else [])
    # fmt: skip


def served_names(name: str, version: str) -> list[str]:
    """vLLM answers to every name listed; responses carry the first. The second says which version serves
    (as TGI's /info model_id does), read back from /v1/models."""
    return [name, f"models:/{name}/{version}"]


def vllm_args(
    *,
    model_dir: str,
    host: str,
    port: int,
    name: str,
    version: str,
    tags: dict,
    max_total_tokens: int,
    extra: list[str],
    adapters: dict[str, str] | None = None,
    max_lora_rank: int = 16,
    shards: int = 1,
) -> list[str]:
    """vLLM's OpenAI server arguments (after `python -m vllm.entrypoints.openai.api_server`)."""
    args = [
        "--model", model_dir, "--served-model-name", *served_names(name, version),
        "--host", host, "--port", str(port),
        "--max-model-len", str(max_total_tokens),
        # generation_config.json's sampling defaults would make temperature-less requests sample; our server
        # and TGI decode greedily unless asked, so vLLM is told the same.
        "--generation-config", "vllm",
        # JSON answers without free whitespace between tokens, as our server's (at most one space): with vLLM's
        # default, the tuned SmolLM2 padded a two-key object with 72 lines of whitespace past 64 tokens.
        "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        *quantize_args("vllm", tags),
    ]  # fmt: skip
    if adapters:
        args += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max(1, len(adapters)))]
        args += ["--lora-modules", *(f"{adapter_id}={path}" for adapter_id, path in sorted(adapters.items()))]
    args += sharded("vllm", shards, extra)
    extra = vetted_args("vllm", extra)
    if "--max-model-len" in extra:  # the profile's own choice wins over the token limit
        at = args.index("--max-model-len")
        del args[at : at + 2]
    return args + extra
