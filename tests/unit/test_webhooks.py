import logging
import time

import pytest

from serving.webhooks import Rejected, Verifier, sign

pytestmark = pytest.mark.unit
SECRET = "s3cr3t-value"


def headers(delivery="d-1", ts=None, body=b"{}", secret=SECRET):
    ts = str(int(time.time()) if ts is None else ts)
    return {
        "x-mlflow-delivery-id": delivery,
        "x-mlflow-timestamp": ts,
        "x-mlflow-signature": sign(secret, delivery, ts, body),
    }


def test_genuine_delivery_is_accepted_once():
    verifier = Verifier(SECRET)
    assert verifier.verify(headers(), b"{}") == "d-1"
    with pytest.raises(Rejected) as err:
        verifier.verify(headers(), b"{}")
    assert err.value.status == 409


@pytest.mark.parametrize(
    "make, status",
    [
        (lambda: (headers(secret="wrong"), b"{}"), 401),  # forged
        (lambda: (headers(), b'{"tampered": 1}'), 401),  # body changed after signing
        (lambda: (headers(ts=int(time.time()) - 301), b"{}"), 401),  # older than 5 minutes
        (lambda: ({"x-mlflow-delivery-id": "x"}, b"{}"), 400),  # headers missing
    ],
)
def test_bad_deliveries_are_rejected(make, status):
    hdrs, body = make()
    with pytest.raises(Rejected) as err:
        Verifier(SECRET).verify(hdrs, body)
    assert err.value.status == status


def test_signature_is_hmac_sha256_over_id_timestamp_body_in_base64():
    import base64
    import hashlib
    import hmac

    expected = base64.b64encode(hmac.new(b"k", b"id.123.body", hashlib.sha256).digest()).decode()
    assert sign("k", "id", "123", b"body") == f"v1,{expected}"


def test_secret_never_reaches_a_log(caplog):
    verifier = Verifier(SECRET)
    logging.getLogger("llmops.deployer").warning("verifier %r %s", verifier, verifier)
    assert SECRET not in caplog.text and SECRET not in repr(verifier)


@pytest.mark.parametrize("signature", ["v1,é-not-ascii", "garbage", "v1,", "v1,\x00\x01"])
def test_a_malformed_or_non_ascii_signature_is_a_401(signature):
    hdrs = {**headers(), "x-mlflow-signature": signature}
    with pytest.raises(Rejected) as err:
        Verifier(SECRET).verify(hdrs, b"{}")
    assert err.value.status == 401


def test_an_empty_or_missing_secret_stops_the_start_with_what_to_set(monkeypatch, tmp_path):
    from serving.webhooks import SECRET_ENV, SECRET_FILE_ENV, load_secret

    monkeypatch.delenv(SECRET_FILE_ENV, raising=False)
    for value in (None, "", "   "):
        if value is None:
            monkeypatch.delenv(SECRET_ENV, raising=False)
        else:
            monkeypatch.setenv(SECRET_ENV, value)
        with pytest.raises(RuntimeError, match=f"empty or unset \\({SECRET_ENV}\\).*token_hex"):
            load_secret()
    (tmp_path / "secret").write_text("\n")
    monkeypatch.setenv(SECRET_FILE_ENV, str(tmp_path / "secret"))
    with pytest.raises(RuntimeError, match=f"empty or unset \\({tmp_path / 'secret'}\\)"):
        load_secret()
    (tmp_path / "secret").write_text("from-the-mounted-secret\n")
    assert load_secret() == "from-the-mounted-secret"
    with pytest.raises(ValueError, match="empty"):
        Verifier("")
