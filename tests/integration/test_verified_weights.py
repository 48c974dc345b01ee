"""What serves is what was registered: every served file is checked against the registered manifest.

The artifact store is tampered with as an attacker with write access to it would: a changed byte, a
deleted file, an added file. The TGI init container (fetch_model) and `llmops serve` refuse, naming the
file; the deployer marks the version failed with that reason and the previous version keeps serving.
"""

import shutil
import uuid

import pytest
from typer.testing import CliRunner

from llmops.cli import app
from serving import fetch_model
from tests.conftest import logged_model_files, register_served

pytestmark = pytest.mark.integration


@pytest.fixture
def registered(mlflow_server, tiny_base):
    name = f"verified-{uuid.uuid4().hex[:6]}"
    version = register_served(name, tiny_base, {"gate.verdict": "passed"})
    yield name, version, logged_model_files(mlflow_server.root, version)
    from mlflow import MlflowClient

    MlflowClient().delete_registered_model(name)  # the shared server keeps no model from this test


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


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


def test_a_changed_manifest_is_refused(registered, tmp_path, capsys):
    name, version, stored = registered
    manifest = stored.parent / "weights_manifest.json"
    flip_a_byte(stored / "config.json")
    shutil.copy(manifest, tmp_path / "kept.json")
    text = manifest.read_text()  # an attacker who rewrites the manifest to match cannot match the registry's tag
    manifest.write_text(text.replace('"size"', '"size" ', 1))
    assert fetch_model.main([f"models:/{name}/{version.version}", str(tmp_path / "model")]) == 1
    assert "weights_manifest.json has sha256" in capsys.readouterr().err


def test_the_deployer_marks_a_tampered_version_failed_and_keeps_the_previous_one(
    mlflow_server, tiny_base, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    from serving.backends import LocalBackend
    from serving.deployer import Deployer
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
