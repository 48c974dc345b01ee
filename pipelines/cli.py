"""The pipeline's commands: run it locally, compile it for Kubeflow, show its config, write demo data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune and register Llama-family models.")

Profile = Annotated[str, typer.Option("--profile", "-p", help="pipeline profile name (pipelines/configs) or YAML path")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. train.max_steps=10")]


def _config(profile: str, overrides: list[str] | None, data: str | None = None):
    from pipelines.config import load_config

    extra = list(overrides or [])
    if data:
        extra.append(f"data.path={data}")
    try:
        return load_config(profile, extra)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err


@app.command()
def run(
    overrides: Overrides = None,
    profile: Profile = "local",
    data: Annotated[Optional[str], typer.Option(help="data file or directory (default: generated demo data)")] = None,
    root: Annotated[Path, typer.Option(help="where runs, caches and the local MLflow store live")] = Path(".llmops"),
    verbose: Annotated[bool, typer.Option(help="also show kfp's executor input JSON and task output listings")] = False,
):
    """Run the finetune pipeline locally (kfp.local, cached), ending in a registered model version."""
    from pipelines.run import PipelineFailed, print_summary, run_local

    try:
        print_summary(run_local(_config(profile, overrides, data), root, verbose))
    except PipelineFailed as err:
        typer.secho(f"llmops run: {err}", fg="red", err=True)
        raise typer.Exit(1) from None


@app.command("stage")
def stage(
    name: Annotated[str, typer.Argument(help="base-model, prepare-data, train, evaluate, merge or quantize")],
    overrides: Overrides = None,
    run_dir: Annotated[
        Optional[Path], typer.Option("--from", help="a local run: <root>/kfp/finetune-<time> (default: the newest)")
    ] = None,
    root: Annotated[Path, typer.Option(help="where `llmops run` keeps its runs")] = Path(".llmops"),
):
    """Run one model stage again, alone, on the artifacts a local run left (its section from that run, with
    `section.field=value` overrides); the output goes to <root>/stages/<stage>-<time>."""
    from pipelines.stage_rerun import rerun

    if run_dir is None:
        runs = sorted((root / "kfp").glob("finetune-*"))
        if not runs:
            raise typer.BadParameter(f"no local run under {root / 'kfp'}: `llmops run` first, or give --from")
        run_dir = runs[-1]
    try:
        out, result = rerun(name, run_dir, root / "stages", overrides)
    except (ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err)) from err
    figures = {key: value for key, value in result.items() if isinstance(value, (int, float, str))}
    typer.echo(f"{name} from {run_dir}: wrote {out}\n{json.dumps(figures, indent=1, default=str)}")


@app.command("compile")
def compile_(
    out: Annotated[Path, typer.Option("--out", "-o")] = Path("finetune.yaml"),
    overrides: Overrides = None,
    profile: Profile = "cluster",
):
    """Write the pipeline YAML for upload in the Kubeflow UI."""
    from pipelines.finetune import compile_pipeline

    compile_pipeline(_config(profile, overrides), str(out))
    typer.echo(f"wrote {out}")


@app.command("config")
def show_config(
    overrides: Overrides = None,
    profile: Profile = "local",
    schema: Annotated[bool, typer.Option("--schema", help="list every setting: type, default, meaning")] = False,
    env: Annotated[
        bool, typer.Option("--env", help="list every environment variable llmops reads, and its value")
    ] = False,
):
    """Print the validated config (profile plus overrides) as YAML, with --schema what each setting means, or with
    --env each environment variable llmops reads (components/environment.py), its current value and meaning."""
    if env:
        from rich.table import Table

        from components.environment import table as variables
        from components.util import console

        listing = Table("variable", "value", "meaning", show_lines=False)
        for row in variables():
            listing.add_row(*row)
        console.print(listing)
        return
    if schema:
        from rich.table import Table

        from components.profiles import describe
        from components.util import console
        from pipelines.config import PipelineConfig

        table = Table("setting", "type", "default", "meaning", show_lines=False)
        for row in describe(PipelineConfig):
            table.add_row(*row)
        console.print(table)
        return
    import yaml

    typer.echo(yaml.safe_dump(_config(profile, overrides).model_dump(), sort_keys=False))


@app.command("demo-data")
def demo_data(out: Annotated[Path, typer.Option("--out", "-o")] = Path("data/demo"), rows: int = 360, seed: int = 7):
    """Write the deterministic demo data set (support-ticket intents)."""
    from components.demo_data import write_demo

    typer.echo(f"wrote {write_demo(out, rows, seed)}")


@app.command("plan")
def plan_memory(
    overrides: Overrides = None,
    profile: Profile = "cluster",
    model: Annotated[
        Optional[str], typer.Option(help="a Hugging Face id or a config.json (default: the profile's base model)")
    ] = None,
    gpu: Annotated[
        str, typer.Option(help="GPU type (A10G, L4, A100-40GB, A100-80GB, H100, ...) or GB, after a count: 2xRTX4090")
    ] = "A10G",
    host_gb: Annotated[float, typer.Option(help="host memory of the merge's node, GB")] = 32.0,
    answer_tokens: Annotated[int, typer.Option(help="longest answer: the positions training takes logits at")] = 256,
):
    """Each GPU stage's peak memory for a model and a GPU, computed from config.json alone (no weights)."""
    from pipelines.plan import plan, print_plan

    cfg = _config(profile, overrides)
    source = model or cfg.model.base_model
    try:
        verdicts = plan(cfg, source, gpu, host_gb, answer_tokens)
    except (OSError, ValueError) as err:
        raise typer.BadParameter(str(err)) from err
    print_plan(verdicts, f"{source} on {gpu}, profile {profile}")
    if not all(v.fits for v in verdicts):
        raise typer.Exit(1)


@app.command("mlflow-stop")
def mlflow_stop(root: Annotated[Path, typer.Option()] = Path(".llmops")):
    """Stop the local MLflow server that `llmops run` started."""
    from pipelines.mlflow_local import LocalServer

    LocalServer("", (root / "mlflow").resolve()).stop()
    typer.echo("stopped")


if __name__ == "__main__":
    app()
