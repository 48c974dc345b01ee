"""Batched token-by-token generation on one causal LM and its LoRA adapters, following TGI's decoding rules.

A batch is left-padded and decoded one step at a time over a shared KV cache. Every row keeps its own logits
processors, random generator and stopping state, so requests with different sampling settings share a batch;
finished rows leave the cache. `Batcher` (in `serving.batcher`) gathers jobs from an asyncio queue and runs one
batch at a time in a worker thread, so the event loop keeps answering while the model computes.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """A request's validated settings; the defaults mean greedy decoding without penalties."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    top_n_tokens: int = 0
    prefill_details: bool = False


@dataclass
class Generated:
    text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int


@dataclass
class Step:
    """One generated token as TGI streams it: `prefill` rides on the first step when asked for, `end` on the last."""

    token: dict
    top_tokens: list[dict]
    prefill: list[dict] | None = None
    end: Generated | None = None


@dataclass(eq=False)
class Job:
    ids: list[int]
    sampling: Sampling
    adapter: str | None
    emit: Callable[[Step | Exception], None]  # called from the worker thread
    cancelled: bool = False


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity; TGI's serde writes them as null."""
    return value if math.isfinite(value) else None


def _warpers(s: Sampling) -> list:
    """TGI's static warper chain, in its order."""
    chain = []
    if s.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(float(s.temperature)))
    if s.top_k:
        chain.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1.0:
        chain.append(TopPLogitsWarper(s.top_p))
    if s.typical_p < 1.0:
        chain.append(TypicalLogitsWarper(s.typical_p))
    return chain


class _Row:
    """One request's decoding state: next-token chooser, TGI's incremental detokenizer and stopping criteria."""

    def __init__(self, engine: Engine, job: Job):
        self.engine, self.job = engine, job
        self.ids = list(job.ids)
        self.prefix, self.read = max(0, len(self.ids) - 5), len(self.ids)
        self.generated, self.done, self.tail = 0, False, ""
        self.longest_stop = max(map(len, job.sampling.stop), default=0)
        self.generator = torch.Generator().manual_seed(job.sampling.seed) if job.sampling.do_sample else None
        self.warpers = _warpers(job.sampling)

    def step(self, logits: torch.Tensor, prefill: list[dict] | None) -> int:
        """Choose and emit the next token; a failure here fails this row only."""
        if self.job.cancelled:
            self.done = True
            return self.engine.pad_id
        try:
            return self._advance(logits, prefill)
        except Exception as err:  # noqa: BLE001 - reported to the client as a generation error
            log.exception("row failed")
            self.done = True
            self.job.emit(err)
            return self.engine.pad_id

    def _advance(self, logits: torch.Tensor, prefill: list[dict] | None) -> int:
        scores = self._process(logits[None])
        if self.generator is None:
            next_id = int(scores[0].argmax())
        else:
            next_id = int(torch.multinomial(torch.softmax(scores[0], -1), 1, generator=self.generator))
        logprob = torch.log_softmax(scores[0], -1)[next_id].item()
        self.ids.append(next_id)
        self.generated += 1
        token = self.engine.token(next_id, logprob, self._decode_new())
        reason = self._finish_reason(next_id, token["text"])
        end = None
        if reason:
            self.done = True
            s = self.job.sampling
            end = Generated(
                self._final_text(), reason, self.generated, s.seed if s.do_sample else None, len(self.job.ids)
            )
        self.job.emit(Step(token, self.engine.top_tokens(logits, self.job.sampling.top_n_tokens), prefill, end))
        return next_id

    def _process(self, scores: torch.Tensor) -> torch.Tensor:
        s = self.job.sampling
        if s.repetition_penalty != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(torch.tensor([self.ids]), scores)
        if s.frequency_penalty:  # as TGI's batched path: the penalty times each token's share of the sequence
            counts = torch.bincount(torch.tensor(self.ids), minlength=scores.shape[-1])[: scores.shape[-1]]
            scores = scores - s.frequency_penalty * counts / len(self.ids)
        for warper in self.warpers:
            scores = warper(None, scores)  # warpers look at scores only
        return scores

    def _decode_new(self) -> str:
        """TGI's trick: decode a few tokens of context and keep the new suffix, so spaces and merges come out right."""
        decode = self.engine.tokenizer.decode
        before, after = decode(self.ids[self.prefix : self.read]), decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # U+FFFD: a byte sequence still incomplete
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def _finish_reason(self, token_id: int, text: str) -> str | None:
        """Checked in TGI's order: the length limit wins over EOS, EOS over stop sequences."""
        s = self.job.sampling
        if self.generated >= s.max_new_tokens:
            return "length"
        if token_id in self.engine.eos_ids:
            return "eos_token"
        if s.stop:
            self.tail = (self.tail + text)[-self.longest_stop :]
            if any(self.tail.endswith(stop) for stop in s.stop):
                return "stop_sequence"
        return None

    def _final_text(self) -> str:
        """All generated tokens without special ones; like TGI, a stop sequence stays in the text."""
        start = len(self.ids) - self.generated
        before = self.engine.tokenizer.decode(self.ids[start - 1 : start], skip_special_tokens=True)
        after = self.engine.tokenizer.decode(self.ids[start - 1 :], skip_special_tokens=True)
        return after[len(before) :] if len(after) > len(before) else ""


