"""Webhook signing and the SSRF rule: refused at submission and again at connect time."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from must_core.datasets.errors import UriPolicyError
from must_core.settings import WebhookSettings
from must_core.webhooks.outbox import backoff_s, post
from must_core.webhooks.signing import signature, signed_headers, verify
from must_core.webhooks.urls import validate_webhook_url


def test_signature_is_hmac_over_timestamp_and_body() -> None:
    import hashlib
    import hmac

    want = hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert signature("k", 1700000000, b"{}") == f"v1={want}"
    h = signed_headers("k", b'{"a":1}', "job.failed", "d1")
    assert verify("k", b'{"a":1}', h["Must-Timestamp"], h["Must-Signature"])
    assert not verify("k", b'{"a":2}', h["Must-Timestamp"], h["Must-Signature"])
    assert not verify("k", b"{}", "1", signature("k", 1, b"{}"))  # stale timestamp: a replay
    assert not verify("k", b"{}", "soon", "v1=00")


def test_backoff_is_exponential_and_capped() -> None:
    p = WebhookSettings(backoff_base_s=2, backoff_max_s=30)
    assert [round(backoff_s(n, p) / d, 1) <= 1.2 for n, d in ((1, 2), (2, 4), (3, 8))] == [True] * 3
    assert 1.6 <= backoff_s(1, p) <= 2.4 and 6.4 <= backoff_s(3, p) <= 9.6
    assert backoff_s(20, p) <= 36


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://localhost:9/x",
        "http://[::1]/x",
        "http://169.254.169.254/latest/meta-data",
    ],
)
def test_private_targets_refused_at_submission(url: str) -> None:
    with pytest.raises(UriPolicyError):
        validate_webhook_url(url, WebhookSettings())
    assert validate_webhook_url(url, WebhookSettings(allow_private_hosts=True)) == url


def test_connect_time_recheck_refuses_a_private_address() -> None:
    """The sender checks the address it connects to, whatever passed at submission (a host that
    later resolves to a private address — DNS rebinding — is refused before any byte is sent)."""
    hits: list[str] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://localhost:{server.server_address[1]}/hook"
    try:
        with pytest.raises(UriPolicyError):
            post(url, b"{}", {"Content-Type": "application/json"}, WebhookSettings())
        assert hits == []
        allowed = WebhookSettings(allow_private_hosts=True)
        assert post(url, b"{}", {"Content-Type": "application/json"}, allowed) == 200
        assert hits == ["/hook"]
    finally:
        server.shutdown()
