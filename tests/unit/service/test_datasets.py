"""Dataset URI parsing/policy and safe fetching (archives, SSRF guard, file:// staging). No services."""

from __future__ import annotations

import http.server
import io
import os
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from must_core.datasets import uris
from must_core.datasets.errors import (
    ArchiveBombError,
    DatasetFetchError,
    DatasetTooLargeError,
    InvalidUriError,
    UnsafeArchiveError,
    UriPolicyError,
)
from must_core.datasets.fetch import extract_archive, fetch_dataset, fetch_file
from must_core.datasets.uris import check_local_dir, is_public_address, parse_uri, validate_uri
from must_core.settings import DatasetSettings


def _no_s3() -> object:
    raise AssertionError("no S3 in this test")


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "gopher://x/y",
        "s3://UPPER/x",
        "s3://ok-bucket/a/../b",
        "file://host/x",
        "file://rel",
        "http://h/data.txt",
        "https://u:p@h/data.zip",
        "http:///data.zip",
        "s3://b\x00/x",
    ],
)
def test_invalid_uris(uri: str) -> None:
    with pytest.raises(InvalidUriError):
        parse_uri(uri)


def test_parse_forms() -> None:
    assert parse_uri("s3://my-bucket/some/prefix").key == "some/prefix/"
    assert parse_uri("s3://my-bucket").key == ""
    assert parse_uri("https://example.com/a/data.tar.gz").archive_suffix == ".tar.gz"
    assert parse_uri("s3://my-bucket/cfg.json", kind="file").key == "cfg.json"
    with pytest.raises(InvalidUriError):
        parse_uri("s3://my-bucket/prefix/", kind="file")


def test_file_policy(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "ds").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link-out")
    policy = DatasetSettings(allowed_roots=[root])
    assert validate_uri(f"file://{root}/ds", policy).path == (root / "ds").resolve()
    for bad in (
        f"file://{outside}",
        f"file://{root}/ds/../../outside",
        f"file://{root}/link-out",
        f"file://{root}/missing",
    ):
        with pytest.raises(UriPolicyError):
            validate_uri(bad, policy)
    with pytest.raises(UriPolicyError):  # no roots configured: file:// disabled
        validate_uri(f"file://{root}/ds", DatasetSettings())


def test_file_staging_drops_symlinks_out_of_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "ds" / "cls").mkdir(parents=True)
    (root / "ds" / "cls" / "a.png").write_bytes(b"x")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret")
    os.symlink(secret, root / "ds" / "cls" / "evil.png")
    policy = DatasetSettings(allowed_roots=[root])
    out = fetch_dataset(f"file://{root}/ds", tmp_path / "stage", policy, _no_s3)
    staged = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_symlink())
    assert staged == ["cls/a.png"]


def test_bucket_allow_list() -> None:
    policy = DatasetSettings(allowed_buckets=["good-bucket"])
    validate_uri("s3://good-bucket/x/", policy)
    with pytest.raises(UriPolicyError):
        validate_uri("s3://other-bucket/x/", policy)


@pytest.mark.parametrize(
    ("addr", "public"),
    [
        ("8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("::1", False),
        ("fe80::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),  # noqa: S104
        ("100.64.0.1", False),
        ("2001:4860:4860::8888", True),
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
        ("::ffff:a9fe:a9fe", False),  # IPv4-mapped 169.254.169.254
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
    ],
)
def test_public_address(addr: str, public: bool) -> None:
    assert is_public_address(addr) is public


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info in entries:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def test_zip_extracts_layout(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"cats/1.png": b"1", "dogs/2.png": b"22", "./top.jpg": b"3"}))
    extract_archive(archive, tmp_path / "out", DatasetSettings())
    got = sorted(
        p.relative_to(tmp_path / "out").as_posix()
        for p in (tmp_path / "out").rglob("*")
        if p.is_file()
    )
    assert got == ["cats/1.png", "dogs/2.png", "top.jpg"]


@pytest.mark.parametrize(
    "name", ["../evil.png", "/abs/evil.png", "a/../../evil.png", "C:/evil.png", "..\\evil.png"]
)
def test_zip_slip_refused(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"ok.png": b"x", name: b"pwned"}))
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, tmp_path / "out", DatasetSettings())
    assert not (tmp_path / "evil.png").exists()


