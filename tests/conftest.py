"""Shared fixtures: a tiny Llama with a small local tokenizer, demo data, and an MLflow server."""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

# MLflow's client phones home for a telemetry config; with no network that only adds failed requests
# (and retries that the hardening tests count), so the tests turn it off, as an offline user would.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A label task for constrained decoding (serving/grammar.py): its labels, TGI's regex grammar over them, a schema.
GRAMMAR_LABELS = ("refund", "card_lost", "balance")
LABEL_GRAMMAR = {"type": "regex", "value": "(refund|card_lost|balance)"}
INTENT_SCHEMA = {
    "type": "object",
    "properties": {
        "intent": {"enum": list(GRAMMAR_LABELS)},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "urgent": {"type": "boolean"},
    },
    "required": ["intent", "score", "urgent"],
    "additionalProperties": False,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Live:
    """A uvicorn server for `app` in a background thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        port = free_port()
        self.app, self.url = app, f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Live:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.app.state.runtime.engine

    def post(self, path: str, body: dict, **kw) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=60, **kw)

    def text(self, prompt: str, **params) -> str:
        response = self.post("/generate", {"inputs": prompt, "parameters": {"max_new_tokens": 12, **params}})
        assert response.status_code == 200, response.text
        return response.json()["generated_text"]


def wait_for(condition, timeout: float = 120.0, what: str = "the condition", poll: float = 0.05):
    """The condition's first truthy value, polled until a deadline; fails naming what it waited for."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: wait() is a bounded pause between polls
    while time.monotonic() < deadline:
        if value := condition():
            return value
        pause.wait(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def train_metrics(**figures) -> dict:
    """A well-formed train_metrics.json (components.reports.Train) for tests that fake a stage's outputs."""
    from components.reports import Train

    settled = dict(steps=4, resumed_from_step=0, train_loss=0.5, first_loss=2.0, last_loss=0.5, seconds=1.0)
    settled |= dict(non_padding_tokens=100, tokens_per_s=100.0, trainable_parameters=10, examples=8)
    settled |= dict(compute_dtype="float32", gradient_checkpointing=False, stage_seconds=1.0)
    return Train(**settled | figures).model_dump()


def eval_report(base: dict, tuned: dict, base_form: str = "16bit") -> dict:
    """A well-formed eval_report.json (components.reports.Eval) from a few figures of each model."""
    from components.reports import Eval

    filled = [{"n": 2, "loss": 1.0, "perplexity": 2.7, "exact_match": 0.0} | scores for scores in (base, tuned)]
    delta = {k: filled[1][k] - filled[0][k] for k in ("exact_match", "loss", "perplexity")}
    report = Eval(base=filled[0], tuned=filled[1], labels=None, delta=delta, base_form=base_form)
    return report.model_dump(exclude_none=True)


def build_tiny_llama(out: Path, seed: int = 0, initializer_range: float = 0.02, chat_template=CHATML) -> Path:
    """A 2-layer Llama and a byte-level BPE tokenizer trained on the demo data, saved as an HF directory.

    Its pad token equals EOS, as SmolLM2's does, so the base-model stage has to fix it.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from components.demo_data import INTENTS, generate_rows

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    corpus = [r["text"] for r in generate_rows(360, 1)] + list(INTENTS) + ["system user assistant Classify the message"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token=None, unk_token=None
    )
    tok.chat_template = chat_template  # None: a base model that ships no template
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out, save_jinja_files=False)
    return out


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-src"))


@pytest.fixture(scope="session")
def llmops_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as env:  # for the session, undone at its end
        env.setenv("LLMOPS_CACHE", str(path))
        env.setenv("LLMOPS_CHECKPOINT_ROOT", str(path / "checkpoints"))
        yield path


@pytest.fixture(scope="session")
def tiny_base(tiny_source, llmops_cache, tmp_path_factory) -> Path:
    """The tiny model after the base-model stage: 16-bit safetensors with a distinct pad token."""
    from components.config import ModelSection
    from components.stages import base_model

    out = tmp_path_factory.mktemp("tiny-base") / "model"
    base_model.run(ModelSection(base_model=str(tiny_source)), out)
    return out


@pytest.fixture(scope="session")
def demo_prepared(tiny_base, tmp_path_factory) -> Path:
    from components.config import DataSection
    from components.stages import prepare_data

    out = tmp_path_factory.mktemp("demo-data")
    prepare_data.run(DataSection(), tiny_base, out)
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, demo_prepared, tmp_path_factory) -> Path:
    """An adapter trained for a few steps with a high learning rate, so its effect is visible."""
    from components.config import TrainSection
    from components.stages import train

    out = tmp_path_factory.mktemp("tiny-adapter")
    train.run(
        TrainSection(
            max_steps=12,
            batch_size=8,
            learning_rate=5e-3,
            checkpoint_every=6,
            log_every=2,
            lora_r=8,
            lora_alpha=16,
            warmup_ratio=0.0,
        ),
        tiny_base,
        demo_prepared,
        out,
    )
    return out


# --- a tiny model that learns the demo's text -> label mapping (label tasks, unit and integration) ---
LABEL_TARGET = 0.9


def learner(checkpoint_root, **kw):
    """16-bit LoRA: NF4 rounding of a 64-wide random model leaves it too little signal to learn the mapping."""
    settings = dict(
        batch_size=8,
        learning_rate=3e-3,
        lora_r=32,
        lora_alpha=64,
        lora_dropout=0.0,
        method="lora",
        quantization="none",
        compute_dtype="float32",
        checkpoint_every=1000,
        checkpoint_root=str(checkpoint_root),
    )
    from components.config import TrainSection

    return TrainSection(**{**settings, **kw})


@pytest.fixture(scope="session")
def mapping_base(llmops_cache, tmp_path_factory):
    """A tiny Llama initialised with larger weights: with the default 0.02 its tied output embedding
    cannot make any logit stand out, so no adapter could make it answer confidently."""
    from components.config import ModelSection
    from components.stages import base_model

    source = build_tiny_llama(tmp_path_factory.mktemp("mapping-src"), initializer_range=0.2)
    out = tmp_path_factory.mktemp("mapping-base") / "model"
    base_model.run(ModelSection(base_model=str(source)), out)
    return out


@pytest.fixture(scope="session")
def with_validation(mapping_base, tmp_path_factory):
    """The demo intents (a known text → label mapping) with 40 rows held out of train for validation."""
    from components.config import DataSection
    from components.stages import prepare_data

    out = tmp_path_factory.mktemp("demo-val")
    prepare_data.run(DataSection(val_examples=40), mapping_base, out)
    return out


@pytest.fixture(scope="session")
def early_stopped(mapping_base, with_validation, tmp_path_factory):
    """Trained on the mapping until validation reaches LABEL_TARGET: a model that answers with labels."""
    from components.stages import train

    out = tmp_path_factory.mktemp("early")
    cfg = learner(out / "ck", max_steps=600, eval_every=25, target_accuracy=LABEL_TARGET)
    return cfg, train.run(cfg, mapping_base, with_validation, out / "adapter"), out


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real mlflow server on loopback with a SQLite store; stopped at the end of the session."""
    from pipelines import mlflow_local

    server = mlflow_local.start(tmp_path_factory.mktemp("mlflow"), port=free_port(), detach=False)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("MLFLOW_TRACKING_URI", server.url)
            yield server
    finally:
        server.stop()


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing: the shared data sets sit beside the checkout only in CI and dev machines")
    return path


ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "MLFLOW_S3_ENDPOINT_URL",
)


@contextmanager
def moto_s3(scratch: Path):
    """A moto S3 server on loopback with throwaway credentials in the environment; all undone on exit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: the OS picks a free one
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # Point config/credential files at nothing so a developer's ~/.aws cannot leak in.
    nowhere = str(Path(scratch) / "aws-missing")
    settings = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
        "AWS_CONFIG_FILE": nowhere,
        "AWS_SHARED_CREDENTIALS_FILE": nowhere,
    }
    try:
        with pytest.MonkeyPatch.context() as env:
            for name in ENV:
                env.setenv(name, settings[name]) if name in settings else env.delenv(name, raising=False)
            yield url
    finally:
        try:
            requests.post(f"{url}/moto-api/reset", timeout=30)  # the backends live in this process: free the objects
        finally:
            server.stop()


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("aws")) as url:
        yield url


def register_served(name: str, model_dir: Path, tags: dict | None = None, experiment: str = "served-tests"):
    """Register model_dir as the register stage does: a pyfunc LoggedModel with its weights manifest and tag."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from components.logged_model import log_chat_model
    from components.registry_tags import MANIFEST_TAG

    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        info, manifest_sha = log_chat_model(Path(model_dir), {})
        mlflow.log_param(MANIFEST_TAG, manifest_sha)  # as register records it, where it cannot change
    return client.create_model_version(
        name,
        f"models:/{info.model_id}",
        run.info.run_id,
        model_id=info.model_id,
        tags={MANIFEST_TAG: manifest_sha, **(tags or {})},
    )


def logged_model_files(server_root: Path, version) -> Path:
    """Where the artifact store keeps a version's served directory (to tamper with it, as an attacker would)."""
    model_id = version.source.removeprefix("models:/")
    return next(Path(server_root).glob(f"artifacts/*/models/{model_id}/artifacts/artifacts/model"))


def decoded_together(server: Live, monkeypatch, requests_: list, answer) -> tuple[list, list[int]]:
    """`answer(*request)` for every request at once, decoded as one batch: the scheduler's first prefill waits
    until every request has been submitted. Returns (the answers in request order, the batch sizes decoded)."""
    from concurrent.futures import ThreadPoolExecutor

    scheduler, prefill, decode = server.app.state.runtime.scheduler, server.engine.prefill, server.engine.decode
    submit, submitted, sizes = scheduler.submit, [], []

    def counted(*jobs):  # on the event loop: this test's own jobs, whatever else the module's server holds
        submitted.extend(jobs)
        return submit(*jobs)

    def gathered(job):  # in the scheduler's thread: the first prefill waits until every request has been submitted
        if not sizes:
            sizes.append(0)
            wait_for(lambda: len(submitted) == len(requests_), timeout=60, what="every request to be submitted")
        return prefill(job)

    def recording(batch):
        sizes.append(len(batch))
        return decode(batch)

    monkeypatch.setattr(scheduler, "submit", counted)
    monkeypatch.setattr(server.engine, "prefill", gathered)
    monkeypatch.setattr(server.engine, "decode", recording)
    with ThreadPoolExecutor(len(requests_)) as pool:
        return list(pool.map(lambda request: answer(*request), requests_)), sizes


def server_app(model_dir, **settings):
    """Our TGI-protocol server's app on `model_dir`, with ServerSettings fields as keywords."""
    from serving.server import create_app
    from serving.settings import ServerSettings

    return create_app(ServerSettings(model_dir=str(model_dir), **settings))
