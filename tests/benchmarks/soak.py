"""Benchmark: a bounded soak on loopback, promotion and a deployer restart under mixed load.

Run alone with `python -m tests.benchmarks.run soak` (`LLMOPS_SOAK_SECONDS`, default 600). A local MLflow server
holds two candidates of SmolLM2 (the same weights registered twice); `serving.promotion` copies candidate 1 into
production and sets `champion`, and a deployer (local backend, our server, a reconcile pass every 2 s) serves
it. Then six client threads send requests for the whole duration, each one of: a chat answer, a streamed
chat answer, `/v1/completions` with four prompts, or a stream the client leaves after its first event. At 30% of
the time candidate 2 is promoted, at 45% the deployer is restarted (a new Deployer over the same servers, as a
restarted deployer pod finds its Deployments), at 60% `champion` is rolled back to production version 1.

Each request finds the endpoint as applications do (`serving.client.find_endpoint`, the deployer's tags): during
a promotion there is a moment when the alias names a version not yet serving, and a moment when a client holds
the address of the server just replaced (locally each version has its own port; a cluster's Service name
stays). Both are retried after 0.5 s, as a client retries a 503, and counted apart. Anything else without an
HTTP answer is lost. Slots are read from the serving process's /metrics once every client has ended; memory is
the serving process's RSS, sampled every 5 s.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import Counter

DURATION_S = float(os.environ.get("LLMOPS_SOAK_SECONDS", "600"))
CLIENTS = 6
RETRY_S, RETRY_FOR_S = 0.5, 120.0  # a request waits at most this long for an endpoint
SAMPLE_S = 5.0  # between memory samples and schedule checks
QUESTIONS = ["I lost my card", "Where is my parcel?", "How do I reset my PIN?", "Refund my last payment please"]


class Tally:
    def __init__(self):
        self.lock, self.counts = threading.Lock(), Counter()

    def add(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1


ANSWERED, TURNED_AWAY = (": 200", ": left after one event"), (": 429", ": 503")


def category(key: str) -> str:
    """answered, turned away (429/503), retried (not a request's end) or lost: what became of a tally key."""
    if key.startswith("retried"):
        return "retried"
    return "answered" if key.endswith(ANSWERED) else "turned away" if key.endswith(TURNED_AWAY) else "lost"


def ask(url: str, mode: str, rng: random.Random):
    """One request of `mode` against `url`: its HTTP status (a stream read to its end, or left after one event)."""
    import requests

    chat = {"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "max_tokens": 16, "temperature": 0}
    if mode == "completions":
        body = {"prompt": rng.sample(QUESTIONS, 4), "max_tokens": 8, "temperature": 0}
        return requests.post(f"{url}/v1/completions", json=body, timeout=120).status_code
    if mode == "chat":
        return requests.post(f"{url}/v1/chat/completions", json=chat, timeout=120).status_code
    with requests.post(f"{url}/v1/chat/completions", json={**chat, "stream": True}, stream=True, timeout=120) as r:
        events = (line for line in r.iter_lines() if line.startswith(b"data:"))
        if r.status_code != 200:
            return r.status_code
        if mode == "leave":
            next(events, None)
            return "left after one event"  # closing the response drops the connection mid-stream
        if list(events)[-1:] != [b"data: [DONE]"]:
            raise RuntimeError("a stream ended without [DONE]")
        return r.status_code


def request(ref: str, mode: str, rng: random.Random, tally: Tally) -> None:
    import requests

    from serving.client import find_endpoint
    from tests.conftest import wait_for

    def attempt() -> bool:
        """True once the request has its end (an HTTP answer, or lost); False for a retry."""
        try:
            tally.add(f"{mode}: {ask(find_endpoint(ref).url, mode, rng)}")
        except LookupError:  # the alias names a version its deployer has not yet deployed
            tally.add("retried: the alias's version not yet serving")
            return False
        except requests.ConnectionError as err:
            if "refused" in str(err):
                tally.add("retried: connection refused (the server was just replaced)")
                return False
            tally.add(f"lost: {type(err).__name__}")
        except Exception as err:  # noqa: BLE001 - counted, the soak goes on
            tally.add(f"lost: {type(err).__name__}: {str(err)[:80]}")
        return True

    try:
        wait_for(attempt, RETRY_FOR_S, "an endpoint", poll=RETRY_S)
    except AssertionError:
        tally.add("lost: no endpoint within the retry budget")


def client_loop(ref: str, seed: int, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        request(ref, rng.choice(["chat", "stream", "completions", "leave"]), rng, tally)


class Deployers:
    """The deployer's reconcile loop in a thread, restartable; every deploy the backend makes is counted."""

    def __init__(self, backend):
        self.backend, self.deploys = backend, Counter()
        original = backend.deploy

        def counted(target):
            self.deploys[f"{target.name}/{target.version}"] += 1
            return original(target)

        backend.deploy = counted
        self.start()

    def start(self) -> None:
        from serving.deployer import Deployer

        self.stop, self.deployer = threading.Event(), Deployer(self.backend, interval_s=2.0)
        self.thread = threading.Thread(target=self.deployer.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def restart(self) -> None:
        self.stop.set()
        self.deployer.wake.set()
        self.thread.join()
        self.start()


def measure() -> dict:
    import psutil
    import requests
    from mlflow import MlflowClient

    from components.registry_tags import candidates_of
    from serving.promotion import copy_candidate, who_promotes
    from serving.settings import DeploySection
    from tests.benchmarks.deploy import local_stack, until
    from tests.benchmarks.serving import base_dir
    from tests.conftest import register_served

    name = f"soak-{uuid.uuid4().hex[:6]}"
    candidates, tally, memory = candidates_of(name), Tally(), []
    with local_stack("bench-soak-", DeploySection(engine="tgi")) as (_, _, backend):
        client = MlflowClient()
        for _ in range(2):
            register_served(candidates, base_dir(), {"recommended_quantize": "none", "gate.verdict": "passed"})
        who = who_promotes()

        def promote(candidate: str | None, version: str | None = None) -> float:
            if candidate:
                version = copy_candidate(client, candidates, candidate, who, "soak")[1]
            client.set_registered_model_alias(name, "champion", version)
            return until(lambda: backend.actual(name) and backend.actual(name)["version"] == version)

        deployers = Deployers(backend)
        first_deploy = promote("1")
        stop = threading.Event()
        ref = f"{name}@champion"
        clients = [threading.Thread(target=client_loop, args=(ref, i, stop, tally)) for i in range(CLIENTS)]
        started = time.monotonic()
        for thread in clients:
            thread.start()

        def rss() -> None:
            served = backend.servers.get(name)
            if served and served.proc.poll() is None:
                mib = psutil.Process(served.proc.pid).memory_info().rss / 2**20
                memory.append((time.monotonic() - started, served.version, served.proc.pid, mib))

        events, done = {}, set()
        while (elapsed := time.monotonic() - started) < DURATION_S:
            fraction = elapsed / DURATION_S
            if fraction >= 0.30 and "promote" not in done:
                done.add("promote")
                events["candidate 2 promoted, serving after (s)"] = promote("2")
            elif fraction >= 0.45 and "restart" not in done:
                done.add("restart")
                deployers.restart()
                before = sum(deployers.deploys.values())
                until(lambda: deployers.deployer.passes >= 3)
                redeploys = sum(deployers.deploys.values()) - before
                events["deploys by the restarted deployer in its first 3 passes"] = redeploys
            elif fraction >= 0.60 and "rollback" not in done:
                done.add("rollback")
                events["rolled back to version 1, serving after (s)"] = promote(None, "1")
            rss()
            stop.wait(SAMPLE_S)  # set only once the loop ends: a bounded pause between samples
        stop.set()
        for thread in clients:
            thread.join()
        url = f"http://127.0.0.1:{backend.servers[name].port}"
        gauges = {}
        for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
            key, _, value = line.partition(" ")
            if key in ("llmops_request_slots_in_use", "tgi_queue_size", "tgi_batch_current_size"):
                gauges[key] = float(value)
        rss()
        deployers.stop.set()
        deployers.deployer.wake.set()
        final = [m for m in memory if m[2] == memory[-1][2]]  # the process serving at the end, from its first sample
        return {
            "duration_s": DURATION_S,
            "first_deploy_s": first_deploy,
            "counts": dict(tally.counts),
            "events": events,
            "gauges": gauges,
            "rss_start_mib": final[1][3] if len(final) > 2 else final[0][3],  # past its first request's warm-up
            "rss_end_mib": final[-1][3],
            "rss_first_server_mib": [m[3] for m in memory if m[2] == memory[0][2]],
            "promoted_by": who,
        }


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    counts = result["counts"]
    total = Counter()
    for key, value in counts.items():
        total[category(key)] += value
    lost = total["lost"]
    out = [
        ("soak duration (s), clients", f"{result['duration_s']:.0f}, {CLIENTS}", "600", ""),
        ("first promotion: alias set → serving (s)", f"{result['first_deploy_s']:.1f}", "", ""),
        ("requests answered (200, or left by their client mid-stream)", str(total["answered"]), "", ""),
        ("requests turned away (429, 503)", str(total["turned away"]), "", ""),
        ("requests lost (no HTTP answer, or any other status)", str(lost), "0", "ok" if lost == 0 else "FAIL"),
    ]
    for key in sorted(counts):
        out.append((f"  {key}", str(counts[key]), "", ""))
    for key, value in result["events"].items():
        out.append((key, f"{value:.1f}" if isinstance(value, float) else str(value), "", ""))
    for key, value in result["gauges"].items():
        out.append((f"{key} after the load (leaked)", f"{value:.0f}", "0", "ok" if value == 0 else "FAIL"))
    ratio = result["rss_end_mib"] / result["rss_start_mib"]
    out.append(
        (
            "serving process RSS, start → end of its life (MiB)",
            f"{result['rss_start_mib']:.0f} → {result['rss_end_mib']:.0f}",
            "≤ 1.10x",
            f"{ratio:.3f}x",
        )
    )
    first = result["rss_first_server_mib"]
    out.append(("first server's RSS, first → last sample (MiB)", f"{first[0]:.0f} → {first[-1]:.0f}", "", ""))
    return out
