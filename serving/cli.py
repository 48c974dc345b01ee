"""Serving's commands: serve a model, chat with an endpoint, promote a version, run the deployer."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from components.environment import IN_CLUSTER
from serving.engines import ENGINES
from serving.schemas import MAX_CLIENT_BATCH_SIZE

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Serve registered models.")

Profile = Annotated[str, typer.Option("--profile", "-p", help="deployer profile name (serving/configs) or YAML path")]
Overrides = Annotated[
    Optional[list[str]], typer.Argument(help="deploy.key=value overrides, e.g. deploy.accelerator_count=0")
]


def _deploy_settings(profile: str, overrides: list[str] | None):
    from serving.settings import load_deployer_config

    try:
        return load_deployer_config(profile, list(overrides or [])).deploy
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="model directory, models:/name/version or models:/name@alias")],
    host: str = "127.0.0.1",
    port: int = 8080,
    adapter: Annotated[
        Optional[list[str]], typer.Option(help="ID=REF, a LoRA adapter trained on MODEL (repeatable)")
    ] = None,
    max_input_tokens: Optional[int] = None,
    max_total_tokens: Optional[int] = None,
    max_concurrent_requests: int = 128,
    max_client_batch_size: Annotated[
        int, typer.Option(help="prompts one request may carry (TGI's flag)")
    ] = MAX_CLIENT_BATCH_SIZE,
    max_batch_size: Annotated[int, typer.Option(help="rows decoded together; new requests join between steps")] = 16,
    dtype: Annotated[
        str, typer.Option(help="auto: bfloat16 checkpoints in bfloat16 where the CPU has native bfloat16, else float32")
    ] = "auto",
    threads: Annotated[int, typer.Option(help="torch intra-op threads of the decode loop")] = 1,
    payload_limit: Annotated[
        int, typer.Option(help="largest request body in bytes (TGI's --payload-limit)")
    ] = 2_000_000,
    engine: Annotated[
        str, typer.Option(help="tgi: our TGI-protocol server; vllm: real vLLM (installed by `make vllm`)")
    ] = "tgi",
    vllm_python: Annotated[str, typer.Option(help="vLLM's Python; empty: .venv-vllm/bin/python")] = "",
    kv_cache_gb: Annotated[int, typer.Option(help="vLLM on CPU: GB of KV cache")] = 1,
    vllm_arg: Annotated[
        Optional[list[str]], typer.Option(help="a vetted vLLM flag, as --vllm-arg=--flag=value")
    ] = None,
):
    """Serve a model: over TGI's HTTP protocol (the local stand-in for TGI on Kubernetes), or with real vLLM.

    Run as: llmops serve models:/llmops-demo@champion [--engine vllm]"""
    from components.weights_manifest import VerificationError
    from serving.client import write_local_record
    from serving.model_refs import local_model, parse_adapters
    from serving.server import serve as run_server
    from serving.settings import ServerSettings

    if engine not in ENGINES:
        raise typer.BadParameter(f"--engine {engine!r}: tgi or vllm")
    try:
        resolved = local_model(model)
        adapters = parse_adapters(adapter or []) or None
    except VerificationError as err:  # nothing serves files that differ from what was registered
        typer.secho(f"llmops serve: refused {model}: {err}", fg="red", err=True)
        raise typer.Exit(3) from None
    url = f"http://{host}:{port}"
    if resolved.name and model.startswith("models:/") and "@" in model:
        write_local_record(resolved.name, model.rsplit("@", 1)[1], url, resolved.version, engine)
    typer.echo(f"serving {resolved.model_id} from {resolved.path} on {url} ({engine})")
    if engine == "vllm":
        _exec_vllm(resolved, host, port, max_total_tokens, adapters, vllm_python, kv_cache_gb, threads, vllm_arg)
    settings = ServerSettings(
        model_dir=str(resolved.path),
        model_id=resolved.model_id,
        model_sha=resolved.model_sha,
        adapters=adapters,
        max_input_tokens=max_input_tokens,
        max_total_tokens=max_total_tokens,
        max_concurrent_requests=max_concurrent_requests,
        max_client_batch_size=max_client_batch_size,
        max_batch_size=max_batch_size,
        dtype=dtype,
        threads=threads,
        max_body_bytes=payload_limit,
    )
    run_server(settings, host=host, port=port)


def _exec_vllm(resolved, host, port, max_total_tokens, adapters, python, kv_cache_gb, threads, extra) -> None:
    """Replace this process with vLLM serving the verified directory: the deployer's (or the user's) signals then
    reach vLLM itself, and nothing of ours stays in memory beside it."""
    import os

    from serving.engines import EngineRefusal
    from serving.vllm_local import command, environment, missing, python_path

    python = python_path(python)
    if reason := missing(python):
        typer.secho(f"llmops serve: {reason}", fg="red", err=True)
        raise typer.Exit(4)
    name = resolved.name or resolved.path.name
    try:
        argv = command(
            python,
            model_dir=str(resolved.path),
            host=host,
            port=port,
            name=name,
            version=resolved.version or "local",
            max_total_tokens=max_total_tokens or 2048,
            adapters=adapters,
            extra=extra,
        )
    except EngineRefusal as err:
        raise typer.BadParameter(str(err)) from err
    os.execve(argv[0], argv, environment(kv_cache_gb, threads))


@app.command()
def chat(
    question: str,
    model: Annotated[str, typer.Option(help="name@alias of a registered model")] = "llmops-demo@champion",
    max_new_tokens: int = 256,
    system: Optional[str] = None,
):
    """Ask the endpoint serving MODEL a question and stream the answer to the terminal."""
    from serving.client import chat_model

    messages = ([("system", system)] if system else []) + [("human", question)]
    for chunk in chat_model(model, max_new_tokens=max_new_tokens, streaming=True).stream(messages):
        typer.echo(chunk.content, nl=False)
    typer.echo()


@app.command()
def promote(
    name: str,
    version: str,
    alias: Annotated[str, typer.Option(help="the alias that deploys")] = "champion",
    reason: Annotated[str, typer.Option(help="why it should serve: kept on the production version")] = "",
    override: Annotated[
        str, typer.Option(help="promote a candidate whose gate did not pass, for this reason (kept as gate.override)")
    ] = "",
    wait: Annotated[
        bool, typer.Option(help="wait for the deployer's outcome, as `kubectl rollout status` does")
    ] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the outcome")] = 900.0,
):
    """Promote VERSION of NAME: point ALIAS (default champion) at it, then wait until the deployer serves it
    (printing the endpoint) or says why not. A candidate (NAME ending in -candidates, where the pipeline
    registers) is first copied into its production model, with your login and --reason recorded on the copy.
    Rolling back is promoting an earlier production version.

    Run as: llmops promote llmops-demo-candidates 1 --reason "beats the base on held-out tickets"
    """
    from mlflow import MlflowClient

    from components.registry_tags import production_of
    from serving.promotion import (
        PromotionRefused,
        await_outcome,
        clear_outcome,
        copy_candidate,
        record_promotion,
        who_promotes,
    )

    client = MlflowClient()
    client.get_model_version(name, version)  # a clear error for a version that does not exist
    who = who_promotes()
    try:
        if production_of(name):
            name, version = copy_candidate(client, name, version, who, reason or override, override)
            typer.echo(f"copied to {name} version {version} (promoted by {who})")
        else:
            record_promotion(client, name, version, who, reason or override)
    except PromotionRefused as err:
        typer.secho(str(err), fg="red", err=True)
        raise typer.Exit(2) from None
    clear_outcome(client, name, version, alias)  # an earlier outcome must not pass for this promotion's
    client.set_registered_model_alias(name, alias, version)
    typer.echo(f"{name}@{alias} -> version {version}")
    if not wait:
        return
    typer.echo("waiting for the deployer (--no-wait returns at once)...")
    outcome = await_outcome(client, name, version, timeout)
    typer.secho(outcome.message, fg="green" if outcome.ok else "red", err=not outcome.ok)
    if not outcome.ok:
        raise typer.Exit(1)


@app.command()
def deployer(
    mode: Annotated[str, typer.Option(help="kubernetes, local, or auto (kubernetes inside a cluster)")] = "auto",
    host: str = "127.0.0.1",
    port: int = 8700,
    public_url: Annotated[Optional[str], typer.Option(help="URL MLflow posts webhooks to")] = None,
    interval: Annotated[float, typer.Option(help="seconds between reconcile passes")] = 30.0,
    overrides: Overrides = None,
    profile: Profile = "local",
):
    """Run the deployer: MLflow webhook receiver plus reconcile loop (alias -> TGI Deployment or local server)."""
    import logging

    import uvicorn
    from mlflow.exceptions import MlflowException

    from serving.backends import KubeBackend
    from serving.deployer import Deployer
    from serving.deployer_app import create_app, register_webhook
    from serving.local_backend import LocalBackend
    from serving.webhooks import Verifier, load_secret

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = _deploy_settings(profile, overrides)
    if mode == "auto":
        mode = "kubernetes" if IN_CLUSTER.is_set() else "local"
    if mode == "kubernetes" and not cfg.models:
        raise typer.BadParameter(
            "deploy.models is empty: in a cluster the deployer serves only the registered models listed there "
            "(set them in the profile, or deploy.models=[name,...])"
        )
    backend = KubeBackend(cfg) if mode == "kubernetes" else LocalBackend(cfg)
    secret = load_secret()
    try:
        register_webhook(public_url or f"http://{host}:{port}", secret)
    except MlflowException as err:  # with a login, only MLflow's admin may manage webhooks
        logging.getLogger("llmops.deployer").warning(
            "webhook not registered (%s): the admin runs `llmops webhook %s` once; until then the reconcile loop "
            "deploys every %.0fs",
            err.error_code,
            public_url or f"http://{host}:{port}",
            interval,
        )
    app = create_app(Deployer(backend, alias=cfg.alias, interval_s=interval, models=cfg.models), Verifier(secret))
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")  # its shutdown closes the backend
    finally:
        backend.close()  # when uvicorn never started (the port taken); a second close stops nothing more


@app.command()
def webhook(
    url: Annotated[
        str, typer.Argument(help="the deployer's base URL, e.g. http://llmops-deployer.llmops.svc.cluster.local:8700")
    ],
):
    """Register (or refresh) the deployer's MLflow webhook, signed with LLMOPS_WEBHOOK_SECRET.

    MLflow's admin runs it once."""
    from serving.deployer_app import register_webhook
    from serving.webhooks import load_secret

    hook = register_webhook(url, load_secret())
    typer.echo(f"webhook {hook.name} -> {hook.url} ({', '.join(str(e) for e in hook.events)})")


if __name__ == "__main__":
    app()
