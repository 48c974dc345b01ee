"""Merge a LoRA adapter shard by shard: peak memory is about one shard and the adapter, not the model twice.

For each safetensors shard of the 16-bit base: read it, and for every weight the adapter touches add
`(B @ A) * scaling` in float32 to the base weight (for a QLoRA adapter, to its NF4 rounding, the weights it
trained against), store the result in the 16-bit output dtype, write the shard, free it. The arithmetic is
PEFT's merge_and_unload on a float32 model followed by `.to(dtype)`, one tensor at a time, so the output is bit
for bit what the one-shot merge writes (tests/unit/test_streaming_merge.py compares them).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from components.artifacts import TrainedAdapter
from components.memory_plan import model_shape
from components.util import write_json

INDEX = "model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."


def shard_files(base_dir: Path) -> list[Path]:
    index = base_dir / INDEX
    if index.exists():
        return [base_dir / name for name in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return [base_dir / "model.safetensors"]


def lora_deltas(adapter_dir: Path) -> tuple[dict[str, tuple], float]:
    """base weight name -> (A, B) in float32, and the scaling PEFT applies (alpha / r, or / sqrt(r) for rsLoRA)."""
    import torch
    from safetensors.torch import load_file

    config = json.loads(TrainedAdapter(adapter_dir).config_file.read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("fan_in_fan_out"):
        raise ValueError(f"{adapter_dir}: per-layer ranks, alphas or fan-in-fan-out are not merged by streaming")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(TrainedAdapter(adapter_dir).weights_file)
    pairs: dict[str, list] = {}
    for key, tensor in tensors.items():
        for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(part):
                name = key.removeprefix(PEFT_PREFIX).removesuffix(part) + ".weight"
                pairs.setdefault(name, [None, None])[slot] = tensor.to(torch.float32)
    return {name: tuple(pair) for name, pair in pairs.items()}, scaling


def trained_base(adapter_dir: Path) -> dict | None:
    """How the train stage quantized the base under this adapter, for NF4 (else None): double_quant, and the
    dtype the base was loaded in. The NF4 codes depend on it: quantized from float32 rather than bfloat16,
    the tiny model's dequantized weights differ by up to 2e-4."""
    adapter = TrainedAdapter(adapter_dir)
    record = adapter.stage_config()
    train = record["config"] if record else {}
    if train.get("quantization") != "nf4":
        return None
    resolved = adapter.metrics().compute_dtype if adapter.metrics_file.exists() else None
    return {"double_quant": train.get("double_quant", True), "dtype": resolved or "bfloat16"}


def write_serving_base(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str) -> str:
    """The base an adapter serves on, as training saw it: for QLoRA its NF4 rounding stored in `dtype` (an
    adapter served on the 16-bit base scored 0.500 label accuracy against 0.944 on this base, measured on the
    demo), else the 16-bit base; with the base's own tokenizer, so any adapter of it may share one deployment.
    Returns how it was rounded: "nf4-<dtype>[-dq]" or "16bit"."""
    from components.inference import load_tokenizer

    nf4 = trained_base(adapter_dir)
    stream_merge(base_dir, None, out_dir, dtype, nf4)
    load_tokenizer(base_dir).save_pretrained(out_dir, save_jinja_files=False)
    return f"nf4-{nf4['dtype']}{'-dq' if nf4['double_quant'] else ''}" if nf4 else "16bit"


def nf4_rounding(weight, dtype, double_quant: bool):
    """The weight as training's NF4 base held it: quantized from `dtype` as transformers loads it, dequantized."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    quantized = bnb.nn.Params4bit(
        weight.to(dtype), requires_grad=False, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    ).to("cpu")
    return dequantize_bnb_weight(quantized)


class Nf4Hold:
    """How much of the adapter's update an NF4 copy of the merge loses: ‖NF4(W+Δ) − NF4(W) − Δ‖ / ‖Δ‖ over every
    adapted weight, with NF4 as a serving engine quantizes the stored merge at load (bitsandbytes' defaults).
    0 keeps the update whole; about 1 erases it. A LoRA update is far smaller than NF4's steps: on the demo
    adapter this is 1.08 (the NF4 variant's exact match 0.0), and the update scaled 64x still loses 0.66."""

    def __init__(self):
        self.error, self.update = 0.0, 0.0

    def add(self, weight, delta, dtype) -> None:
        import torch

        merged, alone = ((weight + d).to(dtype) for d in (delta, 0))
        moved = nf4_rounding(merged, torch.bfloat16, True).float() - nf4_rounding(alone, torch.bfloat16, True).float()
        self.error += (moved - delta).pow(2).sum().item()
        self.update += delta.pow(2).sum().item()

    @property
    def lost(self) -> float:
        return math.sqrt(self.error / self.update) if self.update else 0.0


def stream_merge(
    base_dir: Path,
    adapter_dir: Path | None,
    out_dir: Path,
    dtype: str,
    nf4: dict | None = None,
    hold: Nf4Hold | None = None,
) -> Path:
    """Write the merged model's weights and config into out_dir, shard by shard. `nf4` ({"double_quant",
    "dtype"}): merge into the NF4 rounding of the base, as QLoRA trained; None: into the 16-bit base.
    adapter_dir None: the base alone, rounded as `nf4` says. `hold` measures what an NF4 copy keeps of the
    adapter, weight by weight as they pass."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    deltas, scaling = lora_deltas(Path(adapter_dir)) if adapter_dir else ({}, 1.0)
    rounded = model_shape(base_dir).linear_weights if nf4 else frozenset()
    out_dtype, used = getattr(torch, dtype), set()
    for shard in shard_files(base_dir):
        merged = {}
        with safe_open(shard, framework="pt") as tensors:
            for name in tensors.keys():
                weight = tensors.get_tensor(name)
                if name not in deltas and name not in rounded:  # as the one-shot path: float32, then the dtype
                    merged[name] = weight.to(torch.float32).to(out_dtype) if weight.is_floating_point() else weight
                    continue
                if name in rounded:  # one float32 copy: the rounding's, not the raw weight's as well
                    weight = nf4_rounding(weight, getattr(torch, nf4["dtype"]), nf4["double_quant"])
                full = weight.to(torch.float32)
                if name in deltas:
                    lora_a, lora_b = deltas[name]
                    delta = (lora_b @ lora_a) * scaling
                    if hold is not None:
                        hold.add(full, delta, out_dtype)
                    full += delta
                    used.add(name)
                merged[name] = full.to(out_dtype)
                del full
        save_file(merged, out_dir / shard.name, metadata={"format": "pt"})
        del merged
    if missing := set(deltas) - used:
        raise ValueError(f"{adapter_dir}: adapter weights for {sorted(missing)[:3]} match no base weight")
    if (base_dir / INDEX).exists():
        shutil.copy(base_dir / INDEX, out_dir / INDEX)
    config = json.loads((base_dir / "config.json").read_text())
    config["dtype"] = dtype
    write_json(out_dir / "config.json", config)
    if (base_dir / "generation_config.json").exists():
        shutil.copy(base_dir / "generation_config.json", out_dir / "generation_config.json")
    return out_dir
