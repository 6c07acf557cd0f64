"""Verify an Agentry callback (Standard Webhooks): `verify(secret, headers, body)`.

Run as a script (as the tests do): CALLBACK_SECRET=... python3 verify_callback.py BODY_FILE
WEBHOOK_ID WEBHOOK_TIMESTAMP WEBHOOK_SIGNATURE; exits 0 when the callback is genuine.
"""
import base64
import hashlib
import hmac
import sys
import time


def verify(secret: str, headers: dict, body: bytes, tolerance_s: int = 300) -> bool:
    """True when `body` (the raw bytes received) was signed with `secret` within
    `tolerance_s` seconds. `headers` are the request's, by lower-case name."""
    msg_id = headers["webhook-id"]
    timestamp = headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    if secret.startswith("whsec_"):
        key = base64.b64decode(secret[len("whsec_"):])
    else:
        key = secret.encode()
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(expected, sig[len("v1,"):])
        for sig in headers["webhook-signature"].split()
        if sig.startswith("v1,")
    )


if __name__ == "__main__":
    import os

    body_file, msg_id, timestamp, signature = sys.argv[1:5]
    with open(body_file, "rb") as f:
        body = f.read()
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": signature,
    }
    sys.exit(0 if verify(os.environ["CALLBACK_SECRET"], headers, body) else 1)
