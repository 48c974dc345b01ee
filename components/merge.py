"""Merge the adapter into the 16-bit base (never the 4-bit one) and check greedy parity.

The output is what TGI serves: safetensors, config.json, and a tokenizer whose chat template
lives in tokenizer_config.json.
"""

from __future__ import annotations

from pathlib import Path

from components.artifacts import MergedModel, PreparedData, record_config
from components.config import MergeSection
from components.inference import generate, load_model, load_tokenizer
from components.prompt_contract import CONTRACT_FILE, read_contract, wrap_template
from components.util import console, dir_size, heading, quiet_libraries, write_json


class ParityError(RuntimeError):
    pass


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str, contract: dict | None = None):
    """Merge in float32 (no rounding inside the sum), then store in the 16-bit dtype.

    The tokenizer's chat template gets the data's prompt contract, so a bare message is served the prompt
    the model was trained on; the contract itself is kept beside the weights.
    """
    import torch

    model = load_model(base_dir, "float32", adapter_dir=adapter_dir)
    merged = model.merge_and_unload().to(getattr(torch, dtype))
    merged.save_pretrained(out_dir, safe_serialization=True)
    tok = load_tokenizer(base_dir, padding_side="right")
    if contract:
        tok.chat_template = wrap_template(tok.chat_template, contract)
        write_json(Path(out_dir) / CONTRACT_FILE, contract)
    tok.save_pretrained(out_dir, save_jinja_files=False)  # TGI reads the template from tokenizer_config.json
    return out_dir


def parity(reference: list[str], candidate: list[str]) -> float:
    return sum(a == b for a, b in zip(reference, candidate)) / max(len(reference), 1)


def run(cfg: MergeSection, base_dir: Path, adapter_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    from components.tracking import stage_run

    quiet_libraries()
    heading("merge")
    out_dir = Path(out_dir)
    record_config(out_dir, "merge", cfg)
    out = MergedModel(out_dir)
    prompts = [e["prompt"] for e in PreparedData(data_dir).examples("eval")][: cfg.parity_prompts]
    tok = load_tokenizer(base_dir)
    with stage_run("merge", cfg.model_dump()) as tracker:
        on_base = load_model(base_dir, cfg.compare_dtype, adapter_dir=adapter_dir)
        reference = generate(on_base, tok, prompts, cfg.max_new_tokens, 16, progress="adapter on base")
        del on_base
        merge_adapter(base_dir, adapter_dir, out.model_dir, cfg.base_precision, read_contract(data_dir))
        merged = load_model(out.model_dir, cfg.compare_dtype)
        candidate = generate(merged, tok, prompts, cfg.max_new_tokens, 16, progress="merged")
        agreement = parity(reference, candidate)
        report = {
            "parity": agreement,
            "threshold": cfg.parity_threshold,
            "prompts": len(prompts),
            "size_bytes": dir_size(out.model_dir),
            "mismatches": [
                {"prompt": p[-200:], "adapter_on_base": r, "merged": c}
                for p, r, c in zip(prompts, reference, candidate)
                if r != c
            ][:10],
        }
        write_json(out.report_file, report)
        tracker.log_metrics({"merge.parity": agreement, "merge.size_bytes": report["size_bytes"]})
        console.print(f"greedy parity of merged vs adapter-on-base: {agreement:.3f} on {len(prompts)} prompts")
        if agreement < cfg.parity_threshold:
            raise ParityError(
                f"merged model agrees with adapter-on-base on {agreement:.1%} of greedy outputs, "
                f"below merge.parity_threshold={cfg.parity_threshold:.1%}; see {out.report_file}"
            )
    return report
