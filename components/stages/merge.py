"""Merge the adapter into a 16-bit copy of the base and check greedy parity with the model that was trained.

Run as: `llmops stage merge [merge.parity_prompts=8]` (alone, on a local run's base, adapter and data), or a
task of `llmops run`.

A QLoRA adapter learned to correct the NF4-rounded base, so it is added to those weights, dequantized; the
parity reference is the adapter unmerged on that same base, which is the trained model's arithmetic in
float32 (bitsandbytes' own 4-bit kernel computes in bfloat16 on CPU). A 16-bit LoRA adapter goes onto the
16-bit base. The output is what TGI serves: 16-bit safetensors, config.json, and a tokenizer whose chat
template lives in tokenizer_config.json.
"""

from __future__ import annotations

from pathlib import Path

from components import reports
from components.artifacts import CONTRACT_FILE, MergedModel, PreparedData, record_config
from components.config import MergeSection
from components.inference import bnb_config, generate, load_model, load_tokenizer
from components.layer_parity import layerwise_parity
from components.literal_text import model_input
from components.memory_plan import model_shape
from components.prompt_contract import read_contract, wrap_template
from components.streaming_merge import Nf4Hold, nf4_rounding, stream_merge, trained_base
from components.util import console, dir_size, heading, quiet_libraries, write_json

# The merge and its parity check run on the host, as memory_plan.merge_plan plans them, even in a pod with a
# GPU: the float32 reference's NF4 rounding is then the same CPU code as the streaming merge's.
HOST = "cpu"


class ParityError(RuntimeError):
    pass


def merge_base(cfg: MergeSection, adapter_dir: Path) -> str:
    if cfg.base != "auto":
        return cfg.base
    return "dequantized-nf4" if trained_base(adapter_dir) else "16bit"


def merge_nf4(adapter_dir: Path, base: str) -> dict | None:
    """The NF4 rounding a merge into `base` uses ({"double_quant", "dtype"}): the adapter's own training base,
    else bitsandbytes' defaults; None for the 16-bit base. The streaming merge and its float32 reference both
    take it from here."""
    if base != "dequantized-nf4":
        return None
    return trained_base(adapter_dir) or {"double_quant": True, "dtype": "bfloat16"}


def dequantized_nf4(base_dir: Path, double_quant: bool = True, dtype: str = "bfloat16"):
    """The base in float32 with every linear weight replaced by its NF4 rounding (what QLoRA trained against).

    NF4 quantization is deterministic: quantizing the same 16-bit base again, in the dtype training loaded it
    in, gives the training's codes. The rounding is the streaming merge's, weight by weight on one model."""
    import torch

    plain = load_model(base_dir, "float32", device=HOST)
    for name in model_shape(base_dir).linear_weights:
        weight = plain.get_parameter(name)
        weight.data.copy_(nf4_rounding(weight.data, getattr(torch, dtype), double_quant).float())
    return plain


def trained_condition(base_dir: Path, adapter_dir: Path, dtype: str = "float32"):
    """The adapter on the base it was trained on: for QLoRA the NF4 base, loaded as training loaded it; else
    the 16-bit base, computing in `dtype`."""
    nf4 = trained_base(adapter_dir)
    if nf4 is None:
        return load_model(base_dir, dtype, adapter_dir=adapter_dir, device=HOST)
    quant = bnb_config("nf4", nf4["dtype"], nf4["double_quant"])
    return load_model(base_dir, nf4["dtype"], adapter_dir=adapter_dir, quantization=quant, device=HOST)


def adapter_on_base(base_dir: Path, adapter_dir: Path, base: str = "16bit"):
    """The adapter, unmerged, on a float32 copy of `base`: "dequantized-nf4" (the NF4 weights a QLoRA adapter
    trained against) or "16bit". On the dequantized base this is the trained model's arithmetic without
    bitsandbytes' bfloat16 kernel, so it serves both as the parity reference and as what gets merged."""
    from peft import PeftModel

    if nf4 := merge_nf4(adapter_dir, base):
        weights = dequantized_nf4(base_dir, nf4["double_quant"], nf4["dtype"])
    else:
        weights = load_model(base_dir, "float32", device=HOST)
    return PeftModel.from_pretrained(weights, adapter_dir).eval()


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str,
    contract: dict | None = None,
    base: str = "16bit",
):
    """The one-shot merge, the streaming merge's reference in tests: in float32 (no rounding inside the sum),
    then stored in the 16-bit dtype. The tokenizer's chat template gets the data's prompt contract, so a bare
    message is served the prompt the model was trained on; the contract itself is kept beside the weights.
    """
    import torch

    merged = adapter_on_base(base_dir, adapter_dir, base).merge_and_unload().to(getattr(torch, dtype))
    merged.save_pretrained(out_dir, safe_serialization=True)
    write_tokenizer(base_dir, out_dir, contract)
    return out_dir


def write_tokenizer(base_dir: Path, out_dir: Path, contract: dict | None) -> None:
    tok = load_tokenizer(base_dir, padding_side="right")
    if contract:
        tok.chat_template = wrap_template(tok.chat_template, contract)
        write_json(Path(out_dir) / CONTRACT_FILE, contract)
    tok.save_pretrained(out_dir, save_jinja_files=False)  # TGI reads the template from tokenizer_config.json


