"""The `deploy.*` tags of a model version: the deployer writes them (a person sets only `deploy.engine`),
`llmops promote` waits on them, and applications follow them to the endpoint."""

STATUS_TAG = "deploy.status"  # deploying, deployed, refused, failed, superseded, retired
REASON_TAG = "deploy.reason"  # why refused, failed or retired
ENDPOINT_TAG = "deploy.endpoint"  # where a deployed version answers
TIME_TAG = "deploy.time"
BACKEND_TAG = "deploy.backend"  # kubernetes or local
SERVED_ENGINE_TAG = "deploy.served_engine"  # the engine it serves on
ENGINE_TAG = "deploy.engine"  # set by a person: the engine this version asks for
GATE_OVERRIDE_KEPT_TAG = "deploy.gate_override"  # a person's gate.override, kept with the deploy it allowed
