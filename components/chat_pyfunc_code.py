"""The file MLflow copies into the registered model and runs to load it (models-from-code): no pickle.

`mlflow.pyfunc.load_model` executes this file and takes the object passed to `set_model`. It stays
thin on purpose: the class comes from the llmops package, which every component image and the local
venv carry, and the copy inside the model is one of the files its manifest covers, so a changed copy
is refused before anything runs it (`chat_pyfunc.load_verified`, `serving/verified_model.py`).
"""

import mlflow

from components.chat_pyfunc import ChatPyfunc

mlflow.models.set_model(ChatPyfunc())
