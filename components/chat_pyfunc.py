"""The registered model's MLflow flavor: a thin pyfunc around the merged Hugging Face directory.

Why not `mlflow.transformers`: with transformers 5.23 it cannot log from a directory, it pins
torchvision, its greedy predict raises, and it moves the tokenizer into `components/tokenizer/`
with a `.jinja` template that TGI does not read. This pyfunc keeps the merged directory whole, as
one artifact (`artifacts/model/`), so the same files serve TGI, `llmops serve` and
`mlflow.pyfunc.load_model`. Answers come from the project's one generation loop, greedy at
temperature 0, in float32 (as `llmops serve` decodes), so the pyfunc and the server agree.

Input: one chat per row, `{"messages": [{"role", "content"}, ...]}`; params `max_tokens`,
`temperature`. Output: the assistant's reply per row. The chat template applies the prompt
contract, so a bare user message gets the frame training used.
"""

from __future__ import annotations

from pathlib import Path

import mlflow

MODEL_KEY = "model"  # the merged directory, at artifacts/model/ inside the logged model
MANIFEST_KEY = "manifest"  # the sha256 of every served file, at artifacts/weights_manifest.json
DEFAULT_MAX_TOKENS = 64


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    return ModelSignature(
        inputs=Schema([ColSpec(Array(message), "messages")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [ParamSpec("max_tokens", "long", DEFAULT_MAX_TOKENS), ParamSpec("temperature", "double", 0.0)]
        ),
    )


INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "Hi, I lost my credit card yesterday"}]}


def artifact_paths(root: Path) -> tuple[Path, Path]:
    """(served directory, weights manifest) of a downloaded version, where its MLmodel puts them."""
    import yaml

    from components.weights_manifest import VerificationError

    mlmodel = Path(root) / "MLmodel"
    if not mlmodel.is_file():
        raise VerificationError(f"{root} has no MLmodel: the version is not an MLflow model logged by register")
    artifacts = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"].get("artifacts", {})
    try:
        return Path(root) / artifacts[MODEL_KEY]["path"], Path(root) / artifacts[MANIFEST_KEY]["path"]
    except KeyError as err:
        raise VerificationError(f"{mlmodel} names no {err.args[0]!r} artifact") from err


class ChatPyfunc(mlflow.pyfunc.PythonModel):
    """Loaded by reference from the llmops package, which every component image and the local venv carry."""

    def load_context(self, context):
        from components.inference import load_model, load_tokenizer

        self.model_dir = context.artifacts[MODEL_KEY]
        self.tok = load_tokenizer(self.model_dir)
        self.model = load_model(self.model_dir, "float32")

    def predict(self, context, model_input, params=None):
        from components.inference import generate

        params = params or {}
        max_tokens = int(params.get("max_tokens") or DEFAULT_MAX_TOKENS)
        if float(params.get("temperature") or 0.0) > 0:
            raise ValueError("this model answers greedily: pass temperature 0 (sampling belongs to the server)")
        prompts = [
            self.tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            for messages in _rows(model_input)
        ]
        return generate(self.model, self.tok, prompts, max_tokens, batch_size=8, progress="pyfunc")


def _rows(model_input) -> list[list[dict]]:
    """MLflow hands predict a DataFrame (one chat a row); a dict or a list of dicts works too."""
    if hasattr(model_input, "to_dict"):
        return [row["messages"] for row in model_input.to_dict(orient="records")]
    if isinstance(model_input, dict):
        return [model_input["messages"]]
    return [row["messages"] for row in model_input]
