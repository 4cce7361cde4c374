"""Parse dataset/artifact URIs and check them against policy, without reading any content.

Accepted forms:
- ``s3://bucket/prefix/``: objects under a prefix (bucket allow-list optional);
- ``file:///abs/path``: only inside ``MUST_DATASETS__ALLOWED_ROOTS``; ``..`` and symlinks that resolve
  outside the root are refused;
- ``http(s)://host/path.{zip,tar,tar.gz,tgz}``: archives; hosts resolving to private, loopback,
  link-local or otherwise non-global addresses are refused unless ``allow_private_hosts``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import unquote, urlsplit

from must_core.datasets.errors import InvalidUriError, UriPolicyError
from must_core.settings import DatasetSettings

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
MAX_URI_LENGTH = 4096

Kind = Literal["dir", "file"]


@dataclass(frozen=True)
class ParsedUri:
    scheme: Literal["s3", "file", "http", "https"]
    raw: str
    bucket: str = ""
    key: str = ""  # s3 key or key prefix
    path: Path | None = None  # file:// resolved path
    host: str = ""
    archive_suffix: str = ""


def parse_uri(uri: str, *, kind: Kind = "dir") -> ParsedUri:
    """Syntax only. ``kind="dir"``: a dataset (folder, prefix or archive); ``"file"``: one object."""
    if not uri or len(uri) > MAX_URI_LENGTH or any(ord(c) < 32 for c in uri):
        raise InvalidUriError("URI is empty, too long or contains control characters")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise InvalidUriError(f"invalid S3 bucket name in {uri!r}")
        key = unquote(parts.path).lstrip("/")
        _check_relative(key, uri)
        if kind == "dir" and key and not key.endswith("/"):
            key += "/"  # a prefix "imgs" must not also match "imgs2/"
        if kind == "file" and (not key or key.endswith("/")):
            raise InvalidUriError(f"{uri!r} must name an object, not a prefix")
        return ParsedUri("s3", uri, bucket=bucket, key=key)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidUriError(f"file:// URIs must not name a host: {uri!r}")
        raw_path = unquote(parts.path)
        if not raw_path.startswith("/"):
            raise InvalidUriError(f"file:// URIs need an absolute path: {uri!r}")
        if ".." in PurePosixPath(raw_path).parts:
            raise UriPolicyError(f"path traversal ('..') refused in {uri!r}")
        return ParsedUri("file", uri, path=Path(raw_path))
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise InvalidUriError(f"no host in {uri!r}")
        if parts.username or parts.password:
            raise InvalidUriError("credentials in http(s) URIs are refused")
        try:
            _ = parts.port
        except ValueError as exc:
            raise InvalidUriError(f"invalid port in {uri!r}") from exc
        path = unquote(parts.path).lower()
        suffix = ""
        if kind == "dir":
            suffix = next((s for s in ARCHIVE_SUFFIXES if path.endswith(s)), "")
            if not suffix:
                raise InvalidUriError(
                    f"http(s) datasets must be archives ({', '.join(ARCHIVE_SUFFIXES)}): {uri!r}"
                )
        return ParsedUri(scheme, uri, host=parts.hostname, archive_suffix=suffix)  # type: ignore[arg-type]
    raise InvalidUriError(
        f"unsupported URI scheme {parts.scheme!r}; use s3://, file:// or https://"
    )


def _check_relative(key: str, uri: str) -> None:
    if any(p in ("..", ".") for p in key.split("/")) or "\\" in key:
        raise InvalidUriError(f"'.', '..' or backslashes in the key of {uri!r}")


def check_policy(parsed: ParsedUri, policy: DatasetSettings, *, kind: Kind = "dir") -> ParsedUri:
    """Policy checks that need no content. Returns the URI with file paths resolved."""
    if parsed.scheme == "s3":
        if policy.allowed_buckets and parsed.bucket not in policy.allowed_buckets:
            raise UriPolicyError(f"bucket {parsed.bucket!r} is not in the allowed buckets")
        return parsed
    if parsed.scheme == "file":
        assert parsed.path is not None
        resolved = resolve_under_roots(parsed.path, policy.allowed_roots)
        if kind == "dir" and not resolved.is_dir():
            raise UriPolicyError(f"{parsed.raw!r} is not a directory")
        if kind == "file" and not resolved.is_file():
            raise UriPolicyError(f"{parsed.raw!r} is not a file")
        return ParsedUri("file", parsed.raw, path=resolved)
    if not policy.allow_http:
        raise UriPolicyError("http(s) dataset URIs are disabled on this server")
    check_host(parsed.host, policy.allow_private_hosts)
    return parsed


def resolve_under_roots(path: Path, roots: list[Path]) -> Path:
    """Resolve symlinks and require the result inside one of ``roots``.

    Every refusal has the same message, so a caller cannot learn whether a path outside the roots
    exists (the lexical check runs before anything outside the roots is touched).
    """
    if not roots:
        raise UriPolicyError("file:// URIs are disabled (no MUST_DATASETS__ALLOWED_ROOTS)")
    refused = UriPolicyError(f"{path} is not an existing path inside the allowed roots")
    resolved_roots = [root.resolve() for root in roots]
    if not any(_inside(Path(os.path.abspath(path)), r) for r in resolved_roots + roots):
        raise refused
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise refused from None
    if not any(_inside(resolved, r) for r in resolved_roots):
        raise refused
    return resolved


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


LOCAL_DIR = "local-dir:"


def check_local_dir(arch: str, policy: DatasetSettings) -> Path | None:
    """``local-dir:/path`` base models obey the same allowed roots as ``file://`` URIs."""
    if not arch.startswith(LOCAL_DIR):
        return None
    raw = arch[len(LOCAL_DIR) :]
    if not raw.startswith("/") or ".." in PurePosixPath(raw).parts:
        raise InvalidUriError("local-dir: needs an absolute path without '..'")
    folder = resolve_under_roots(Path(raw), policy.allowed_roots)
    if not folder.is_dir():
        raise UriPolicyError(f"{raw} is not a directory")
    return folder


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, compatible, NAT64, 6to4, Teredo client)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return is_public_address(str(inner))
    return bool(ip.is_global) and not ip.is_multicast


def check_host(host: str, allow_private: bool) -> list[str]:
    """Resolve ``host``; refuse it if any address is not global (SSRF guard). Returns addresses."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise UriPolicyError(f"host {host!r} cannot be resolved") from exc
    addrs = sorted({str(info[4][0]) for info in infos})
    if not allow_private:
        bad = [a for a in addrs if not is_public_address(a)]
        if bad:
            raise UriPolicyError(
                f"host {host!r} resolves to a private, loopback or link-local address ({bad[0]})"
            )
    return addrs


def validate_uri(uri: str, policy: DatasetSettings, *, kind: Kind = "dir") -> ParsedUri:
    """Syntax then policy: what the API runs at submission."""
    return check_policy(parse_uri(uri, kind=kind), policy, kind=kind)
