"""Typed dataset-URI errors with stable codes (the API maps them to 4xx, the worker records them)."""

from __future__ import annotations

from must_core.errors import DatasetError, MustError


class InvalidUriError(MustError):
    """The URI is malformed or uses an unsupported scheme/extension."""

    code = "invalid_uri"


class UriPolicyError(MustError):
    """The URI is well formed but refused by policy (root, bucket, private host...)."""

    code = "uri_forbidden"


class DatasetFetchError(DatasetError):
    """The dataset could not be downloaded or read at job start."""

    code = "dataset_fetch_failed"


class DatasetTooLargeError(DatasetError):
    code = "dataset_too_large"


class UnsafeArchiveError(DatasetError):
    """Path traversal (zip-slip), links or special files inside an archive."""

    code = "archive_unsafe"


class ArchiveBombError(DatasetError):
    """Compression ratio or extracted size beyond the configured caps."""

    code = "archive_bomb"
