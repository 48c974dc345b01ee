"""What serves or loads is what was registered: every file of a version is checked against its manifest.

The artifact store is tampered with as an attacker with write access to it would: a changed byte, a
deleted file, an added file, in the weights, in MLmodel or in the code file MLflow runs. The TGI init
container (fetch_model), `llmops serve` and `chat_pyfunc.load_verified` refuse, naming the file, before
anything loads it; the deployer marks the version failed with that reason and the previous version keeps
serving.
"""

import json
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmops.cli import app
from serving import fetch_model
from tests.conftest import logged_model_files, register_served

pytestmark = pytest.mark.integration


@pytest.fixture
def registered(mlflow_server, tiny_base, monkeypatch):
    name = f"verified-{uuid.uuid4().hex[:6]}"
    with monkeypatch.context() as m:
        # Python writes bytecode, as on a developer's machine (PYTHONDONTWRITEBYTECODE may be set here), so
        # the copied code file MLflow imports while logging must leave no __pycache__ outside the manifest.
        m.setattr(sys, "dont_write_bytecode", False)
        version = register_served(name, tiny_base, {"gate.verdict": "passed"})
    yield name, version, logged_model_files(mlflow_server.root, version)
    from mlflow import MlflowClient

    MlflowClient().delete_registered_model(name)  # the shared server keeps no model from this test


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def model_root(stored):
    """The logged model's root in the store (MLmodel, the code file, the manifest) above its served directory."""
    return stored.parent.parent


def test_the_logged_model_holds_no_pickle_and_its_manifest_covers_every_file(registered):
    import yaml

    _, _, stored = registered
    root = model_root(stored)
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert not [name for name in files if name.endswith((".pkl", ".pickle"))], files
    pyfunc = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in pyfunc
    listed = set(json.loads((root / "weights_manifest.json").read_text())["files"])
    assert listed == files - {"weights_manifest.json"}  # every file MLflow wrote, nothing left out
    assert {"MLmodel", "chat_pyfunc_code.py", "requirements.txt", "artifacts/model/model.safetensors"} <= listed


def test_fetch_model_places_exactly_the_registered_files(registered, tiny_base, tmp_path, capsys):
    name, version, _ = registered
    dest = tmp_path / "data" / "model"
    assert fetch_model.main([f"models:/{name}/{version.version}", str(dest)]) == 0
    assert "verified" in capsys.readouterr().out
    for source in tiny_base.iterdir():
        assert (dest / source.name).read_bytes() == source.read_bytes()
    assert fetch_model.main([f"models:/{name}/99", str(tmp_path / "none")]) == 1  # no such version


@pytest.mark.parametrize(
    "tamper, named",
    [
        (lambda d: flip_a_byte(d / "model.safetensors"), "model.safetensors differs"),
        (lambda d: flip_a_byte(d / "tokenizer_config.json"), "tokenizer_config.json differs"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "extra.safetensors").write_bytes(b"\0" * 8), "extra.safetensors is not among the registered"),
        (lambda d: flip_a_byte(model_root(d) / "MLmodel"), "MLmodel differs"),
        (lambda d: flip_a_byte(model_root(d) / "chat_pyfunc_code.py"), "chat_pyfunc_code.py differs"),
    ],
)
def test_a_tampered_store_is_refused_by_fetch_model_and_by_serve(registered, tmp_path, capsys, tamper, named):
    name, version, stored = registered
    tamper(stored)
    dest = tmp_path / "data" / "model"
    assert fetch_model.main([f"models:/{name}/{version.version}", str(dest)]) == 1
    assert named in capsys.readouterr().err
    assert not dest.exists()  # nothing reached the directory TGI loads

    result = CliRunner().invoke(
        app,
        ["serve", f"models:/{name}/{version.version}", "--port", "1"],
        env={"LLMOPS_SERVING_DIR": str(tmp_path / "serving")},
    )
    assert result.exit_code == 3 and named in result.output


@pytest.mark.parametrize("changed", ["chat_pyfunc_code.py", "MLmodel"])
def test_load_verified_refuses_a_changed_code_file_or_mlmodel_before_mlflow_reads_it(
    registered, tmp_path, monkeypatch, changed
):
    import mlflow

    from components.chat_pyfunc import load_verified
    from components.weights_manifest import VerificationError

    name, version, stored = registered
    uri, ran = f"models:/{name}/{version.version}", tmp_path / "ran"
    target = model_root(stored) / changed
    if changed == "MLmodel":
        flip_a_byte(target)
    else:  # what an attacker would append: code that runs in every process that loads the model
        target.write_text(target.read_text() + f"\nopen({str(ran)!r}, 'w').close()\n")

    def load_model(*args, **kwargs):
        raise AssertionError("mlflow.pyfunc.load_model was reached with a changed file")

    monkeypatch.setattr(mlflow.pyfunc, "load_model", load_model)
    with pytest.raises(VerificationError, match=f"{changed} differs"):
        load_verified(uri)
    assert not ran.exists()
    if changed == "chat_pyfunc_code.py":
        monkeypatch.undo()
        mlflow.pyfunc.load_model(uri)  # the unverified path runs the appended line: what load_verified stops
        assert ran.exists()


