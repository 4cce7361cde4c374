"""Submission-time check of a webhook URL (the connection is checked again when it is made)."""

from __future__ import annotations

from urllib.parse import urlsplit

from must_core.datasets.errors import InvalidUriError
from must_core.datasets.uris import MAX_URI_LENGTH, check_host
from must_core.settings import WebhookSettings


def validate_webhook_url(url: str, policy: WebhookSettings) -> str:
    """http(s) with a host that resolves to public addresses only (unless the setting allows
    private ones): the same SSRF rule as dataset URIs (:func:`check_host`).

    Raises:
        InvalidUriError: not an http(s) URL with a host, or it carries credentials.
        UriPolicyError: the host resolves to a private, loopback or link-local address.
    """
    if not url or len(url) > MAX_URI_LENGTH or any(ord(c) < 32 for c in url):
        raise InvalidUriError("a webhook URL must be 1-4096 characters without control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidUriError(f"malformed webhook URL: {exc}") from exc
    if port == 0:
        raise InvalidUriError("a webhook URL may not use port 0")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidUriError("a webhook URL must be http:// or https:// with a host")
    if parts.username or parts.password:
        raise InvalidUriError("a webhook URL may not carry credentials")
    check_host(parts.hostname, policy.allow_private_hosts)
    return url
