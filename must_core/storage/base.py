"""The storage interface every backend implements."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from must_core.errors import MustError


class StorageError(MustError):
    """The object store failed or refused an operation."""

    code = "storage_error"


class TransientStorageError(StorageError):
    """The store could not be reached; retrying later may succeed."""

    code = "storage_unavailable"


class ObjectNotFoundError(StorageError):
    code = "object_not_found"


@runtime_checkable
class ArtifactStore(Protocol):
    """Keys are ``/``-separated relative paths (see :mod:`must_core.storage.keys`)."""

    def put_file(self, local_path: Path, key: str) -> None:
        """Upload (overwrite) a local file."""
        ...

    def get_file(self, key: str, local_path: Path) -> None:
        """Download to a local path (written atomically). Raises ObjectNotFoundError."""
        ...

    def open_read(self, key: str) -> IO[bytes]:
        """A readable binary stream of the object. Raises ObjectNotFoundError."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def list_keys(self, prefix: str) -> list[str]: ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the prefix; returns how many."""
        ...

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        """A time-limited download URL, or None where the backend has none."""
        ...

    def ping(self) -> None:
        """Raise StorageError unless the store is reachable (readiness check)."""
        ...