def test_a_version_in_the_old_layout_is_refused_with_the_remedy(registered, tmp_path, capsys):
    """Before models-from-code the manifest sat beside the weights and covered them only (MLmodel and the
    pickle went unchecked): such a version is refused as a whole, saying what to do."""
    name, version, stored = registered
    (model_root(stored) / "weights_manifest.json").rename(stored.parent / "weights_manifest.json")
    assert fetch_model.main([f"models:/{name}/{version.version}", str(tmp_path / "model")]) == 1
    assert "registered before its manifest covered MLmodel" in capsys.readouterr().err


def test_a_changed_manifest_is_refused(registered, tmp_path, capsys):
    name, version, stored = registered
    manifest = model_root(stored) / "weights_manifest.json"
    flip_a_byte(stored / "config.json")
    shutil.copy(manifest, tmp_path / "kept.json")
    text = manifest.read_text()  # an attacker who rewrites the manifest to match cannot match the registry's tag
    manifest.write_text(text.replace('"size"', '"size" ', 1))
    assert fetch_model.main([f"models:/{name}/{version.version}", str(tmp_path / "model")]) == 1
    assert "weights_manifest.json has sha256" in capsys.readouterr().err


def test_a_pod_start_checks_the_digest_pinned_at_deploy_time_not_the_tag_as_it_reads_now(registered, tmp_path, capsys):
    """The Deployment carries the manifest digest the deployer read when it deployed (its fetch-model argument).
    An attacker who can write the store and the tag swaps both, consistently, after the deploy: the next pod
    start refuses, whether the files match their new manifest or not."""
    from mlflow import MlflowClient

    from components.registry_tags import MANIFEST_TAG
    from components.weights_manifest import write
    from serving.manifests import ANN_MANIFEST, render_deployment
    from serving.settings import DeploySection

    name, version, stored = registered
    pinned = version.tags[MANIFEST_TAG]
    pod = render_deployment(DeploySection(), name=name, version=version.version, run_id="r", tags=version.tags)
    command = pod["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert command[-2:] == ["--manifest-sha256", pinned] and pod["metadata"]["annotations"][ANN_MANIFEST] == pinned
    args = [f"models:/{name}/{version.version}", str(tmp_path / "first" / "model"), "--manifest-sha256", pinned]
    assert fetch_model.main(args) == 0  # the deployed state starts

    root = model_root(stored)  # after the deploy: new weights, a manifest that matches them, the tag moved to it
    flip_a_byte(stored / "model.safetensors")
    forged = write(root, root / "weights_manifest.json")
    MlflowClient().set_model_version_tag(name, version.version, MANIFEST_TAG, forged)
    capsys.readouterr()
    args[1] = str(tmp_path / "restart" / "model")
    assert fetch_model.main(args) == 1
    assert f"the deploy pinned {pinned}" in capsys.readouterr().err and not Path(args[1]).exists()
    # read without the pin, the tag as it is now would have let the swapped weights through
    assert fetch_model.main(args[:2]) == 0


def test_the_deployer_marks_a_tampered_version_failed_and_keeps_the_previous_one(
    mlflow_server, tiny_base, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    from serving.deployer import Deployer
    from serving.local_backend import LocalBackend
    from tests.conftest import free_port

    monkeypatch.setenv("LLMOPS_SERVING_DIR", str(tmp_path / "serving"))
    name = f"verified-{uuid.uuid4().hex[:6]}"
    good = register_served(name, tiny_base, {"gate.verdict": "passed"})
    bad = register_served(name, tiny_base, {"gate.verdict": "passed"})
    flip_a_byte(logged_model_files(mlflow_server.root, bad) / "model.safetensors")
    client = MlflowClient()
    backend = LocalBackend(base_port=free_port(), log_dir=tmp_path / "logs", startup_s=120)
    deployer = Deployer(backend, interval_s=60.0, models=[name])
    try:
        client.set_registered_model_alias(name, "champion", good.version)
        deployer.reconcile_once()
        assert backend.actual(name)["version"] == good.version
        client.set_registered_model_alias(name, "champion", bad.version)
        assert f"failed {name}/{bad.version}" in deployer.reconcile_once()
        tags = client.get_model_version(name, bad.version).tags
        assert tags["deploy.status"] == "failed" and "model.safetensors differs" in tags["deploy.reason"]
        assert backend.actual(name)["version"] == good.version  # the previous version keeps serving
    finally:
        backend.close()
        client.delete_registered_model(name)  # its aliases and versions with it
