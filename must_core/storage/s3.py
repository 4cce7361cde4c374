"""S3 artifact store (boto3): AWS, MinIO or any S3-compatible server via ``endpoint_url``."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectTimeoutError as BotoConnectTimeout

from must_core.fsutil import atomic_write
from must_core.storage.base import ObjectNotFoundError, StorageError, TransientStorageError

_TRANSIENT = (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, BotoConnectTimeout)


def make_s3_client(
    *,
    endpoint_url: str | None,
    region: str,
    access_key_id: str | None,
    secret_access_key: str | None,
    addressing_style: str = "path",
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 60.0,
    max_attempts: int = 4,
) -> Any:
    config = Config(
        region_name=region,
        signature_version="s3v4",
        s3={"addressing_style": addressing_style},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        # Validate/compute flexible checksums only where S3 requires them. Some S3-compatible
        # servers (rclone, older MinIO) return the whole-object checksum on *ranged* GETs, which
        # botocore's default validation rejects on every multipart download (files > 8 MiB).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


def translate(exc: Exception, what: str) -> StorageError:
    """Map boto errors to our typed errors (transient ones are retried by the worker)."""
    if isinstance(exc, _TRANSIENT):
        return TransientStorageError(f"{what}: object store unreachable ({type(exc).__name__})")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            return ObjectNotFoundError(f"{what}: not found ({code})")
        if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            return TransientStorageError(f"{what}: object store error {code}")
        return StorageError(f"{what}: {code or status}")
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")


class S3Store:
    """Objects live under ``s3://bucket/prefix``."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def _key(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise StorageError(f"invalid object key {key!r}")
        return self.prefix + key

    def put_file(self, local_path: Path, key: str) -> None:
        try:
            self.client.upload_file(str(local_path), self.bucket, self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"upload {key}") from exc
        except Exception as exc:  # s3transfer wraps errors in its own types
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, BotoCoreError | ClientError):
                raise translate(cause, f"upload {key}") from exc
            raise

    def get_file(self, key: str, local_path: Path) -> None:
        try:
            atomic_write(
                local_path,
                lambda tmp: self.client.download_file(self.bucket, self._key(key), str(tmp)),
            )
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"download {key}") from exc

    def open_read(self, key: str) -> IO[bytes]:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"read {key}") from exc
        body: IO[bytes] = obj["Body"]
        return body

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            err = translate(exc, f"head {key}")
            if isinstance(err, ObjectNotFoundError):
                return False
            raise err from exc
        except BotoCoreError as exc:
            raise translate(exc, f"head {key}") from exc

    def size(self, key: str) -> int:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"head {key}") from exc
        return int(head["ContentLength"])

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    keys.append(obj["Key"][len(self.prefix) :])
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"list {prefix}") from exc
        return keys

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise StorageError("refusing to delete the whole store")
        keys = self.list_keys(prefix)
        try:
            for i in range(0, len(keys), 1000):
                chunk = [{"Key": self.prefix + k} for k in keys[i : i + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk})
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"delete {prefix}") from exc
        return len(keys)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_s,
        )
        return url

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"bucket {self.bucket}") from exc
