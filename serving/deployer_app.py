"""The deployer's HTTP side: MLflow's webhook receiver, health and status, and its start-up."""

from __future__ import annotations

import json
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving.body_limit import BodyLimit
from serving.deployer import Deployer
from serving.webhooks import Rejected, Verifier

log = logging.getLogger("llmops.deployer")
WEBHOOK_NAME = "llmops-deployer"
WEBHOOK_MAX_BYTES = 64 * 1024


def create_app(deployer: Deployer, verifier: Verifier) -> FastAPI:
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        loop = threading.Thread(target=deployer.run, args=(stop,), name="reconcile", daemon=True)
        loop.start()  # the first pass runs at once: whatever happened while we were down is healed here
        yield
        stop.set()
        deployer.notify()
        # Here, not after uvicorn.run returns: uvicorn re-raises SIGTERM once it has shut down, which ends the
        # process before any code after it runs, and the local servers it started would outlive it. Before the
        # join: a deploy still starting a server ends at once (ShuttingDown), not after its startup timeout.
        deployer.backend.close()
        loop.join(timeout=30)

    app = FastAPI(title="llmops deployer", lifespan=lifespan)
    # MLflow's deliveries are a few hundred bytes; a larger body is refused before it is read.
    app.add_middleware(BodyLimit, max_bytes=WEBHOOK_MAX_BYTES)

    @app.post("/webhook")
    async def webhook(request: Request):
        body = await request.body()
        try:
            delivery = verifier.verify(request.headers, body)
        except Rejected as err:
            log.warning("webhook rejected: %s", err.reason)
            return JSONResponse({"error": err.reason}, status_code=err.status)
        try:
            event = json.loads(body)
        except ValueError:
            event = None
        data = event.get("data") or {} if isinstance(event, dict) else None
        if not isinstance(data, dict):  # signed, yet not an MLflow event: nothing to act on
            return JSONResponse({"error": "the body is not an MLflow webhook event"}, status_code=400)
        relevant = event.get("entity") == "model_version_alias" and data.get("alias") == deployer.alias
        log.info("webhook %s: %s.%s %s", delivery, event.get("entity"), event.get("action"), data)
        if relevant:
            deployer.notify()
        return {"delivery": delivery, "reconcile": relevant}

    @app.get("/health")
    def health():
        return {"status": "ok", "passes": deployer.passes}

    @app.get("/status")
    def status():
        return {"alias": deployer.alias, "backend": deployer.backend.kind, "models": deployer.state}

    return app


def register_webhook(public_url: str, secret: str, client=None):
    from mlflow import MlflowClient

    from serving.webhooks import ensure_webhook

    return ensure_webhook(client or MlflowClient(), WEBHOOK_NAME, f"{public_url.rstrip('/')}/webhook", secret)
