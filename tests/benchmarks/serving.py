"""Benchmark: the TGI-protocol server under concurrency 1, 4, 8 and 16 against a sequential
`model.generate` loop in the same process, on SmolLM2; latency percentiles and time to first token."""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

MAX_NEW = 32
PROMPTS = [
    f"Write one sentence about topic number {i}: " + t
    for i, t in enumerate(["banking", "travel", "cooking", "music", "weather", "sports", "cards", "refunds"] * 4)
]


def base_dir() -> Path:
    from tests.benchmarks.evaluation import base_dir as shared_base

    return shared_base()  # one copy for every model benchmark, not one per run


def sequential(model_dir: Path, prompts: list[str]) -> float:
    """Generated tokens per second of a plain one-at-a-time generate loop (the recipe's way)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, started = 0, time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            enc = tok(prompt, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - enc["input_ids"].shape[1]
    return tokens / (time.perf_counter() - started)


def _one(url: str, prompt: str) -> tuple[float, int]:
    started = time.perf_counter()
    body = requests.post(
        f"{url}/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW, "details": True}},
        timeout=600,
    ).json()
    return time.perf_counter() - started, body["details"]["generated_tokens"]


def ttft(url: str, prompt: str) -> float:
    started = time.perf_counter()
    with requests.post(
        f"{url}/generate_stream", json={"inputs": prompt, "parameters": {"max_new_tokens": 8}}, stream=True, timeout=600
    ) as response:
        for line in response.iter_lines():
            if line.startswith(b"data:") and json.loads(line[5:]).get("token"):
                return time.perf_counter() - started
    raise RuntimeError("the stream sent no token")


def concurrent(url: str, prompts: list[str], workers: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda p: _one(url, p), prompts))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    return {
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[max(0, round(0.95 * len(latencies)) - 1)],
    }


def measure() -> dict:
    from serving.server import create_app
    from tests.conftest import Live

    model = base_dir()
    baseline = sequential(model, PROMPTS[:8])
    out = {"sequential_tokens_per_s": baseline, "levels": {}}
    # Both sides get the same two cores: the baseline uses torch's default threads, the server is told.
    with Live(
        create_app(
            str(model),
            max_total_tokens=2048,
            max_concurrent_requests=64,
            max_batch_size=16,
            threads=2,
            batch_wait_ms=30,
        )
    ) as live:
        _one(live.url, PROMPTS[0])  # warm-up
        for workers in (1, 4, 8, 16):
            out["levels"][workers] = concurrent(live.url, PROMPTS[: max(8, workers * 2)], workers)
        out["ttft_s"] = statistics.median(ttft(live.url, p) for p in PROMPTS[:5])
    return out


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    base = result["sequential_tokens_per_s"]
    out = [("sequential model.generate (tok/s)", f"{base:.1f}", "", "1.00x")]
    for workers, r in result["levels"].items():
        target = "3x" if int(workers) == 8 else ""
        out.append(
            (
                f"server, concurrency {workers} (tok/s)",
                f"{r['tokens_per_s']:.1f}",
                target,
                f"{r['tokens_per_s'] / base:.2f}x",
            )
        )
        out.append(
            (f"server, concurrency {workers} latency p50 / p95 (s)", f"{r['p50_s']:.2f} / {r['p95_s']:.2f}", "", "")
        )
    out.append(("time to first token, stream (s)", f"{result['ttft_s']:.3f}", "", ""))
    return out
