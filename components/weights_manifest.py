"""Every file of a registered model and its sha256: written at registration, checked before anything loads it.

The manifest sits at the logged model's root and lists every other file there: the merged directory that
TGI or `llmops serve` loads, and what `mlflow.pyfunc.load_model` reads (MLmodel, the code file it runs,
the environment files, the input example). Its own sha256 goes into a registry tag
(`weights.manifest_sha256`), which lives in MLflow's database, not in the artifact store, so a file
changed, added or removed in the store after registration is caught: either the manifest no longer
hashes to the tag, or a file no longer matches the manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from components.util import file_sha256


class VerificationError(RuntimeError):
    """A file differs from what was registered; the message names the file."""


def _files(root: Path, manifest_file: Path) -> list[Path]:
    """Every file under root but the manifest itself (which sits inside root)."""
    skip = Path(manifest_file).resolve()
    return [p for p in sorted(Path(root).rglob("*")) if p.is_file() and p.resolve() != skip]


def build(root: Path, manifest_file: Path) -> dict:
    root = Path(root)
    files = {
        str(p.relative_to(root)): {"sha256": file_sha256(p), "size": p.stat().st_size}
        for p in _files(root, manifest_file)
    }
    return {"files": files}


def write(root: Path, out_file: Path) -> str:
    """Write the manifest of root to out_file (inside root or not); returns its sha256 (the tag's value)."""
    out_file = Path(out_file)
    manifest = build(root, out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return file_sha256(out_file)


def verify(root: Path, manifest_file: Path, expected_sha256: str) -> int:
    """Check every file under root against the manifest, and the manifest against the tag.

    Returns the bytes checked. Raises VerificationError naming the first file that differs, is missing,
    or is not in the manifest.
    """
    manifest_file, root = Path(manifest_file), Path(root)
    if not manifest_file.is_file():
        raise VerificationError(f"{manifest_file.name} is missing: nothing to check the model's files against")
    data = manifest_file.read_bytes()  # read once: the bytes hashed are the bytes used
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise VerificationError(
            f"{manifest_file.name} has sha256 {actual[:12]}…, but the registered version "
            f"recorded {expected_sha256[:12]}…: the manifest was changed after registration"
        )
    files = json.loads(data)["files"]
    present = {str(p.relative_to(root)) for p in _files(root, manifest_file)}
    if extra := sorted(present - set(files)):
        raise VerificationError(f"{extra[0]} is not among the registered files (added after registration)")
    checked = 0
    for name, meta in files.items():
        path = root / name
        if not path.is_file():
            raise VerificationError(f"{name} is missing: it was registered with sha256 {meta['sha256'][:12]}…")
        if path.stat().st_size != meta["size"] or file_sha256(path) != meta["sha256"]:
            raise VerificationError(f"{name} differs from the registered file (sha256 {meta['sha256'][:12]}…)")
        checked += meta["size"]
    return checked
