"""Serving's commands: serve a model, chat with an endpoint, promote a version, run the deployer."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Serve registered models.")

Profile = Annotated[str, typer.Option("--profile", "-p", help="deployer profile name (serving/configs) or YAML path")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="deploy.key=value overrides, e.g. deploy.gpu_count=0")]


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
    max_batch_size: Annotated[int, typer.Option(help="rows decoded together; new requests join between steps")] = 16,
    dtype: Annotated[
        str, typer.Option(help="auto: bfloat16 checkpoints in bfloat16 where the CPU has native bfloat16, else float32")
    ] = "auto",
    threads: Annotated[int, typer.Option(help="torch intra-op threads of the decode loop")] = 1,
    payload_limit: Annotated[
        int, typer.Option(help="largest request body in bytes (TGI's --payload-limit)")
    ] = 2_000_000,
):
    """Serve a model over TGI's HTTP protocol (the local stand-in for TGI on Kubernetes)."""
    from components.weights_manifest import VerificationError
    from serving.client import write_local_record
    from serving.resolve import parse_adapters, resolve_model
    from serving.server import serve as run_server

    try:
        resolved = resolve_model(model)
    except VerificationError as err:  # nothing serves files that differ from what was registered
        typer.secho(f"llmops serve: refused {model}: {err}", fg="red", err=True)
        raise typer.Exit(3) from None
    if resolved.name and model.startswith("models:/") and "@" in model:
        write_local_record(resolved.name, model.rsplit("@", 1)[1], f"http://{host}:{port}", resolved.version)
    typer.echo(f"serving {resolved.model_id} from {resolved.path} on http://{host}:{port}")
    run_server(
        str(resolved.path),
        host=host,
        port=port,
        model_id=resolved.model_id,
        model_sha=resolved.model_sha,
        adapters=parse_adapters(adapter or []) or None,
        max_input_tokens=max_input_tokens,
        max_total_tokens=max_total_tokens,
        max_concurrent_requests=max_concurrent_requests,
        max_batch_size=max_batch_size,
        dtype=dtype,
        threads=threads,
        max_body_bytes=payload_limit,
    )


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
def promote(name: str, version: str, alias: Annotated[str, typer.Option(help="the alias that deploys")] = "champion"):
    """Point ALIAS (default champion) at VERSION of NAME; the deployer deploys it.

    Rolling back is promoting the old version."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.get_model_version(name, version)  # a clear error for a version that does not exist
    client.set_registered_model_alias(name, alias, version)
    typer.echo(f"{name}@{alias} -> version {version}")


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
    import os

    import uvicorn
    from mlflow.exceptions import MlflowException

    from serving.backends import KubeBackend, LocalBackend
    from serving.deployer import Deployer
    from serving.deployer_app import create_app, register_webhook
    from serving.webhooks import Verifier, load_secret

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = _deploy_settings(profile, overrides)
    if mode == "auto":
        mode = "kubernetes" if os.environ.get("KUBERNETES_SERVICE_HOST") else "local"
    backend = KubeBackend(cfg) if mode == "kubernetes" else LocalBackend()
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
