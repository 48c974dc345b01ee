"""Benchmark: `llmops serve` under closed-loop load at concurrency 1, 4, 8 and 16, against a sequential
`model.generate` loop on the same cores, dtype, threads and prompts, in the same run; then three adapters plus the
base against a single adapter at concurrency 8; and transformers' `ContinuousBatchingManager` on the same load.

The server runs as its own process (the `llmops serve` command) pinned to every core but the last; the load
generator and the baselines' bookkeeping run in this process on the last core. Each figure is the median of
`REPEATS` runs, because on this shared machine one run's rate moves by a third.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import requests

from tests.benchmarks import cb_manager

MAX_NEW = 32
REPEATS = 3
LEVELS = (1, 4, 8, 16)
TOPICS = ["a bank card", "a train journey", "bread", "a violin", "rain", "football", "a lost wallet", "a refund"]
ASKS = ["Write a short story about {}.", "Describe {} to a child.", "Write a poem about {}.", "Explain {} in detail."]


def base_dir() -> Path:
    from tests.benchmarks.evaluation import base_dir as shared_base

    return shared_base()  # one copy for every model benchmark, not one per run


def prompts(model_dir: Path) -> list[str]:
    """Chat-rendered requests that make the instruct model write past MAX_NEW tokens, so every request does the
    same work in the server and in the baseline (their greedy tokens are the same)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    asks = [ask.format(topic) for ask in ASKS for topic in TOPICS]
    return [
        tok.apply_chat_template([{"role": "user", "content": a}], tokenize=False, add_generation_prompt=True)
        for a in asks
    ]


def cores() -> tuple[set[int], set[int]]:
    """(server cores, load-generator cores): apart when there are two or more."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return set(available), set(available)
    return set(available[:-1]), {available[-1]}


def adapters(model_dir: Path, out: Path, n: int = 3) -> dict[str, str]:
    """Random rank-16 LoRA adapters on every linear layer (the train stage's defaults), saved once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    made = {}
    for i in range(n):
        path = out / f"adapter-{i}"
        if not (path / "adapter_config.json").exists():
            torch.manual_seed(i)
            model = get_peft_model(
                AutoModelForCausalLM.from_pretrained(model_dir),
                LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False),
            )
            model.save_pretrained(path)
        made[f"adapter-{i}"] = str(path)
    return made


