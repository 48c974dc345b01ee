"""The `llmops` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune, register and serve Llama-family models.")

Profile = Annotated[str, typer.Option("--profile", "-p", help="config profile name (pipelines/configs) or YAML path")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. train.max_steps=10")]


def _config(profile: str, overrides: list[str] | None, data: str | None = None):
    from components.config import load_config

    extra = list(overrides or [])
    if data:
        extra.append(f"data.path={data}")
    try:
        return load_config(profile, extra)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err


@app.command()
def run(overrides: Overrides = None, profile: Profile = "local",
        data: Annotated[Optional[str], typer.Option(help="data file or directory (default: generated demo data)")] = None,
        root: Annotated[Path, typer.Option(help="where runs, caches and the local MLflow store live")] = Path(".llmops")):
    """Run the finetune pipeline locally (kfp.local, cached), ending in a registered model version."""
    from pipelines.run import print_summary, run_local

    print_summary(run_local(_config(profile, overrides, data), root))


@app.command("compile")
def compile_(out: Annotated[Path, typer.Option("--out", "-o")] = Path("finetune.yaml"),
             overrides: Overrides = None, profile: Profile = "cluster"):
    """Write the pipeline YAML for upload in the Kubeflow UI."""
    from pipelines.finetune import compile_pipeline

    compile_pipeline(_config(profile, overrides), str(out))
    typer.echo(f"wrote {out}")


@app.command("config")
def show_config(overrides: Overrides = None, profile: Profile = "local"):
    """Print the validated config (profile plus overrides) as YAML."""
    import yaml

    typer.echo(yaml.safe_dump(_config(profile, overrides).model_dump(), sort_keys=False))


@app.command("demo-data")
def demo_data(out: Annotated[Path, typer.Option("--out", "-o")] = Path("data/demo"),
              rows: int = 360, seed: int = 7):
    """Write the deterministic demo data set (support-ticket intents)."""
    from components.demo_data import write_demo

    typer.echo(f"wrote {write_demo(out, rows, seed)}")


@app.command("mlflow-stop")
def mlflow_stop(root: Annotated[Path, typer.Option()] = Path(".llmops")):
    """Stop the local MLflow server that `llmops run` started."""
    from pipelines.mlflow_local import LocalServer

    LocalServer("", (root / "mlflow").resolve()).stop()
    typer.echo("stopped")


def main():
    app()


if __name__ == "__main__":
    main()
