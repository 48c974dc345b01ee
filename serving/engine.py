"""A causal LM with its LoRA adapters, run the way the scheduler needs it: one prompt's prefill, then one decode
step for every row in flight.

A prompt is prefilled alone, exactly as if it were the only request, and then joins the running `DecodeBatch`.
Rows on different adapters, or on the bare base, share each decode step (`serving.multi_lora`).
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from serving.decode_batch import ROW_ATTENTION, DecodeBatch
from serving.decoding import Job, Row, finite
from serving.multi_lora import MultiLora

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt positions turned into logits at once for prefill details: 256 x vocab floats at most


def compute_dtype(model_dir: str, dtype: str) -> torch.dtype:
    """`auto` serves a bfloat16 checkpoint in bfloat16 where the CPU has native bfloat16 matmuls, else float32.

    Measured with SmolLM2 on this machine's AMX cores: a decode step of 16 rows took 70 ms in bfloat16 and 127 ms
    in float32, while one row took 52 ms in both. Without native support bfloat16 is emulated and slower.
    """
    if dtype != "auto":
        return getattr(torch, dtype)
    stored = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if stored in (torch.bfloat16, "bfloat16") and native else torch.float32


class Engine:
    """Tokenizer, model and adapters; `prefill` starts one job, `decode` advances every row of a batch by a token."""

    def __init__(self, model_dir: str, *, dtype: str = "auto", adapters: dict[str, str] | None = None):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.fast_tokenizer = self.tokenizer.backend_tokenizer  # what tokenizers' DecodeStream steps with
        self.dtype = compute_dtype(model_dir, dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype, attn_implementation=ROW_ATTENTION)
        self.config = model.config
        # peft keys adapters by module name, where ids such as "org/name.v2" are not allowed
        self.adapter_names = {adapter_id: f"adapter_{i}" for i, adapter_id in enumerate(adapters or {})}
        self.model = self._with_adapters(model, adapters or {}).eval()
        self.lora = MultiLora(self.model, list(self.adapter_names.values())) if adapters else None
        eos = {self.tokenizer.eos_token_id, model.generation_config.eos_token_id, model.config.eos_token_id}
        self.eos_ids = {i for item in eos for i in (item if isinstance(item, list) else [item]) if i is not None}
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def _with_adapters(self, model, adapters: dict[str, str]):
        if not adapters:
            return model
        from peft import PeftModel

        # In the model's dtype, as TGI and vLLM serve adapters. PEFT's default upcasts them to float32, whose CPU
        # matmul takes another path for one row than for several, so a row's answer depended on its company.
        (first, path), *rest = adapters.items()
        kw = {"autocast_adapter_dtype": False}
        peft_model = PeftModel.from_pretrained(model, path, adapter_name=self.adapter_names[first], **kw)
        for adapter_id, adapter_path in rest:
            peft_model.load_adapter(adapter_path, adapter_name=self.adapter_names[adapter_id], **kw)
        return peft_model

    def _select_adapters(self, rows: list[Row]) -> None:
        if self.lora is not None:
            self.lora.select([self.adapter_names.get(row.job.adapter) for row in rows])

    def token(self, token_id: int, logprob: float, text: str) -> dict:
        return {"id": token_id, "text": text, "logprob": finite(logprob), "special": token_id in self.special_ids}

    def top_tokens(self, logits: torch.Tensor, n: int) -> list[dict]:
        """Like TGI, ranked on the raw distribution, before penalties and warpers."""
        if not n:
            return []
        values, ids = torch.log_softmax(logits, -1).topk(min(n, logits.shape[-1]))
        return [self.token(i, v, self.tokenizer.decode([i])) for v, i in zip(values.tolist(), ids.tolist())]

    @torch.inference_mode()
    def prefill(self, job: Job) -> tuple[Row, DynamicCache]:
        """Run the prompt alone, emit its first token, and return the row with its cache for the decode batch."""
        row, details = Row(self, job), job.sampling.prefill_details
        captured: list[torch.Tensor] = []
        hook = (
            self.model.get_decoder().norm.register_forward_hook(lambda _m, _a, out: captured.append(out))
            if details
            else None
        )
        self._select_adapters([row])
        try:
            out = self.model(input_ids=torch.tensor([job.ids]), use_cache=True, logits_to_keep=1)
        finally:
            if hook is not None:
                hook.remove()
        row.step(out.logits[0, -1].float(), self._prefill_tokens(job.ids, captured[0][0]) if details else None)
        return row, out.past_key_values

    @torch.inference_mode()
    def decode(self, batch: DecodeBatch) -> None:
        """One token for every row: each attends to its own columns (`row_starts`) at its own position."""
        rows = batch.rows
        self._select_adapters(rows)
        out = self.model(
            input_ids=torch.tensor([[row.ids[-1]] for row in rows]),
            position_ids=torch.tensor([[len(row.ids) - 1] for row in rows]),
            past_key_values=batch.cache,
            use_cache=True,
            row_starts=batch.starts,
        )
        logits = out.logits[:, -1].float()
        for i, row in enumerate(rows):
            row.step(logits[i])

    def _prefill_tokens(self, ids: list[int], hidden: torch.Tensor) -> list[dict]:
        """Each prompt token's logprob given the ones before it (the first has none: null, as in TGI).

        The final norm's output is turned into logits a chunk at a time, so a long prompt never holds a
        prompt-by-vocabulary matrix: 4,096 tokens of SmolLM2's 49,152-word vocabulary would be 800 MB in float32.
        """
        head, targets, logprobs = self.model.get_output_embeddings(), torch.tensor(ids[1:]), []
        for at in range(0, len(ids) - 1, PREFILL_CHUNK):
            scores = torch.log_softmax(head(hidden[at : at + PREFILL_CHUNK][: len(targets) - at]).float(), -1)
            logprobs += scores.gather(1, targets[at : at + PREFILL_CHUNK, None])[:, 0].tolist()
        return [
            {"id": i, "text": self.tokenizer.decode([i]), "logprob": finite(lp)}
            for i, lp in zip(ids, [float("nan")] + logprobs)
        ]
