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

from components.environment import WEBHOOK_SECRET, WEBHOOK_SECRET_FILE

MAX_AGE_S = 300
EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
SECRET_ENV, SECRET_FILE_ENV = WEBHOOK_SECRET.name, WEBHOOK_SECRET_FILE.name  # the file: a mounted Secret


class Rejected(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def load_secret() -> str:
    """The signing secret; an empty one would make every signature a guessable constant, so it stops the start."""
    if os.environ.get(SECRET_FILE_ENV):
        where, secret = os.environ[SECRET_FILE_ENV], Path(os.environ[SECRET_FILE_ENV]).read_text().strip()
    else:
        where, secret = SECRET_ENV, os.environ.get(SECRET_ENV, "").strip()
    if not secret:
        raise RuntimeError(
            f"the webhook signing secret is empty or unset ({where}): set {SECRET_ENV}, or {SECRET_FILE_ENV} to "
            "a mounted Secret's file, to a random value MLflow will sign with "
            '(python3 -c "import secrets; print(secrets.token_hex(16))")'
        )
    return secret


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    payload = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), payload, hashlib.sha256).digest()).decode()


@dataclass
class Verifier:
    secret: str
    max_age_s: int = MAX_AGE_S
    remembered: int = 10_000

    def __post_init__(self):
        if not self.secret.strip():
            raise ValueError("the webhook signing secret is empty")
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
        # compare_digest raises on non-ASCII text: a malformed header is a bad signature, never a 500
        expected = sign(self.secret, delivery_id, timestamp, body)
        if not signature.isascii() or not hmac.compare_digest(expected, signature):
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
