"""Which engine serves a version, what it is told, and the regex that holds answers to a label set."""

from __future__ import annotations

import csv
import json
import re

import pytest

from serving.client import label_regex
from serving.engines import EngineRefusal, engine_for, quantize_args, vllm_args
from serving.vllm_local import command, environment
from tests.conftest import shared_path

pytestmark = pytest.mark.unit
LABELS = ("card_lost", "reverted_card_payment?", "top_up_by_card_charge", "a+b (c)", "x|y", "dot.ted", "new\\line")


def test_the_version_tag_then_the_model_then_the_default_choose_the_engine():
    assert engine_for({}, "tgi") == "tgi"
    assert engine_for({}, "tgi", {"m": "vllm"}, "m") == "vllm"
    assert engine_for({"deploy.engine": "tgi"}, "vllm", {"m": "vllm"}, "m") == "tgi"
    with pytest.raises(EngineRefusal, match="not one of tgi, vllm"):
        engine_for({"deploy.engine": "TGI "}, "tgi")


def test_quantization_maps_per_engine_or_is_refused_with_what_to_do():
    nf4, int8 = {"recommended_quantize": "bitsandbytes-nf4"}, {"recommended_quantize": "bitsandbytes"}
    assert quantize_args("tgi", nf4) == ["--quantize", "bitsandbytes-nf4"]
    assert quantize_args("tgi", int8) == ["--quantize", "bitsandbytes"]
    assert quantize_args("vllm", {}) == quantize_args("tgi", {"recommended_quantize": "none"}) == []
    for tags in (nf4, int8):  # vLLM 0.32 has no bitsandbytes method (test_vllm_args.py asks the real one)
        with pytest.raises(EngineRefusal, match="no bitsandbytes quantization.*deploy.engine=tgi.*to none"):
            quantize_args("vllm", tags)


def test_adapters_become_lora_modules_and_the_local_command_runs_the_module_in_bfloat16(tmp_path):
    args = vllm_args(
        model_dir="/m", host="h", port=1, name="n", version="2", tags={}, max_total_tokens=512, extra=[],
        adapters={"b": "/b", "a": "/a"}, max_lora_rank=8,
    )  # fmt: skip
    assert args[args.index("--lora-modules") + 1 :][:2] == ["a=/a", "b=/b"]
    assert args[args.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in args
    structured = json.loads(args[args.index("--structured-outputs-config") + 1])
    assert structured == {"backend": "xgrammar", "disable_any_whitespace": True}
    local = command(tmp_path / "python", model_dir="/m", host="h", port=1, name="n", version="2", max_total_tokens=9)
    assert local[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and local[-2:] == ["--dtype", "bfloat16"]
    env = environment(kv_cache_gb=2, threads=1)
    assert (env["VLLM_CPU_KVCACHE_SPACE"], env["VLLM_CPU_OMP_THREADS_BIND"], env["HF_HUB_OFFLINE"]) == ("2", "0", "1")


def test_the_label_regex_matches_exactly_the_labels_whatever_their_characters():
    pattern = re.compile(label_regex(LABELS))
    for label in LABELS:
        assert pattern.fullmatch(label)
    for other in ("card_lost?", "reverted_card_payment", "a+b c", "x", "dotXted", "card_lost card_lost", ""):
        assert not pattern.fullmatch(other), other


def test_the_label_regex_compiles_for_constrained_decoding_on_banking77s_labels():
    """llguidance (our server's grammar library, Rust's regex syntax) takes the same regex on real labels."""
    import llguidance

    with shared_path("data", "banking77", "train.csv").open(newline="") as handle:
        labels = sorted({row["category"] for row in csv.DictReader(handle)})
    assert len(labels) == 77 and "reverted_card_payment?" in labels
    for regex in (label_regex(tuple(labels)), label_regex(LABELS)):
        grammar = llguidance.LLMatcher.grammar_from_regex(regex)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        assert not failed and not messages, messages
