"""Benchmark: what int8 and NF4 cost and save against the 16-bit model: size on disk, memory, and
exact-match and perplexity deltas on the evaluation benchmark's BANKING77 examples.

The variants are built and scored by `components.stages.quantize.run` itself (the quantize stage, unchanged).
Its memory figure is the weights' footprint (`get_memory_footprint`); the resident memory is measured
apart, one fresh process per variant, as the RSS a load plus one forward adds to an idle interpreter
that has already imported the same libraries.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.benchmarks.evaluation import EXAMPLES, THREADS, banking77, base_dir, no_tracking, pin_threads

CHILD = """
import json, sys, psutil, torch
from pathlib import Path
from components.inference import load_model, load_tokenizer
from components.inference import bnb_config
import bitsandbytes  # imported before the first reading, like transformers, so it does not count as model

torch.set_num_threads(int(sys.argv[3]))
me = psutil.Process()
before = me.memory_info().rss
variant = sys.argv[2]
model = load_model(Path(sys.argv[1]), quantization=None if variant == "merged" else bnb_config(variant))
tok = load_tokenizer(Path(sys.argv[1]))
with torch.inference_mode():
    model(**tok(["a forward pass allocates what inference needs"], return_tensors="pt"))
print(json.dumps({"rss_added": me.memory_info().rss - before}))
"""


def resident(model_dir: Path, variant: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_dir), variant, str(THREADS)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"resident memory of {variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_added"]


def measure() -> dict:
    from components.config import QuantizeSection
    from components.stages import quantize

    pin_threads()
    model_dir, data = base_dir(), banking77()
    out = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    try:
        with no_tracking():
            report = quantize.run(QuantizeSection(eval_examples=EXAMPLES), model_dir, data, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the int8 and NF4 variants: measured, not kept
    for name in report["results"]:
        report["results"][name]["rss_added"] = resident(model_dir, name)
    return report


def rows(report: dict) -> list[tuple[str, str, str, str]]:
    res = report["results"]
    ref = res["merged"]
    names = {"merged": "16-bit (bfloat16)", "int8": "int8 (LLM.int8)", "nf4": "NF4 (double quant)"}
    out = [
        (
            f"model: packaged SmolLM2-135M base as the merged model (no trained one at hand); "
            f"{report['examples']} BANKING77 eval examples, {THREADS} intra-op thread",
            "",
            "",
            "",
        )
    ]
    for name, r in res.items():
        out += [
            (
                f"{names[name]}: size on disk (MB)",
                f"{r['disk_bytes'] / 1e6:.1f}",
                "",
                f"{r['disk_bytes'] / ref['disk_bytes']:.2f}x",
            ),
            (
                f"{names[name]}: weights in memory, get_memory_footprint (MB)",
                f"{r['memory_bytes'] / 1e6:.1f}",
                "",
                f"{r['memory_bytes'] / ref['memory_bytes']:.2f}x",
            ),
            (
                f"{names[name]}: resident memory added by load + one forward (MB)",
                f"{r['rss_added'] / 1e6:.1f}",
                "",
                f"{r['rss_added'] / ref['rss_added']:.2f}x",
            ),
            (f"{names[name]}: exact match / perplexity", f"{r['exact_match']:.3f} / {r['perplexity']:.3f}", "", ""),
        ]
        if "delta" in r:
            d = r["delta"]
            out.append(
                (
                    f"{names[name]}: accuracy drop / perplexity increase vs 16-bit",
                    f"{d['accuracy_drop']:+.3f} / {d['perplexity_increase']:+.2%}",
                    f"≤ {report['thresholds']['max_accuracy_drop']:.2f} / "
                    f"≤ {report['thresholds']['max_perplexity_increase']:.0%}",
                    "",
                )
            )
    out.append(("recommended TGI --quantize (quantize stage's rule)", report["recommended_quantize"], "", ""))
    return out
