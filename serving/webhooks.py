"""MLflow registry webhooks: signature check, freshness, replay protection, and self-registration.

MLflow signs f"{delivery_id}.{timestamp}.{body}" with HMAC-SHA256 and sends `X-MLflow-Signature: v1,<base64>`.
Delivery is fire-and-forget, so the deployer never relies on it alone: the reconcile loop is the truth.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

MAX_AGE_S = 300
EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
SECRET_ENV = "LLMOPS_WEBHOOK_SECRET"
SECRET_FILE_ENV = "LLMOPS_WEBHOOK_SECRET_FILE"  # a mounted Kubernetes Secret


class Rejected(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def load_secret() -> str:
    if os.environ.get(SECRET_FILE_ENV):
        return Path(os.environ[SECRET_FILE_ENV]).read_text().strip()
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV]
    raise RuntimeError(f"set {SECRET_ENV} or {SECRET_FILE_ENV} (the webhook signing secret)")


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    payload = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), payload, hashlib.sha256).digest()).decode()


@dataclass
class Verifier:
    secret: str
    max_age_s: int = MAX_AGE_S
    remembered: int = 10_000

    def __post_init__(self):
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __repr__(self) -> str:  # never let the secret reach a log line
        return f"Verifier(max_age_s={self.max_age_s})"

    def verify(self, headers, body: bytes, now: float | None = None) -> str:
        """Returns the delivery id of a genuine, fresh, first delivery; raises Rejected otherwise."""
        delivery_id = headers.get("x-mlflow-delivery-id", "")
        timestamp = headers.get("x-mlflow-timestamp", "")
        signature = headers.get("x-mlflow-signature", "")
        if not (delivery_id and timestamp and signature):
            raise Rejected(400, "missing X-MLflow-Delivery-Id, X-MLflow-Timestamp or X-MLflow-Signature")
        if not hmac.compare_digest(sign(self.secret, delivery_id, timestamp, body), signature):
            raise Rejected(401, "bad signature")
        try:
            age = (now or time.time()) - int(timestamp)
        except ValueError:
            raise Rejected(400, "timestamp is not an integer") from None
        if abs(age) > self.max_age_s:
            raise Rejected(401, f"timestamp is {age:.0f}s old; more than {self.max_age_s}s")
        if delivery_id in self._seen:
            raise Rejected(409, "delivery already processed")
        self._seen[delivery_id] = time.time()
        while len(self._seen) > self.remembered:
            self._seen.popitem(last=False)
        return delivery_id


def ensure_webhook(client, name: str, url: str, secret: str):
    """Register the deployer's webhook once: reuse (and refresh) one with the same name instead of adding another."""
    from mlflow.entities.webhook import WebhookEvent

    events = [WebhookEvent.from_str(e) for e in EVENTS]
    for hook in client.list_webhooks():
        if hook.name == name:
            return client.update_webhook(hook.webhook_id, url=url, events=events, secret=secret, status="ACTIVE")
    return client.create_webhook(
        name=name,
        url=url,
        events=events,
        secret=secret,
        description="llmops deployer: alias changes deploy the version behind them",
    )