class Engine:
    """A causal LM, its tokenizer and optional LoRA adapters; `run_batch` decodes jobs of one adapter together."""

    def __init__(self, model_dir: str, *, dtype: str = "float32", adapters: dict[str, str] | None = None):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"  # how run_batch pads, for anyone batching with this tokenizer
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.config = model.config
        # peft keys adapters by module name, where ids such as "org/name.v2" are not allowed
        self.adapter_names = {adapter_id: f"adapter_{i}" for i, adapter_id in enumerate(adapters or {})}
        self.model = self._with_adapters(model, adapters or {}).eval()
        eos = {self.tokenizer.eos_token_id, model.generation_config.eos_token_id, model.config.eos_token_id}
        self.eos_ids = {i for item in eos for i in (item if isinstance(item, list) else [item]) if i is not None}
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def _with_adapters(self, model, adapters: dict[str, str]):
        if not adapters:
            return model
        from peft import PeftModel

        (first, path), *rest = adapters.items()
        peft_model = PeftModel.from_pretrained(model, path, adapter_name=self.adapter_names[first])
        for adapter_id, adapter_path in rest:
            peft_model.load_adapter(adapter_path, adapter_name=self.adapter_names[adapter_id])
        return peft_model

    def _scope(self, adapter: str | None):
        if not self.adapter_names:
            return nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(self.adapter_names[adapter])
        return nullcontext()

    def token(self, token_id: int, logprob: float, text: str) -> dict:
        return {"id": token_id, "text": text, "logprob": _finite(logprob), "special": token_id in self.special_ids}

    def top_tokens(self, logits: torch.Tensor, n: int) -> list[dict]:
        """Like TGI, ranked on the raw distribution, before penalties and warpers."""
        if not n:
            return []
        values, ids = torch.log_softmax(logits, -1).topk(min(n, logits.shape[-1]))
        return [self.token(i, v, self.tokenizer.decode([i])) for v, i in zip(values.tolist(), ids.tolist())]

    def run_batch(self, jobs: list[Job]) -> None:
        """Decode `jobs` (all on one adapter) until every row stops; runs in the worker thread."""
        rows = [_Row(self, job) for job in jobs]
        with torch.inference_mode(), self._scope(jobs[0].adapter):
            logits, cache, mask, prefills = self._prefill(rows)
            while True:
                next_ids = [row.step(logits[i], prefills[i]) for i, row in enumerate(rows)]
                prefills = [None] * len(rows)
                keep = [i for i, row in enumerate(rows) if not row.done]
                if not keep:
                    return
                if len(keep) < len(rows):
                    index = torch.tensor(keep)
                    cache.batch_select_indices(index)
                    mask, rows, next_ids = mask[index], [rows[i] for i in keep], [next_ids[i] for i in keep]
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                positions = mask.sum(-1, keepdim=True) - 1
                logits, cache = self._forward(torch.tensor(next_ids)[:, None], mask, positions, cache)
                logits = logits[:, -1]

    def _prefill(self, rows: list[_Row]):
        width = max(len(row.ids) for row in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(row.ids)) + row.ids for row in rows])
        mask = torch.tensor([[0] * (width - len(row.ids)) + [1] * len(row.ids) for row in rows])
        # positions count real tokens only, so a padded row sees what it would see alone
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        wanted = [row.job.sampling.prefill_details for row in rows]
        logits, cache = self._forward(ids, mask, positions, None, all_positions=any(wanted))
        prefills = [
            self._prefill_tokens(row.ids, logits[i]) if want else None
            for i, (row, want) in enumerate(zip(rows, wanted))
        ]
        return logits[:, -1], cache, mask, prefills

    def _forward(self, ids, mask, positions, cache, *, all_positions: bool = False):
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if all_positions else 1,
        )
        return out.logits.float(), out.past_key_values

    def _prefill_tokens(self, ids: list[int], logits: torch.Tensor) -> list[dict]:
        """Each prompt token's logprob given the tokens before it; the first has none (null, as in TGI)."""
        n = len(ids)
        logprobs = torch.log_softmax(logits[-n:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        return [
            {"id": i, "text": self.tokenizer.decode([i]), "logprob": _finite(lp)}
            for i, lp in zip(ids, [math.nan] + logprobs)
        ]
