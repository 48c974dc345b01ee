"""Benchmark: a merged-model-sized directory through components.storage (boto3 multipart, manifest,
sha256 on both ends) against a moto S3 server on loopback, next to a plain `shutil.copytree`.

The moto server runs in this process (ThreadedMotoServer, as the tests use it), so client and server
share one interpreter and its GIL: the figures are a floor for what a real endpoint would give.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

MB = 1e6  # throughput in decimal megabytes per second, as network and disk vendors quote it
REPEATS = 3  # medians of three: one copy of 285 MB takes a tenth of a second and jitters
WEIGHTS_BYTES = 270 * 1024 * 1024  # about SmolLM2-135M's model.safetensors in 16 bits


def make_model_dir(root: Path, weights_bytes: int = WEIGHTS_BYTES) -> Path:
    """A directory shaped like a merged model: one big weights file and the small JSON files beside it."""
    root.mkdir(parents=True)
    # Random bytes: nothing on the path compresses, and each run's content (so its checksums) is new.
    with open(root / "model.safetensors", "wb") as fh:
        left = weights_bytes
        while left:
            block = os.urandom(min(left, 8 * 1024 * 1024))
            fh.write(block)
            left -= len(block)
    small = {
        "config.json": {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 576,
            "num_hidden_layers": 30,
            "torch_dtype": "float16",
            "vocab_size": 49152,
        },
        "generation_config.json": {"eos_token_id": 2, "pad_token_id": 49152},
        "tokenizer_config.json": {"model_max_length": 8192, "eos_token": "<|im_end|>", "pad_token": "<|pad|>"},
        "special_tokens_map.json": {"eos_token": "<|im_end|>", "pad_token": "<|pad|>"},
        # tokenizer.json is the one small file of real size (~2 MB for a 49k BPE vocabulary).
        "tokenizer.json": {
            "model": {
                "type": "BPE",
                "vocab": {f"tok{i}": i for i in range(49152)},
                "merges": [f"t{i} o{i}" for i in range(48900)],
            }
        },
        "llmops_base.json": {"weights_sha256": uuid.uuid4().hex},
    }
    for name, body in small.items():
        (root / name).write_text(json.dumps(body, indent=1))
    return root


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def same_tree(a: Path, b: Path, ignore: set[str]) -> bool:
    """Byte-for-byte equality of every file (names and contents), compared in blocks to keep memory flat."""
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    if [f for f in files_a if f not in ignore] != [f for f in files_b if f not in ignore]:
        return False
    for rel in files_a:
        if rel in ignore:
            continue
        with open(a / rel, "rb") as fa, open(b / rel, "rb") as fb:
            while True:
                x, y = fa.read(1 << 20), fb.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    break
    return True


def _timed(fn, *args, **kw) -> float:
    started = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - started


def measure(repeats: int = REPEATS) -> dict:
    from components import storage
    from components.util import file_sha256
    from tests.conftest import moto_s3

    scratch = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    # werkzeug (inside moto) logs every request line to stderr; hundreds of them would bury the tables.
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)
    times: dict[str, list[float]] = {"copy": [], "hash": [], "upload": [], "download": []}
    try:
        src = make_model_dir(scratch / "model")
        # The source was just written, so every contender reads it from the page cache: this compares
        # transfer paths, not the disk. Nothing is fsynced, on either side.
        with moto_s3(scratch):
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            storage.client().create_bucket(Bucket=bucket)
            for i in range(repeats):
                copy, down, uri = scratch / f"copy-{i}", scratch / f"down-{i}", f"s3://{bucket}/models/merged-{i}"
                times["copy"].append(_timed(shutil.copytree, src, copy))
                times["hash"].append(_timed(lambda: [file_sha256(p) for p in src.iterdir()]))
                # A fresh prefix and target each time: download_dir skips a target that already matches.
                times["upload"].append(_timed(storage.upload_dir, src, uri))
                times["download"].append(_timed(storage.download_dir, uri, down))
                # download_dir adds its manifest to the directory; everything else must match the source exactly.
                if not same_tree(src, down, ignore={storage.MANIFEST}):
                    raise RuntimeError(
                        f"storage round trip changed the model directory: upload_dir → download_dir "
                        f"({uri}) did not give back the bytes of {src}"
                    )
                if not same_tree(src, copy, ignore=set()):
                    raise RuntimeError("shutil.copytree did not reproduce the directory")
                shutil.rmtree(copy)
                shutil.rmtree(down)
            etag = storage.client().head_object(Bucket=bucket, Key="models/merged-0/model.safetensors")["ETag"]
        return {
            "bytes": dir_bytes(src),
            "files": sum(1 for _ in src.iterdir()),
            "repeats": repeats,
            **{f"{k}_s": statistics.median(v) for k, v in times.items()},
            # A multipart ETag ends in -<parts>: shows the weights really went up in parts.
            "weights_parts": int(etag.strip('"').partition("-")[2] or 1),
        }
    finally:
        werkzeug.setLevel(level)
        shutil.rmtree(scratch, ignore_errors=True)


def rows(result: dict) -> list[tuple[str, str, str, str]]:
    mbps = {k: result["bytes"] / MB / result[f"{k}_s"] for k in ("copy", "hash", "upload", "download")}
    copy = mbps["copy"]
    return [
        (
            f"model directory ({result['files']} files, MB; medians of {result['repeats']} runs)",
            f"{result['bytes'] / MB:.0f}",
            "",
            "",
        ),
        ("shutil.copytree (MB/s)", f"{copy:.0f}", "", "1.00x"),
        ("sha256 of every file, the manifest's cost (MB/s)", f"{mbps['hash']:.0f}", "", f"{mbps['hash'] / copy:.2f}x"),
        (
            f"upload_dir to moto S3, multipart ({result['weights_parts']} parts for the weights) (MB/s)",
            f"{mbps['upload']:.0f}",
            "",
            f"{mbps['upload'] / copy:.2f}x",
        ),
        (
            "download_dir from moto S3, verified (MB/s)",
            f"{mbps['download']:.0f}",
            "",
            f"{mbps['download'] / copy:.2f}x",
        ),
        ("round trip byte-identical (checked, raises otherwise)", "yes", "", ""),
    ]
