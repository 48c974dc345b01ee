"""Benchmark: transformers' own continuous batching (`ContinuousBatchingManager`, from `model.init_continuous_batching`)
on CPU, driven by the same closed-loop load as the server benchmark (concurrency 1, 4, 8 and 16 over
`prompts[: max(8, 2 * c)]`, greedy, fixed `max_new_tokens`), so our own scheduler can be compared with the upstream
one: throughput, latency percentiles and time to first token (from the manager's token streaming). The sequential
baseline both are judged against is the server benchmark's (`tests.benchmarks.serving.sequential`)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

LEVEL_TIMEOUT_S = 900.0  # bound on one concurrency level; nothing in here waits forever


def _closed_loop(manager, inputs: list[list[int]], concurrency: int, max_new_tokens: int, tag: str) -> dict:
    """Keeps `concurrency` requests in flight; each finished one is replaced by the next until all are done."""
    submitted, first, done, generated = {}, {}, {}, 0
    pending = list(enumerate(inputs))

    def submit() -> None:
        i, ids = pending.pop(0)
        rid = f"{tag}_r{i}"
        submitted[rid] = time.perf_counter()
        if manager.add_request(ids, request_id=rid, max_new_tokens=max_new_tokens, streaming=True) is None:
            raise RuntimeError(f"the manager refused request {rid} (is its generation thread still alive?)")

    started = time.perf_counter()
    deadline = started + LEVEL_TIMEOUT_S
    while pending and len(submitted) < concurrency:
        submit()
    while len(done) < len(inputs):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"concurrency {concurrency}: {len(done)}/{len(inputs)} done after {LEVEL_TIMEOUT_S}s")
        out = manager.get_result(timeout=1.0)
        if out is None:
            status = manager.background_thread_status
            if not manager.is_running() or status.fatal_error is not None:
                raise RuntimeError(f"the generation thread died: {status.fatal_error!r}")
            continue
        now = time.perf_counter()
        if out.error is not None:
            raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        if out.generated_tokens:
            first.setdefault(out.request_id, now)
        if out.is_finished():
            done[out.request_id] = now
            generated += len(out.generated_tokens)
            if pending:
                submit()
    wall = time.perf_counter() - started
    latencies = sorted(done[r] - submitted[r] for r in done)
    ttfts = [first[r] - submitted[r] for r in first]
    return {
        "tokens_per_s": generated / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[max(0, round(0.95 * len(latencies)) - 1)],
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
    }


def measure(
    model_dir: str | Path,
    prompts: list[str],
    max_new_tokens: int,
    levels: tuple[int, ...] = (1, 4, 8, 16),
    dtype: str = "bfloat16",
    threads: int = 1,
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig, GenerationConfig

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # On CPU the manager accepts "sdpa" or "paged|eager" (flash is CUDA/XPU only); with auto_switch_to_flash it only
    # switches when flash-attn is installed, so we pin sdpa and turn the switch off.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    ).eval()
    result: dict = {"levels": {}}

    eos = tok.eos_token_id
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
    # Without explicit sizes the CPU cache takes 60% of system RAM; 16 short requests need a few 64-token pages each.
    cb = ContinuousBatchingConfig(
        page_size=64,
        num_blocks=64,
        max_batch_tokens=1024,
        max_requests_per_batch=16,
        auto_switch_to_flash=False,
        allow_block_sharing=False,  # the load has distinct prompts; prefix caching would only flatter the numbers
    )
    inputs = [tok(p)["input_ids"] for p in prompts]
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    try:
        manager.start()
        _closed_loop(manager, inputs[:1], 1, max_new_tokens, "warmup")  # warm-up, like the server benchmark
        for c in levels:
            result["levels"][c] = _closed_loop(manager, inputs[: max(8, 2 * c)], c, max_new_tokens, f"c{c}")
    finally:
        manager.stop(block=True, timeout=60, hard_stop=True)  # hard: fail in-flight requests on error
    return result
