"""The signature on every delivery, and how a receiver checks it.

Headers of a delivery (a ``POST`` with a JSON body)::

    Must-Event: job.succeeded
    Must-Delivery: <delivery id>          (the same on every retry of one delivery)
    Must-Timestamp: <unix seconds>
    Must-Signature: v1=<hex HMAC-SHA256(secret, f"{timestamp}." + raw body)>

A receiver recomputes the HMAC over the timestamp, a dot and the raw body bytes with its secret,
compares in constant time, and refuses timestamps older than a few minutes (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

SIGNATURE_HEADER = "Must-Signature"
TIMESTAMP_HEADER = "Must-Timestamp"
EVENT_HEADER = "Must-Event"
DELIVERY_HEADER = "Must-Delivery"


def new_secret() -> str:
    return "whsec_" + secrets.token_hex(24)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def signed_headers(secret: str, body: bytes, event: str, delivery_id: str) -> dict[str, str]:
    ts = int(time.time())
    return {
        "Content-Type": "application/json",
        "User-Agent": "must-webhooks/1",
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: signature(secret, ts, body),
    }


def verify(
    secret: str, body: bytes, timestamp: str, sig: str, *, tolerance_s: float = 300.0
) -> bool:
    """What a receiver runs: a fresh timestamp and a matching signature."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(time.time() - ts) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, ts, body), sig)
