"""Model inference shared by every stage that runs a model: loading, batched greedy generation, response loss.

Evaluate, merge parity, quantize, the gate and validation during training all decode through `generate`,
so a fix to the loop reaches them all, and no stage imports another to get at it.
"""

from __future__ import annotations

import re
from pathlib import Path

from components.util import console


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip()).strip(" .").casefold()


def load_tokenizer(model_dir: Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = padding_side  # left for batched generation: new tokens follow the real text
    return tok


def load_model(model_dir: Path, dtype: str = "bfloat16", adapter_dir: Path | None = None, quantization=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), quantization_config=quantization)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


# TGI's --quantize flags for bitsandbytes, and the variant names the quantize stage reports them under.
TGI_FLAG = {"nf4": "bitsandbytes-nf4", "int8": "bitsandbytes"}
VARIANT_OF_FLAG = {flag: variant for variant, flag in TGI_FLAG.items()}


def bnb_config(variant: str):
    """The bitsandbytes loading that reproduces TGI's --quantize flag for `variant` (int8 or nf4)."""
    import torch
    from transformers import BitsAndBytesConfig

    if variant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_as_served(model_dir: Path, quantize_flag: str):
    """The merged model loaded the way TGI serves it under `--quantize quantize_flag` ("none": 16-bit as stored)."""
    variant = VARIANT_OF_FLAG.get(quantize_flag)
    return load_model(model_dir, quantization=bnb_config(variant)) if variant else load_model(model_dir)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, label: str = "generate") -> list[str]:
    """Greedy outputs in the order of prompts; batches are formed from similar lengths to limit padding."""
    import torch
    from rich.progress import Progress

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: dict[int, str] = {}
    with Progress(console=console, transient=True) as bar, torch.inference_mode():
        task = bar.add_task(label, total=len(prompts))
        for idx in _batches(order, batch_size):
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            outputs.update(zip(idx, texts))
            bar.advance(task, len(idx))
    return [outputs[i].strip() for i in range(len(prompts))]


def response_nll(model, tok, examples: list[dict], batch_size: int) -> tuple[float, int]:
    """Summed negative log-likelihood of the responses given the prompts, and the token count."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in _batches(examples, batch_size):
            p = tok([e["prompt"] for e in batch], add_special_tokens=False)["input_ids"]
            c = tok([e["completion"] for e in batch], add_special_tokens=False)["input_ids"]
            width = max(len(a) + len(b) for a, b in zip(p, c))
            ids = torch.full((len(batch), width), tok.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (a, b) in enumerate(zip(p, c)):  # right padding: positions start at 0 for every row
                ids[row, : len(a) + len(b)] = torch.tensor(a + b)
                labels[row, len(a): len(a) + len(b)] = torch.tensor(b)
                mask[row, : len(a) + len(b)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((target != -100).sum())
    return total, count
