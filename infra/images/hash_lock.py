"""Give every pin in requirements.lock the sha256 of each file the index serves for it (`make lock-hashes`).

For `name==version` it reads the package's PEP 691 simple-index page (the index pip installs from) and keeps
the hashes of every wheel and sdist of that exact version, so `pip install --require-hashes` accepts whichever
file pip picks for the image's platform and nothing else. Wheels in a local find-links directory (PIP_FIND_LINKS
or --find-links, e.g. a CPU build of torch kept on disk) are hashed too when their version matches.

Usage: python infra/images/hash_lock.py requirements.lock [--index URL ...] [--find-links DIR ...]

Hashes for the GPU image. Its torch comes from a CUDA index (Dockerfile.gpu, TORCH_INDEX_URL) and brings
nvidia-* packages the dev venv never installs. On a machine that reaches that index:
  pip install --dry-run --ignore-installed --report gpu.json --target /tmp/x --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --python-version 3.11 \
      --extra-index-url https://download.pytorch.org/whl/cu128 torch==2.13.0
add the pins gpu.json lists that requirements.lock lacks, then run this with
  --index https://pypi.org/simple --index https://download.pytorch.org/whl/cu128
so torch's CUDA wheel and those packages get their hashes. Until then install.sh stops on the GPU image and
names the first package missing (the index this was written on serves neither).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import urllib.request
from pathlib import Path

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;]+)")


def file_version(filename: str) -> tuple[str, Version] | None:
    try:
        if filename.endswith(".whl"):
            name, version, *_ = parse_wheel_filename(filename)
        else:
            name, version = parse_sdist_filename(filename)
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None
    return canonicalize_name(name), version


def index_hashes(name: str, version: str, index: str) -> set[str]:
    request = urllib.request.Request(
        f"{index.rstrip('/')}/{canonicalize_name(name)}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    wanted = (canonicalize_name(name), Version(version))
    return {f["hashes"]["sha256"] for f in files if "sha256" in f["hashes"] and file_version(f["filename"]) == wanted}


def local_hashes(name: str, version: str, directories: list[Path]) -> set[str]:
    wanted = (canonicalize_name(name), Version(version))
    found = set()
    for directory in directories:
        for path in directory.glob("*.whl"):
            # a local build carries a label (torch 2.13.0+cpu): it stands in for the public release
            parsed = file_version(path.name)
            if parsed and parsed[0] == wanted[0] and Version(parsed[1].public) == wanted[1]:
                found.add(hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def hashed(lock: Path, indexes: list[str], find_links: list[Path]) -> str:
    out = []
    for line in lock.read_text().splitlines():
        pin = PIN.match(line.strip())
        if not pin:
            out.append(line)
            continue
        name, version = pin["name"], pin["version"]
        hashes = local_hashes(name, version, find_links).union(*(index_hashes(name, version, i) for i in indexes))
        if not hashes:
            sys.exit(f"hash_lock: the index serves no file for {name}=={version}")
        out.append(f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in sorted(hashes)))
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("--index", action="append", help="simple index (PEP 691); default: PyPI")
    parser.add_argument("--find-links", type=Path, action="append", default=[])
    args = parser.parse_args()
    args.lock.write_text(hashed(args.lock, args.index or ["https://pypi.org/simple"], args.find_links))


if __name__ == "__main__":
    main()
