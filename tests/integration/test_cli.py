"""The `llmops` commands a user types, through typer's runner (in process, against loopback servers)."""

import pytest
from typer.testing import CliRunner

from llmops.cli import app

pytestmark = pytest.mark.integration
runner = CliRunner()


def test_chat_streams_the_answer_from_the_endpoint(tiny_base, monkeypatch):
    from tests.conftest import Live, server_app

    with Live(server_app(str(tiny_base), max_total_tokens=256)) as live:
        monkeypatch.setenv("LLMOPS_ENDPOINT_URL", live.url)
        expected = live.post(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "I lost my card"}], "max_tokens": 6, "temperature": 0},
        ).json()
        result = runner.invoke(app, ["chat", "I lost my card", "--model", "any@champion", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert expected["usage"]["completion_tokens"] == 6
    assert result.output == expected["choices"][0]["message"]["content"] + "\n"  # greedy, streamed token by token


def test_promote_moves_the_alias_and_refuses_unknown_versions(mlflow_server, tiny_base):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    client.create_registered_model("cli-promote")
    try:
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(tiny_base / "config.json"), "model")
        for _ in range(2):
            client.create_model_version("cli-promote", f"{run.info.artifact_uri}/model", run.info.run_id)
        assert runner.invoke(app, ["promote", "cli-promote", "2", "--no-wait"]).exit_code == 0
        assert client.get_model_version_by_alias("cli-promote", "champion").version == "2"
        # a rollback moves the alias back; with no deployer running, the wait ends at its timeout and says why
        result = runner.invoke(app, ["promote", "cli-promote", "1", "--timeout", "1"])
        assert result.exit_code == 1 and "no deployer settled cli-promote/1 within 1s" in result.output
        assert client.get_model_version_by_alias("cli-promote", "champion").version == "1"
        result = runner.invoke(app, ["promote", "cli-promote", "9", "--no-wait"])
        assert result.exit_code != 0 and client.get_model_version_by_alias("cli-promote", "champion").version == "1"
    finally:
        client.delete_registered_model("cli-promote")  # the shared server keeps no model from this test


def test_a_candidate_is_copied_to_production_only_past_its_gate_or_with_a_recorded_override(mlflow_server, tiny_base):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    candidates, production = "cli-copy-candidates", "cli-copy"
    client.create_registered_model(candidates)
    try:
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(tiny_base / "config.json"), "model")
        failed = {"gate.verdict": "failed", "gate.reason": "gain over base -0.02", "gate.override": "pipeline says so"}
        passed = {"gate.verdict": "passed", "gate.override": "stale", "deploy.status": "refused", "deploy.reason": "no"}
        for tags in (failed, passed):
            client.create_model_version(candidates, f"{run.info.artifact_uri}/model", run.info.run_id, tags=tags)

        # the failed gate refuses the copy, whatever override tag the candidate itself carries
        refused = runner.invoke(app, ["promote", candidates, "1", "--reason", "looks fine", "--no-wait"])
        assert refused.exit_code == 2 and "gate.verdict is failed (gain over base -0.02)" in refused.output
        assert not client.search_model_versions(f"name='{production}'")
        # a passed candidate needs a reason too
        unsaid = runner.invoke(app, ["promote", candidates, "2", "--no-wait"])
        assert unsaid.exit_code == 2 and "--reason" in unsaid.output

        ok = runner.invoke(app, ["promote", candidates, "2", "--reason", "beats the base", "--no-wait"])
        assert ok.exit_code == 0, ok.output
        copy = client.get_model_version_by_alias(production, "champion")
        assert copy.source == f"models:/{candidates}/2" and copy.run_id == run.info.run_id
        assert copy.tags["promotion.from"] == f"{candidates}/2" and copy.tags["promotion.reason"] == "beats the base"
        assert copy.tags["promotion.by"].endswith("(no MLflow login)")  # this server has no logins
        # the candidate's deploy record and override are not this promotion's
        assert not {"deploy.status", "deploy.reason", "gate.override"} & set(copy.tags)
        assert client.get_registered_model(candidates).aliases == {}  # the candidates model is left as it was

        # promoting the same candidate again reuses its copy
        again = runner.invoke(app, ["promote", candidates, "2", "--reason", "again", "--no-wait"])
        assert again.exit_code == 0 and len(client.search_model_versions(f"name='{production}'")) == 1

        # an override is recorded, as the person's reason, on the production version
        forced = runner.invoke(app, ["promote", candidates, "1", "--override", "hotfix for ticket 12", "--no-wait"])
        assert forced.exit_code == 0, forced.output
        second = client.get_model_version_by_alias(production, "champion")
        assert second.version == "2" and second.tags["gate.override"] == "hotfix for ticket 12"
        assert second.tags["promotion.reason"] == "hotfix for ticket 12"
    finally:
        for name in (candidates, production):
            if client.search_registered_models(f"name = '{name}'"):
                client.delete_registered_model(name)


def test_config_and_bad_overrides(tmp_path):
    ok = runner.invoke(app, ["config", "train.max_steps=3"])
    assert ok.exit_code == 0 and "max_steps: 3" in ok.output
    bad = runner.invoke(app, ["config", "train.max_stepz=3"])
    assert bad.exit_code != 0 and "max_stepz" in bad.output


def test_serve_adapter_specs_are_checked(tiny_base, tmp_path):
    from serving.model_refs import local_model, parse_adapters

    with pytest.raises(ValueError, match="ID=PATH"):
        parse_adapters(["no-equals-sign"])
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        local_model(str(tmp_path))
    assert local_model(str(tiny_base)).path == tiny_base.resolve()
