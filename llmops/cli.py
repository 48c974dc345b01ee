"""The `llmops` entry point. It sits above `pipelines` and `serving` and only composes their command groups."""

import typer

from pipelines.cli import app as pipeline_commands
from serving.cli import app as serving_commands

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune, register and serve Llama-family models.")
app.add_typer(pipeline_commands)  # run, stage, compile, config, plan, demo-data, mlflow-stop
app.add_typer(serving_commands)  # serve, chat, promote, deployer, webhook


def main():
    app()


if __name__ == "__main__":
    main()