def test_zip_bomb_refused(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(_zip({"zeros.png": b"\0" * (64 * 1024 * 1024)}))
    with pytest.raises(ArchiveBombError):
        extract_archive(archive, tmp_path / "out", DatasetSettings())
    with pytest.raises(ArchiveBombError):  # size cap
        extract_archive(
            archive,
            tmp_path / "out2",
            DatasetSettings(max_extracted_bytes=1024, max_compression_ratio=1e9),
        )
    many = tmp_path / "many.zip"
    many.write_bytes(_zip({f"{i}.png": b"x" for i in range(20)}))
    with pytest.raises(ArchiveBombError):
        extract_archive(many, tmp_path / "out3", DatasetSettings(max_files=10))


def test_tar_links_and_traversal_refused(tmp_path: Path) -> None:
    sym = tarfile.TarInfo("link.png")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("hard.png")
    hard.type, hard.linkname = tarfile.LNKTYPE, "ok.png"
    dev = tarfile.TarInfo("dev.png")
    dev.type = tarfile.CHRTYPE
    ok = tarfile.TarInfo("ok.png")
    trav = tarfile.TarInfo("../../evil.png")
    for bad in (sym, hard, dev, trav):
        archive = tmp_path / "a.tar.gz"
        archive.write_bytes(_tar([ok, bad], {"ok.png": b"x", "../../evil.png": b"y"}))
        with pytest.raises(UnsafeArchiveError):
            extract_archive(archive, tmp_path / "out", DatasetSettings())
    archive = tmp_path / "good.tgz"
    archive.write_bytes(_tar([ok], {"ok.png": b"x"}))
    extract_archive(archive, tmp_path / "out", DatasetSettings())
    assert (tmp_path / "out" / "ok.png").read_bytes() == b"x"


HITS: list[str] = []


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(root), **kw)  # type: ignore[arg-type]

        def log_message(self, *_: object) -> None:
            pass

        def do_GET(self) -> None:
            HITS.append(self.path)
            if self.path == "/redirect.zip":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/x.zip")
                self.end_headers()
                return
            super().do_GET()

    HITS.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_http_archive_fetch(tmp_path: Path, http_server: tuple[str, Path]) -> None:
    base, root = http_server
    (root / "data.zip").write_bytes(_zip({"red/1.png": b"a", "blue/2.png": b"b"}))
    with pytest.raises(UriPolicyError):  # loopback refused by default (SSRF guard)
        fetch_dataset(f"{base}/data.zip", tmp_path / "d0", DatasetSettings(), _no_s3)
    allow = DatasetSettings(allow_private_hosts=True)
    out = fetch_dataset(f"{base}/data.zip", tmp_path / "d1", allow, _no_s3)
    assert (out / "red" / "1.png").read_bytes() == b"a"
    with pytest.raises(DatasetTooLargeError):
        fetch_dataset(
            f"{base}/data.zip",
            tmp_path / "d2",
            DatasetSettings(allow_private_hosts=True, max_download_bytes=10),
            _no_s3,
        )
    (root / "cfg.json").write_text("{}")
    assert fetch_file(f"{base}/cfg.json", tmp_path / "c.json", allow, _no_s3).read_text() == "{}"


def test_http_redirect_to_private_refused(
    tmp_path: Path, http_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, root = http_server
    # The first hop must pass for the redirect check to be tested: treat the loopback test server
    # as public; the redirect target (169.254.169.254) stays private and is refused.
    real = uris.is_public_address
    monkeypatch.setattr(uris, "is_public_address", lambda a: a == "127.0.0.1" or real(a))
    (root / "direct.zip").write_bytes(_zip({"a/1.png": b"a"}))
    policy = DatasetSettings(allow_private_hosts=False)
    assert (fetch_dataset(f"{base}/direct.zip", tmp_path / "ok", policy, _no_s3) / "a").is_dir()
    with pytest.raises(UriPolicyError, match=r"169\.254\.169\.254"):
        fetch_dataset(f"{base}/redirect.zip", tmp_path / "d", policy, _no_s3)


def test_dns_rebinding_cannot_reach_loopback(
    tmp_path: Path, http_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resolver answering public, public, then 127.0.0.1: the connection goes to an address that
    was checked, never to the loopback server."""
    base, root = http_server
    port = base.rsplit(":", 1)[1]
    (root / "data.zip").write_bytes(_zip({"a/1.png": b"a"}))
    real = socket.getaddrinfo
    answers = iter(["93.184.216.34", "93.184.216.34"])  # then loopback for ever

    def resolver(host: str, *args: Any, **kw: Any) -> Any:
        if host != "rebind.example":
            return real(host, *args, **kw)
        return real(next(answers, "127.0.0.1"), *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    monkeypatch.setattr(uris, "is_public_address", lambda a: not a.startswith("127."))
    policy = DatasetSettings(http_timeout_s=2)
    with pytest.raises((DatasetFetchError, UriPolicyError)):
        fetch_dataset(f"http://rebind.example:{port}/data.zip", tmp_path / "d", policy, _no_s3)
    assert HITS == []  # the loopback server never saw a request


def test_local_dir_base_model_obeys_allowed_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "clip").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    policy = DatasetSettings(allowed_roots=[root])
    assert check_local_dir(f"local-dir:{root}/clip", policy) == (root / "clip").resolve()
    assert check_local_dir("must-tiny", policy) is None
    messages = set()
    for path in (tmp_path / "outside", tmp_path / "missing", root / "missing"):
        with pytest.raises(UriPolicyError) as err:
            check_local_dir(f"local-dir:{path}", policy)
        messages.add(err.value.message.replace(str(path), "P"))
    assert len(messages) == 1  # existing or not, outside the roots: the same answer
    with pytest.raises(InvalidUriError):
        check_local_dir(f"local-dir:{root}/../outside", policy)


def test_fetch_stops_between_files_when_asked(tmp_path: Path) -> None:
    from must_core.datasets.fetch import FetchCancelled, fetch_dataset

    root = tmp_path / "root"
    for i in range(5):
        (root / "ds" / f"d{i}").mkdir(parents=True)
        (root / "ds" / f"d{i}" / "a.png").write_bytes(b"x")
    policy = DatasetSettings(allowed_roots=[root])
    calls: list[int] = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(FetchCancelled):
        fetch_dataset(f"file://{root}/ds", tmp_path / "out", policy, lambda: None, stop_after_two)
    assert len(calls) == 3  # checked per folder/file, not once at the end
