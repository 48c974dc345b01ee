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

The model is logged from code (`chat_pyfunc_code.py`), so it holds no pickle, and its manifest covers
every file MLflow reads to load it. `load_verified("models:/name@alias")` checks them all before
`mlflow.pyfunc.load_model` sees the directory; a plain `load_model` still works but checks nothing.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import mlflow

from components.artifacts import MANIFEST_FILE
from components.registry_tags import MANIFEST_TAG
from components.weights_manifest import VerificationError, verify

MODEL_KEY = "model"  # the merged directory, at artifacts/model/ inside the logged model
CODE_FILE = Path(__file__).with_name("chat_pyfunc_code.py")  # the models-from-code file MLflow copies and runs
DEFAULT_MAX_TOKENS = 64
REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))$")


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
    """(served directory, manifest) of a downloaded version. Reads MLmodel: verify the directory first."""
    import yaml

    mlmodel = Path(root) / "MLmodel"
    if not mlmodel.is_file():
        raise VerificationError(f"{root} has no MLmodel: the version is not an MLflow model logged by register")
    artifacts = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"].get("artifacts", {})
    if MODEL_KEY not in artifacts:
        raise VerificationError(f"{mlmodel} names no {MODEL_KEY!r} artifact")
    return Path(root) / artifacts[MODEL_KEY]["path"], Path(root) / MANIFEST_FILE


def verify_version(root: Path, mv, pinned: str | None = None) -> tuple[Path, int]:
    """Check every file of version `mv`, downloaded into root; returns (served directory, bytes checked).

    The manifest at the model's root must hash to the version's tag, or to `pinned`, the digest the deployer
    read when it deployed the version (then the tag must still say the same: a tag changed after the deploy
    is refused, whatever the files). Every file under root must match the manifest (nothing missing, nothing
    added). Only then is MLmodel read. Raises VerificationError naming the file.
    """
    expected, root = mv.tags.get(MANIFEST_TAG), Path(root)
    if pinned and expected != pinned:
        raise VerificationError(
            f"version {mv.version} of {mv.name}: its {MANIFEST_TAG} tag is {expected or 'gone'}, but the deploy "
            f"pinned {pinned}: the tag changed after the deploy, so nothing is served until the version is "
            "deployed again"
        )
    if not expected:
        raise VerificationError(
            f"version {mv.version} of {mv.name} has no {MANIFEST_TAG} tag: it was not "
            "registered by the register stage, so its files cannot be checked"
        )
    if not (root / MANIFEST_FILE).is_file() and (root / "artifacts" / MANIFEST_FILE).is_file():
        raise VerificationError(
            f"version {mv.version} of {mv.name} was registered before its manifest covered MLmodel and the "
            "code MLflow runs (its model is a pickle): register it again"
        )
    checked = verify(root, root / MANIFEST_FILE, expected)
    return artifact_paths(root)[0], checked


def download_version(mv, root: Path) -> Path:
    """Download version `mv` into root: exactly the files the artifact store holds for it."""
    from mlflow.store.artifact.models_artifact_repo import REGISTERED_MODEL_META_FILE_NAME

    # The version number, not an alias: the files fetched are those of the version whose tag is checked.
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(root))
    # MLflow's client writes this one file itself into a registry download (the name and version, from the
    # registry, never from the store) and no loader reads it; removed, root holds the store's files only.
    (Path(root) / REGISTERED_MODEL_META_FILE_NAME).unlink(missing_ok=True)
    return Path(root)


def load_verified(model_uri: str, dst_path: str | Path | None = None):
    """`mlflow.pyfunc.load_model` for a registered version, with every file it reads checked first.

    The version (`models:/name/version` or `models:/name@alias`) is downloaded into an empty directory
    (dst_path, or a new temporary one), verified against the manifest its tag pins, and only then handed to
    MLflow, which runs the verified code file. Raises VerificationError naming the first file that differs.
    """
    from mlflow import MlflowClient

    match = REF.match(model_uri)
    if not match:
        raise ValueError(f"{model_uri}: expected models:/name/version or models:/name@alias")
    client = MlflowClient()
    if match["alias"]:
        mv = client.get_model_version_by_alias(match["name"], match["alias"])
    else:
        mv = client.get_model_version(match["name"], match["version"])
    root = Path(dst_path or tempfile.mkdtemp(prefix="llmops-pyfunc-"))
    if root.exists() and any(root.iterdir()):  # loading writes beside the files, so a download is never reused
        raise ValueError(f"{root} is not empty: load_verified downloads into an empty directory")
    verify_version(download_version(mv, root), mv)
    return mlflow.pyfunc.load_model(str(root))


class ChatPyfunc(mlflow.pyfunc.PythonModel):
    """Built by chat_pyfunc_code.py when MLflow loads the model, from the llmops package every image carries."""

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
