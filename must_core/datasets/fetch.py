"""Fetch a dataset (or one file) named by a URI into a local folder, with caps, at job start.

Policy is re-checked here: the submission-time check may be stale (a symlink added, DNS changed).
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import socket
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit

from must_core.datasets.errors import (
    ArchiveBombError,
    DatasetFetchError,
    DatasetTooLargeError,
    UnsafeArchiveError,
    UriPolicyError,
)
from must_core.datasets.uris import ParsedUri, check_host, resolve_under_roots, validate_uri
from must_core.settings import DatasetSettings

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
_CHUNK = 1 << 20
# Below this many extracted bytes the compression ratio is not checked (tiny files compress wildly).
_RATIO_MIN_BYTES = 16 * 1024 * 1024

S3ClientFactory = Callable[[], Any]


class FetchCancelled(Exception):
    """``should_stop`` said stop while a dataset was being fetched (the job is being cancelled)."""


StopCheck = Callable[[], bool]


def _never() -> bool:
    return False


def _check(should_stop: StopCheck) -> None:
    if should_stop():
        raise FetchCancelled("fetch cancelled")


def fetch_dataset(
    uri: str,
    dest: Path,
    policy: DatasetSettings,
    s3_client: S3ClientFactory,
    should_stop: StopCheck = _never,
) -> Path:
    """Materialise the dataset under ``dest`` and return the folder to train on.

    ``should_stop`` is polled between files (and between chunks of a download): True raises
    :class:`FetchCancelled` within about one file's transfer time.
    """
    parsed = validate_uri(uri, policy, kind="dir")
    dest.mkdir(parents=True, exist_ok=True)
    if parsed.scheme == "file":
        return _stage_local(parsed, dest, policy, should_stop)
    if parsed.scheme == "s3":
        return _fetch_s3_prefix(parsed, dest, policy, s3_client(), should_stop)
    archive = dest.parent / f"{dest.name}.download{parsed.archive_suffix}"
    try:
        download_http(parsed, archive, policy, should_stop)
        extract_archive(archive, dest, policy)
    finally:
        archive.unlink(missing_ok=True)
    return dest


def fetch_file(uri: str, dest: Path, policy: DatasetSettings, s3_client: S3ClientFactory) -> Path:
    """Materialise one file (a model config JSON or a checkpoint) at ``dest``."""
    parsed = validate_uri(uri, policy, kind="file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if parsed.scheme == "file":
        assert parsed.path is not None
        return parsed.path
    if parsed.scheme == "s3":
        client = s3_client()
        try:
            client.download_file(parsed.bucket, parsed.key, str(dest))
        except Exception as exc:
            raise DatasetFetchError(
                f"cannot download {uri}: {exc}", code="artifact_fetch_failed"
            ) from exc
        return dest
    download_http(parsed, dest, policy)
    return dest


def _keep_mtime(path: Path, mtime: float) -> None:
    """Give a fetched file its source's modification time: the prepared-dataset cache keys on it
    (:func:`must_core.ml.prepared.dataset_key`), so the same objects fetched again match."""
    os.utime(path, (mtime, mtime))


# ---- file:// ------------------------------------------------------------------------------------
def _stage_local(
    parsed: ParsedUri, dest: Path, policy: DatasetSettings, should_stop: StopCheck = _never
) -> Path:
    """Link every regular file that resolves inside the allowed root into ``dest``.

    Symlinked directories are not followed; symlinked files pointing outside the roots are dropped.
    """
    assert parsed.path is not None
    root = parsed.path
    count = 0
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=False):
        _check(should_stop)
        for name in filenames:
            src = Path(dirpath) / name
            if src.suffix.lower() not in IMAGE_SUFFIXES or name.startswith("."):
                continue
            try:
                target = resolve_under_roots(src, policy.allowed_roots)
            except UriPolicyError:
                _logger.warning("skipping %s: resolves outside the allowed roots", src)
                continue
            if not target.is_file():
                continue
            count += 1
            if count > policy.max_files:
                raise DatasetTooLargeError(f"more than {policy.max_files} files under {parsed.raw}")
            link = dest / src.relative_to(root)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)
    return dest


# ---- s3:// --------------------------------------------------------------------------------------
def _fetch_s3_prefix(
    parsed: ParsedUri,
    dest: Path,
    policy: DatasetSettings,
    client: Any,
    should_stop: StopCheck = _never,
) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    objects: list[tuple[str, int, float]] = []
    total = 0
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=parsed.bucket, Prefix=parsed.key
        )
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/") or PurePosixPath(key).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                modified = obj.get("LastModified")
                mtime = modified.timestamp() if modified is not None else 0.0
                objects.append((key, int(obj.get("Size", 0)), mtime))
                total += int(obj.get("Size", 0))
                if len(objects) > policy.max_files:
                    raise DatasetTooLargeError(
                        f"more than {policy.max_files} objects under {parsed.raw}"
                    )
                if total > policy.max_download_bytes:
                    raise DatasetTooLargeError(
                        f"{parsed.raw} holds more than {policy.max_download_bytes} bytes"
                    )
        for key, _size, mtime in objects:
            _check(should_stop)
            rel = _safe_relative(key[len(parsed.key) :])
            if rel is None:
                _logger.warning("skipping object with an unsafe key: %s", key)
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(parsed.bucket, key, str(target))
            _keep_mtime(target, mtime)
    except (BotoCoreError, ClientError) as exc:
        from must_core.storage.base import TransientStorageError
        from must_core.storage.s3 import translate

        err = translate(exc, f"dataset {parsed.raw}")
        if isinstance(err, TransientStorageError):
            raise err from exc  # the object store is down: retried, not a dataset problem
        raise DatasetFetchError(f"cannot read {parsed.raw}: {exc}") from exc
    return dest


# ---- http(s):// archives ---------------------------------------------------------------------------
def _pinned_create_connection(allow_private: bool) -> Callable[..., socket.socket]:
    """``socket.create_connection`` that resolves the host once, checks every answer, and connects
    to a checked address: a resolver that answers differently later (DNS rebinding) cannot
    redirect the connection."""

    def create_connection(
        address: tuple[str, int], timeout: Any = None, source_address: Any = None, **_: Any
    ) -> socket.socket:
        host, port = address
        error: OSError = OSError(f"no address for {host}")
        for addr in check_host(host, allow_private):
            try:
                return socket.create_connection((addr, port), timeout, source_address)
            except OSError as exc:
                error = exc
        raise error

    return create_connection


class _PinnedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self.allow_private = allow_private

    def http_open(self, req: Any) -> Any:
        return self.do_open(self._connection, req)

    def _connection(self, host: str, **kw: Any) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(host, **kw)
        conn._create_connection = _pinned_create_connection(self.allow_private)  # type: ignore[attr-defined]
        return conn


class _PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self.allow_private = allow_private

    def https_open(self, req: Any) -> Any:
        return self.do_open(self._connection, req)

    def _connection(self, host: str, **kw: Any) -> http.client.HTTPSConnection:
        # TLS still verifies the certificate against the host name (SNI), not the pinned address
        conn = http.client.HTTPSConnection(host, **kw)
        conn._create_connection = _pinned_create_connection(self.allow_private)  # type: ignore[attr-defined]
        return conn


def pinned_opener(
    allow_private: bool, redirects: urllib.request.BaseHandler
) -> urllib.request.OpenerDirector:
    """The one SSRF-safe HTTP client (dataset archives, webhooks): no proxy, and every connection
    resolves its host once, checks each address (:func:`check_host`) and connects to a checked one,
    so DNS rebinding between the submission-time check and the connection gets nowhere."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}),  # a proxy would connect on our behalf, unchecked
        _PinnedHTTPHandler(allow_private),
        _PinnedHTTPSHandler(allow_private),
        redirects,
    )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects stay on http(s); each hop opens a new pinned connection, so its host is checked."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        parts = urlsplit(newurl)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UriPolicyError(f"redirect to a non-http(s) URL refused: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download_http(
    parsed: ParsedUri, dest: Path, policy: DatasetSettings, should_stop: StopCheck = _never
) -> None:
    """Stream to ``dest`` with a byte cap; every connection goes to an address checked for it."""
    opener = pinned_opener(policy.allow_private_hosts, _CheckedRedirects())
    request = urllib.request.Request(parsed.raw, headers={"User-Agent": "must-service"})  # noqa: S310
    received = 0
    try:
        with opener.open(request, timeout=policy.http_timeout_s) as resp, dest.open("wb") as out:
            length = resp.headers.get("Content-Length")
            if length is not None and int(length) > policy.max_download_bytes:
                raise DatasetTooLargeError(
                    f"{parsed.raw} is {length} bytes; the cap is {policy.max_download_bytes}"
                )
            while chunk := resp.read(_CHUNK):
                _check(should_stop)
                received += len(chunk)
                if received > policy.max_download_bytes:
                    raise DatasetTooLargeError(
                        f"{parsed.raw} exceeds the download cap of {policy.max_download_bytes} bytes"
                    )
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        dest.unlink(missing_ok=True)
        raise DatasetFetchError(f"cannot download {parsed.raw}: {exc}") from exc
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _safe_relative(name: str) -> PurePosixPath | None:
    """A member/key name as a safe relative path, or None (absolute, '..', drive letters...)."""
    name = name.replace("\\", "/")
    if not name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return PurePosixPath(*parts)


