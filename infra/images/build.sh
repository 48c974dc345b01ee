#!/usr/bin/env bash
# Builds the kfp component images (what `make images` runs), tagged with the package version so a
# compiled pipeline names exactly the code it runs (pipelines/images.py computes the same tags):
#   $REGISTRY/llmops-cpu:$VERSION   from infra/images/Dockerfile.cpu
#   $REGISTRY/llmops-gpu:$VERSION   from infra/images/Dockerfile.gpu
# VERSION is [project].version in pyproject.toml; REGISTRY is $LLMOPS_IMAGE_REGISTRY, the variable
# the pipeline compiler reads, default ghcr.io/llmops.
#
# Usage: infra/images/build.sh [--print-tags] [--push] [cpu] [gpu]     (no image named: both)
#   --print-tags  print the tags that would be built and exit (needs no Docker)
#   --push        push each image after building it
# Environment:
#   LLMOPS_IMAGE_REGISTRY                     registry and namespace, default ghcr.io/llmops
#   LLMOPS_CPU_TORCH_INDEX_URL, LLMOPS_GPU_TORCH_INDEX_URL
#                                             when set, the TORCH_INDEX_URL build arg of that image
#   LLMOPS_IMAGE_PLATFORM                     default linux/amd64 (the CUDA wheels are x86_64)
#   DOCKER                                    the docker client, default docker
#   LLMOPS_CPU_BASE_IMAGE, LLMOPS_GPU_BASE_IMAGE  base images, pinned by digest (the Dockerfiles' are placeholders)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
docker="${DOCKER:-docker}"
registry="${LLMOPS_IMAGE_REGISTRY:-ghcr.io/llmops}"
platform="${LLMOPS_IMAGE_PLATFORM:-linux/amd64}"

die() { echo "build.sh: $*" >&2; exit 1; }

version="$(awk -F'"' '/^\[/ { section = $0 } section == "[project]" && /^version[ \t]*=/ { print $2; exit }' \
    "$root/pyproject.toml")"
[[ -n "$version" ]] || die "no [project] version in $root/pyproject.toml"

print_only=0 push=0 images=()
for arg in "$@"; do
    case "$arg" in
        --print-tags) print_only=1 ;;
        --push) push=1 ;;
        cpu | gpu) images+=("$arg") ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument '$arg' (expected cpu, gpu, --print-tags or --push)" ;;
    esac
done
[[ ${#images[@]} -gt 0 ]] || images=(cpu gpu)

tag() { printf '%s/llmops-%s:%s\n' "$registry" "$1" "$version"; }
tags=()
for image in "${images[@]}"; do tags+=("$(tag "$image")"); done

if [[ $print_only -eq 1 ]]; then
    printf '%s\n' "${tags[@]}"
    exit 0
fi

command -v "$docker" >/dev/null 2>&1 || die "the docker client ('$docker') is not installed; no image was built."
if ! "$docker" info >/dev/null 2>&1; then
    die "no Docker engine answers ('$docker info' failed), so no image was built.
  Start one (dockerd, Docker Desktop, colima, ...) or point DOCKER_HOST at a remote engine, then run
  'make images' again. It would build: ${tags[*]}"
fi

placeholder="@sha256:0000000000000000000000000000000000000000000000000000000000000000"
for image in "${images[@]}"; do
    name="$(tag "$image")"
    build_args=(--build-arg "VERSION=$version")
    # The base image, pinned by digest: the Dockerfile's, or LLMOPS_<IMAGE>_BASE_IMAGE. A placeholder stops here.
    base_arg="$([[ $image == cpu ]] && echo PYTHON_IMAGE || echo CUDA_IMAGE)"
    base_var="LLMOPS_${image^^}_BASE_IMAGE"
    base="${!base_var:-$(sed -n "s/^ARG $base_arg=//p" "$root/infra/images/Dockerfile.$image")}"
    if [[ "$base" == *"$placeholder" ]]; then
        die "the base of $name still carries the placeholder digest ($base).
  Set the digest your registry serves, e.g. $base_var=\"${base%@*}@\$(crane digest ${base%@*})\", or edit
  ARG $base_arg in infra/images/Dockerfile.$image; nothing was built."
    fi
    [[ "$base" == *@sha256:* ]] || die "the base of $name ($base) is not pinned by digest; nothing was built."
    build_args+=(--build-arg "$base_arg=$base")
    index_var="LLMOPS_${image^^}_TORCH_INDEX_URL"
    if [[ -n "${!index_var+set}" ]]; then
        build_args+=(--build-arg "TORCH_INDEX_URL=${!index_var}")
    fi
    echo "build.sh: building $name" >&2
    "$docker" build --platform "$platform" -f "$root/infra/images/Dockerfile.$image" \
        "${build_args[@]}" -t "$name" "$root"
    if [[ $push -eq 1 ]]; then
        "$docker" push "$name"
    fi
done
echo "build.sh: built ${tags[*]}" >&2
