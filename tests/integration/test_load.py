"""Bounded load on loopback: nothing lost at concurrency 16, 429s (not errors) over the limit, and greedy
outputs under load identical to outputs served one at a time."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import Live

pytestmark = pytest.mark.integration
PROMPTS = [f"ticket {i}: " + ("I lost my card " * (1 + i % 3)) for i in range(48)]


def ask(url: str, prompt: str) -> tuple[int, str]:
    response = requests.post(
        f"{url}/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 10}}, timeout=120
    )
    return response.status_code, response.json().get("generated_text") or response.json().get("error_type")


def test_concurrency_16_loses_nothing_and_matches_sequential_outputs(tiny_base):
    from tests.conftest import server_app

    with Live(server_app(str(tiny_base), max_total_tokens=256, max_concurrent_requests=16, max_batch_size=8)) as live:
        sequential = [ask(live.url, p) for p in PROMPTS[:12]]
        with ThreadPoolExecutor(16) as pool:
            loaded = list(pool.map(lambda p: ask(live.url, p), PROMPTS))  # 48 requests, 16 in flight at most
        metrics = requests.get(f"{live.url}/metrics", timeout=10).text
    assert [status for status, _ in loaded] == [200] * len(PROMPTS)
    assert loaded[:12] == sequential
    assert "tgi_request_count" in metrics
    assert "\nllmops_request_slots_in_use 0.0\n" in metrics and "\ntgi_queue_size 0.0\n" in metrics  # none leaked


def test_overload_gets_429s_keeps_health_and_recovers(tiny_base):
    from tests.conftest import server_app

    with Live(server_app(str(tiny_base), max_total_tokens=256, max_concurrent_requests=2, max_batch_size=2)) as live:
        with ThreadPoolExecutor(16) as pool:
            burst = pool.map(lambda p: ask(live.url, p), PROMPTS[:32])
            health = [requests.get(f"{live.url}/health", timeout=10).status_code for _ in range(5)]
            results = list(burst)
        after = ask(live.url, PROMPTS[0])
    statuses = {status for status, _ in results}
    assert statuses <= {200, 429} and 429 in statuses and 200 in statuses
    assert all(kind == "overloaded" for status, kind in results if status == 429)
    assert health == [200] * 5
    assert after[0] == 200