def _copy_capped(src: IO[bytes], dest: Path, budget: list[int], policy: DatasetSettings) -> None:
    with dest.open("wb") as out:
        while chunk := src.read(_CHUNK):
            budget[0] += len(chunk)
            if budget[0] > policy.max_extracted_bytes:
                raise ArchiveBombError(f"archive expands beyond {policy.max_extracted_bytes} bytes")
            out.write(chunk)


def extract_archive(archive: Path, dest: Path, policy: DatasetSettings) -> None:
    """Extract a .zip/.tar/.tar.gz safely: refuse traversal, links, special files and bombs."""
    dest.mkdir(parents=True, exist_ok=True)
    packed = max(1, archive.stat().st_size)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, policy, packed)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, policy, packed)
        else:
            raise DatasetFetchError(f"{archive.name} is not a zip or tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise DatasetFetchError(f"corrupt archive: {exc}") from exc
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _check_totals(count: int, declared: int, packed: int, policy: DatasetSettings) -> None:
    if count > policy.max_files:
        raise ArchiveBombError(f"archive has more than {policy.max_files} members")
    if declared > policy.max_extracted_bytes:
        raise ArchiveBombError(
            f"archive expands to {declared} bytes (cap {policy.max_extracted_bytes})"
        )
    if declared > _RATIO_MIN_BYTES and declared / packed > policy.max_compression_ratio:
        raise ArchiveBombError(
            f"compression ratio {declared / packed:.0f} exceeds {policy.max_compression_ratio:.0f}"
        )


def _extract_zip(archive: Path, dest: Path, policy: DatasetSettings, packed: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        files = []
        for info in infos:
            rel = _safe_relative(info.filename)
            if rel is None:
                raise UnsafeArchiveError(f"unsafe member path {info.filename!r} (zip-slip)")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"symlink member {info.filename!r} refused")
            if not info.is_dir():
                files.append((info, rel))
        _check_totals(len(files), sum(i.file_size for i, _ in files), packed, policy)
        budget = [0]
        for info, rel in files:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:
                _copy_capped(src, target, budget, policy)
            _keep_mtime(target, time.mktime((*info.date_time, 0, 0, -1)))


def _extract_tar(archive: Path, dest: Path, policy: DatasetSettings, packed: int) -> None:
    with tarfile.open(archive, mode="r:*") as tf:
        members = []
        count = declared = 0
        for m in tf:  # streaming: a bomb with millions of members is refused early
            rel = _safe_relative(m.name)
            if rel is None:
                raise UnsafeArchiveError(f"unsafe member path {m.name!r} (path traversal)")
            if m.issym() or m.islnk():
                raise UnsafeArchiveError(f"link member {m.name!r} refused")
            if m.isdir():
                continue
            if not m.isreg():
                raise UnsafeArchiveError(f"special file {m.name!r} refused")
            count += 1
            declared += m.size
            _check_totals(count, declared, packed, policy)
            members.append((m, rel))
        budget = [0]
        for m, rel in members:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            if src is None:
                continue
            with src:
                _copy_capped(src, target, budget, policy)
            _keep_mtime(target, m.mtime)