def parity_dtype(cfg: MergeSection, base_dir: Path, adapter_dir: Path) -> str:
    """float32 when the float32 reference fits the memory at hand (1.3x for the runtime), else bfloat16 when the
    merged model does, else layerwise (one decoder layer at a time); refused before any weight is read when not
    even one layer does."""
    if cfg.compare_dtype != "auto":
        return cfg.compare_dtype
    from components.compute import free_memory
    from components.memory_plan import GB, MemoryPlanError, adapter_params, layerwise_parity_bytes, parity_check

    shape, available = model_shape(base_dir), free_memory(use_gpu=False)
    if (check := parity_check(shape, available)) != "layerwise":
        return check
    if (need := layerwise_parity_bytes(shape, adapter_params(adapter_dir) * 4)) > available:
        raise MemoryPlanError(
            f"merge: its parity check holds {need / GB:.1f} GB even one layer at a time, {available / GB:.1f} GB "
            "available on the host; give the merge task more memory (placement.resources.merge.memory)"
        )
    return "layerwise"


def parity_reference(base_dir: Path, adapter_dir: Path, base: str, dtype: str):
    """The trained model to compare the merge with: in float32, the adapter unmerged on the base it merges into
    (exact); in bfloat16, the trained condition itself (NF4 base for QLoRA), which needs far less memory."""
    if dtype == "float32":
        return adapter_on_base(base_dir, adapter_dir, base)
    return trained_condition(base_dir, adapter_dir, dtype)


def parity(reference: list[str], candidate: list[str]) -> float:
    return sum(a == b for a, b in zip(reference, candidate)) / max(len(reference), 1)


def generated_parity(base_dir, adapter_dir, merged_dir, base: str, compare: str, prompts, tok, cfg: MergeSection):
    """Greedy outputs of the trained model and of the merge, each loaded whole in `compare`: (parity, the first
    mismatches)."""
    trained = parity_reference(base_dir, adapter_dir, base, compare)
    reference = generate(trained, tok, prompts, cfg.max_new_tokens, 16, progress="trained model")
    del trained
    merged = load_model(merged_dir, compare, device=HOST)
    candidate = generate(merged, tok, prompts, cfg.max_new_tokens, 16, progress="merged")
    del merged
    mismatches = [
        {"prompt": p[-200:], "trained": r, "merged": c} for p, r, c in zip(prompts, reference, candidate) if r != c
    ]
    return parity(reference, candidate), {"mismatches": mismatches[:10]}


def run(cfg: MergeSection, base_dir: Path, adapter_dir: Path, data_dir: Path, out_dir: Path) -> dict:

    from components.tracking import stage_run

    quiet_libraries()
    heading("merge")
    out_dir = Path(out_dir)
    record_config(out_dir, "merge", cfg)
    out = MergedModel(out_dir)
    examples = PreparedData(data_dir).examples("eval")[: cfg.parity_prompts]
    prompts = [model_input(e) for e in examples]
    tok = load_tokenizer(base_dir)
    compare = parity_dtype(cfg, base_dir, adapter_dir)  # the memory plan, before any weight is read
    with stage_run("merge", cfg.model_dump()) as tracker:
        base = merge_base(cfg, adapter_dir)
        nf4 = merge_nf4(adapter_dir, base)
        # Written shard by shard: the merge itself holds one shard and the adapter, whatever the model's size.
        hold = Nf4Hold()  # what an NF4 copy of this merge would keep of the adapter: quantize reads it
        stream_merge(base_dir, adapter_dir, out.model_dir, cfg.base_precision, nf4, hold)
        write_tokenizer(base_dir, out.model_dir, read_contract(data_dir))
        # Then the parity check, one model at a time: the trained model, then the merge, in the same dtype.
        reference_name = {"dequantized-nf4": "dequantized NF4 base + adapter", "16bit": "16-bit base + adapter"}[base]
        if compare == "layerwise":  # neither model is held whole: a block at a time, teacher-forced
            figures = layerwise_parity(base_dir, adapter_dir, out.model_dir, examples, tok, nf4)
            agreement, details = figures.pop("parity"), figures | {"mismatches": []}
            reference_name += ", one layer at a time, teacher-forced on the eval answers"
        else:
            agreement, details = generated_parity(
                base_dir, adapter_dir, out.model_dir, base, compare, prompts, tok, cfg
            )
            if compare != "float32":
                reference_name = f"the trained model in {compare}"
        report = reports.Merge(
            parity=agreement,
            compare_dtype=compare,
            reference=reference_name,
            merged_into=base,
            threshold=cfg.parity_threshold,
            prompts=len(prompts),
            size_bytes=dir_size(out.model_dir),
            nf4_adapter_lost=hold.lost,
            **details,
        )
        report.write(out.report_file)
        tracker.log_metrics({"merge.parity": agreement, "merge.size_bytes": report.size_bytes})
        console.print(
            f"greedy parity of the merge (into the {base} base) with the trained model ({reference_name}), "
            f"compared in {compare}: {agreement:.3f} on {len(prompts)} prompts"
        )
        if agreement < cfg.parity_threshold:
            raise ParityError(
                f"the merged model agrees with the trained model ({reference_name}) on {agreement:.1%} of the "
                f"parity prompts, below merge.parity_threshold={cfg.parity_threshold:.1%}; see {out.report_file}"
            )
    return report.model_dump(exclude_none=True)
