"""Streamed downloads of stored objects with their length and digest."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import IO

from fastapi.responses import StreamingResponse

from must_core.storage.base import ArtifactStore

CHUNK = 1 << 20


def _chunks(body: IO[bytes]) -> Iterator[bytes]:
    try:
        while chunk := body.read(CHUNK):
            yield chunk
    finally:
        body.close()


def digest_headers(sha256_hex: str) -> dict[str, str]:
    """RFC 9530 ``Repr-Digest`` (base64 in colons), the older RFC 3230 ``Digest``, and an ETag."""
    b64 = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
    return {
        "Repr-Digest": f"sha-256=:{b64}:",
        "Digest": f"sha-256={b64}",
        "ETag": f'"{sha256_hex}"',
    }


def stream_object(
    store: ArtifactStore, key: str, media_type: str, filename: str, *, digest: str | None
) -> StreamingResponse:
    """Stream ``key`` with ``Content-Length`` (asked of the store: the bytes actually sent) and,
    when known, the SHA-256 headers. A missing object or unreachable store raises before any byte
    is sent, so the client gets a problem+json instead of a cut-off body."""
    size = store.size(key)
    body = store.open_read(key)
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": f'attachment; filename="{filename}"',
        **(digest_headers(digest) if digest else {}),
    }
    return StreamingResponse(_chunks(body), media_type=media_type, headers=headers)
