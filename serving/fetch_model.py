"""Init container entry point: put a registered model version where TGI will load it.

    python -m serving.fetch_model models:/<name>/<version> /data/model [--manifest-sha256 DIGEST]
        [--adapter=NAME=models:/<adapter-model>/<version>@DIGEST ...]

DIGEST is the manifest digest the deployer read from the version's tag when it deployed it: every pod start
checks the files against it, never against the tag as it reads now, so a tag or file changed after the deploy
keeps the new pod out of service while the replicas already serving go on.

Credentials come from the environment (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_*, AWS_*), which the
Deployment fills from Kubernetes Secrets. A non-zero exit keeps the pod out of service, so the
previous version goes on serving instead of TGI crash-looping on a half-empty directory.
Each adapter placed on the deployment (serving/placement.py) lands in <DEST>/../adapters/NAME, checked against
the digest pinned for it the same way.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from components.environment import TRACKING_URI

USAGE = (
    "usage: python -m serving.fetch_model MODEL_URI DEST [--manifest-sha256 DIGEST] [--adapter=NAME=URI@DIGEST ...]"
    "   (e.g. models:/llmops-demo/3 /data/model)"
)


class FetchError(RuntimeError):
    pass


def check_model_dir(path: Path) -> None:
    """TGI needs a Hugging Face directory with safetensors weights; say which part is missing."""
    if not (path / "config.json").is_file():
        raise FetchError(f"{path} has no config.json: the version's artifacts are not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise FetchError(f"{path} has no *.safetensors file: TGI would fail to load the weights")


def into_place(verified: Path, dest: Path, staging: Path) -> None:
    """Verified files replace dest. Same volume: a rename, so the engine never sees a half-moved directory."""
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(verified, dest)
    shutil.rmtree(staging, ignore_errors=True)


def fetch(model_uri: str, dest: Path, pinned: str | None = None) -> Path:
    """Download the version into a staging directory beside dest, verify every file, then move it into place.

    Nothing reaches dest unless every file matches the manifest recorded at registration.
    """
    from components.weights_manifest import VerificationError
    from serving.model_refs import REF
    from serving.verified_model import download_verified, model_version

    match = REF.match(model_uri)
    if not match:
        raise FetchError(f"{model_uri}: expected models:/name/version or models:/name@alias")
    staging = dest.parent / f".{dest.name}.download"
    try:
        mv = model_version(match["name"], match["version"], match["alias"])
        verified = download_verified(mv, staging, pinned)
    except VerificationError as exc:
        raise FetchError(f"refused {model_uri}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure (registry, S3, network) means the same to the pod
        tracking = TRACKING_URI.get() or "<unset>"
        raise FetchError(
            f"could not download {model_uri} ({TRACKING_URI.name}={tracking}): {type(exc).__name__}: {exc}"
        ) from exc
    into_place(verified.path, dest, staging)
    check_model_dir(dest)
    print(
        f"fetch_model: verified {verified.bytes_checked / 1e6:.1f} MB against the registered manifest "
        f"in {verified.seconds:.1f}s"
    )
    return dest


def fetch_adapter(spec: str, root: Path) -> Path:
    """`NAME=models:/name/version@DIGEST` into root/NAME, every file checked against DIGEST."""
    from components.weights_manifest import VerificationError
    from serving.model_refs import REF
    from serving.verified_model import download_verified_adapter, model_version

    name, _, rest = spec.partition("=")
    uri, _, digest = rest.partition("@")
    match = REF.match(uri)
    if not name or not match or not digest or not match["version"]:
        raise FetchError(f"--adapter {spec!r}: expected NAME=models:/name/version@DIGEST")
    dest = root / name
    staging = root / f".{name}.download"
    try:
        files = download_verified_adapter(model_version(match["name"], match["version"]), staging, digest)
    except VerificationError as exc:
        raise FetchError(f"refused adapter {uri}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - as for the model: the pod stays out of service, saying why
        raise FetchError(f"could not download adapter {uri}: {type(exc).__name__}: {exc}") from exc
    into_place(files, dest, staging)
    print(f"fetch_model: adapter {name} verified against {digest[:12]}")
    return dest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    adapters = [a.removeprefix("--adapter=") for a in args if a.startswith("--adapter=")]
    args = [a for a in args if not a.startswith("--adapter=")]
    pinned = None
    if len(args) == 4 and args[2] == "--manifest-sha256":
        args, pinned = args[:2], args[3]
    if len(args) != 2:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        local = fetch(args[0], Path(args[1]), pinned)
        for spec in adapters:
            fetch_adapter(spec, Path(args[1]).parent / "adapters")
    except FetchError as exc:
        print(f"fetch_model: {exc}", file=sys.stderr)
        return 1
    print(f"fetch_model: {args[0]} -> {local} ({sum(1 for _ in local.iterdir())} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