def sequential(model_dir: Path, texts: list[str], dtype, threads: int) -> float:
    """Generated tokens per second of a plain one-at-a-time `model.generate` loop (the recipe's way)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    rates = []
    with torch.inference_mode():
        model.generate(**tok(texts[0], return_tensors="pt"), max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(REPEATS):
            tokens, started = 0, time.perf_counter()
            for text in texts:
                enc = tok(text, return_tensors="pt")
                out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
                tokens += out.shape[1] - enc["input_ids"].shape[1]
            rates.append(tokens / (time.perf_counter() - started))
    return statistics.median(rates)


@contextmanager
def served(model_dir: Path, server_cores: set[int], adapter_paths: dict[str, str] | None = None):
    """`llmops serve` in its own process, pinned to the server cores; stopped on the way out."""
    from tests.conftest import free_port, wait_for

    port = free_port()
    command = [sys.executable, "-m", "llmops", "serve", str(model_dir), "--port", str(port)]
    command += ["--threads", str(len(server_cores)), "--max-concurrent-requests", "64", "--max-total-tokens", "2048"]
    for name, path in (adapter_paths or {}).items():
        command += ["--adapter", f"{name}={path}"]
    log = open(model_dir.parent / "serving-bench-server.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.sched_setaffinity(0, server_cores)
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, "the server exited"
        try:
            return requests.get(url + "/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_for(healthy, timeout=300, what="the server to answer /health")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def streamed(url: str, text: str, adapter: str | None) -> tuple[float, float, int]:
    """(time to first token, latency, generated tokens) of one streaming request."""
    params = {"max_new_tokens": MAX_NEW} | ({"adapter_id": adapter} if adapter else {})
    started, first, tokens = time.perf_counter(), None, 0
    with requests.post(
        url + "/generate_stream", json={"inputs": text, "parameters": params}, stream=True, timeout=600
    ) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                assert "error" not in event, event
                first, tokens = first or time.perf_counter(), tokens + 1
    return first - started, time.perf_counter() - started, tokens


def load(url: str, texts: list[str], workers: int, adapters_cycle: list[str | None]) -> dict:
    """`workers` clients, each sending its next request when the last is answered; medians over REPEATS runs."""
    runs = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            results = list(
                pool.map(lambda i: streamed(url, texts[i], adapters_cycle[i % len(adapters_cycle)]), range(len(texts)))
            )
        wall = time.perf_counter() - started
        latencies = sorted(r[1] for r in results)
        runs.append(
            {
                "tokens_per_s": sum(r[2] for r in results) / wall,
                "p50_s": statistics.median(latencies),
                "p95_s": latencies[max(0, round(0.95 * len(latencies)) - 1)],
                "ttft_s": statistics.median(r[0] for r in results),
            }
        )
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def measure() -> dict:
    from serving.engine import compute_dtype

    model, (server_cores, client_cores) = base_dir(), cores()
    texts, dtype = prompts(model), compute_dtype(str(model), "auto")
    out: dict = {"dtype": str(dtype).removeprefix("torch."), "server_cores": len(server_cores), "levels": {}}
    os.sched_setaffinity(0, server_cores)  # the baselines run where the server will
    out["sequential_tokens_per_s"] = sequential(model, texts[:8], dtype, len(server_cores))
    cbm = cb_manager.measure(model, texts, MAX_NEW, LEVELS, out["dtype"], len(server_cores))
    out["manager"] = cbm["levels"]
    os.sched_setaffinity(0, client_cores)
    with served(model, server_cores) as url:
        streamed(url, texts[0], None)  # warm-up
        for workers in LEVELS:
            out["levels"][workers] = load(url, texts[: max(8, 2 * workers)], workers, [None])
    paths = adapters(model, model.parent / "serving-adapters")
    names = list(paths)
    with served(model, server_cores, paths) as url:
        streamed(url, texts[0], names[0])
        out["single_adapter"] = load(url, texts[:16], 8, [names[0]])
        out["mixed_adapters"] = load(url, texts[:16], 8, [*names, None])
    return out


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    base, levels = result["sequential_tokens_per_s"], result["levels"]
    targets = {1: "≥ 0.95x", 8: "≥ 4x", 16: "≥ 6x"}
    out = [(f"sequential model.generate, {result['dtype']} (tok/s)", f"{base:.1f}", "", "1.00x")]
    for workers, r in levels.items():
        manager = result["manager"].get(workers) or result["manager"].get(str(workers))
        out += [
            (
                f"server, concurrency {workers} (tok/s)",
                f"{r['tokens_per_s']:.1f}",
                targets.get(int(workers), ""),
                f"{r['tokens_per_s'] / base:.2f}x",
            ),
            (
                "  latency p50 / p95, time to first token (s)",
                f"{r['p50_s']:.2f} / {r['p95_s']:.2f}, {r['ttft_s']:.3f}",
                "",
                "",
            ),
            (
                "  transformers ContinuousBatchingManager, same load (tok/s)",
                f"{manager['tokens_per_s']:.1f}",
                "",
                f"{manager['tokens_per_s'] / base:.2f}x",
            ),
        ]
    one, eight = levels.get(1) or levels["1"], levels.get(8) or levels["8"]
    out.append(("p95 latency at concurrency 8 / p50 at 1", f"{eight['p95_s'] / one['p50_s']:.2f}x", "≤ 2.5x", ""))
    single, mixed = result["single_adapter"], result["mixed_adapters"]
    out += [
        ("one adapter, concurrency 8 (tok/s)", f"{single['tokens_per_s']:.1f}", "", ""),
        (
            "three adapters + base, concurrency 8 (tok/s)",
            f"{mixed['tokens_per_s']:.1f}",
            "≥ 0.8x",
            f"{mixed['tokens_per_s'] / single['tokens_per_s']:.2f}x",
        ),
    ]
    return out
