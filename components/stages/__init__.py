"""The pipeline's eight stages, one module each, in the order they run: base_model, prepare_data, train, evaluate,
merge, quantize, register, gate. Each opens with its "Run as:" line and has a `run` entry; a stage imports the
toolkit beside this folder (components/*.py), never another stage (tests/unit/test_layers.py)."""
