"""One request's decoding, following TGI's rules: its settings (`Sampling`), the job the scheduler runs (`Job`),
what it streams (`Step`, `Generated`) and the row state that picks, detokenizes and stops each token (`Row`).

Every row keeps its own logits processors, random generator, grammar state (`serving.grammar`) and stopping state,
so requests with different sampling settings, seeds, grammars and stop sequences share one decode batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable

import torch
from tokenizers.decoders import DecodeStream
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

if TYPE_CHECKING:
    from serving.grammar import Constraint

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


class RequestStatus(Enum):
    """Where one job (one prompt) stands in the scheduler. The scheduler's thread moves it, except CANCELLED,
    which `Scheduler.cancel` sets under its lock; the last three are final."""

    WAITING = "waiting"  # queued, not yet admitted
    RUNNING = "running"  # admitted by `Scheduler.schedule`: prefilling, then a row of the decode batch
    FINISHED = "finished"  # its last token was emitted (length, EOS or a stop sequence)
    FAILED = "failed"  # the model failed on it, and its error was emitted
    CANCELLED = "cancelled"  # its request ended first (the client left, or a sibling prompt failed)


FINAL = (RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.CANCELLED)


@dataclass(eq=False)
class Job:
    ids: list[int]
    sampling: Sampling
    adapter: str | None
    emit: Callable[[Step | Exception], None]  # called from the scheduler's thread
    grammar: Constraint | None = None  # compiled at validation; used only by the scheduler's thread after that
    status: RequestStatus = RequestStatus.WAITING


def finite(value: float) -> float | None:
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


class Row:
    """One request in flight: next-token chooser, incremental detokenizer and TGI's stopping criteria."""

    def __init__(self, engine, job: Job):
        self.engine, self.job = engine, job
        self.ids = list(job.ids)
        self.generated, self.tail = 0, ""
        self.longest_stop = max(map(len, job.sampling.stop), default=0)
        self.generator = torch.Generator().manual_seed(job.sampling.seed) if job.sampling.do_sample else None
        self.warpers = _warpers(job.sampling)
        # tokenizers' own incremental decoder, primed with the prompt's tail so the first token's space comes out
        self.stream = DecodeStream(ids=job.ids[-5:], skip_special_tokens=False)

    @property
    def done(self) -> bool:
        """The row leaves the batch at the end of this step."""
        return self.job.status in FINAL

    def step(self, logits: torch.Tensor, prefill: list[dict] | None = None) -> int:
        """Choose and emit the next token; a failure here fails this row only."""
        if self.done:  # cancelled: its request has ended
            return self.engine.pad_id
        try:
            return self._advance(logits, prefill)
        except Exception as err:  # noqa: BLE001 - reported to the client as a generation error
            log.exception("row failed")
            self.job.status = RequestStatus.FAILED
            self.job.emit(err)
            return self.engine.pad_id

    def _advance(self, logits: torch.Tensor, prefill: list[dict] | None) -> int:
        scores = self._process(logits[None])[0]
        if self.generator is None:
            next_id = int(scores.argmax())
        else:
            next_id = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=self.generator))
        if self.job.grammar is not None:
            self.job.grammar.advance(next_id)
        logprob = torch.log_softmax(scores, -1)[next_id].item()
        self.ids.append(next_id)
        self.generated += 1
        text = self.stream.step(self.engine.fast_tokenizer, next_id) or ""  # None: a character still incomplete
        token = self.engine.token(next_id, logprob, text)
        reason = self._finish_reason(next_id, text)
        end = None
        if reason:
            self.job.status = RequestStatus.FINISHED
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
        if self.job.grammar is not None:  # TGI's order: penalties, grammar, warpers (which then pick among the allowed)
            scores = self.job.grammar.mask(scores)
        for warper in self.warpers:
            scores = warper(None, scores)  # warpers look at scores only
        return scores

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
