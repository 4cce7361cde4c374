"""Local-disk artifact store (embedded mode, tests)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import IO

from must_core.fsutil import atomic_write
from must_core.storage.base import ObjectNotFoundError, StorageError


class LocalStore:
    """Objects are files under ``root``; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or "\\" in key:
            raise StorageError(f"invalid object key {key!r}")
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"object key escapes the store root: {key!r}")
        return path

    def put_file(self, local_path: Path, key: str) -> None:
        atomic_write(self._path(key), lambda tmp: shutil.copyfile(local_path, tmp))

    def get_file(self, key: str, local_path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFoundError(f"object not found: {key}")
        atomic_write(local_path, lambda tmp: shutil.copyfile(src, tmp))

    def open_read(self, key: str) -> IO[bytes]:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFoundError(f"object not found: {key}")
        return src.open("rb")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFoundError(f"object not found: {key}")
        return src.stat().st_size

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix.endswith("/") else (self.root / prefix).parent
        if not base.is_dir():
            return []
        keys = []
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return keys

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        return len(keys)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        return None

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"store root {self.root} is not writable")
