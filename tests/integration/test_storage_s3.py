"""S3Store against the real S3-compatible server: large (multipart) objects round-trip intact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def test_multipart_round_trip_and_prefix_ops(s3: dict[str, Any], tmp_path: Path) -> None:
    from must_core.storage.s3 import S3Store, make_s3_client

    client = make_s3_client(
        endpoint_url=s3["endpoint"],
        region="us-east-1",
        access_key_id=s3["key"],
        secret_access_key=s3["secret"],
    )
    store = S3Store(client, s3["bucket"], prefix="roundtrip/")
    src = tmp_path / "big.bin"
    payload = os.urandom(20 * 2**20)  # > 8 MiB: multipart upload and ranged, parallel download
    src.write_bytes(payload)
    store.put_file(src, "jobs/x/checkpoints/last.pt")
    dst = tmp_path / "back.bin"
    store.get_file("jobs/x/checkpoints/last.pt", dst)
    assert dst.read_bytes() == payload
    assert store.exists("jobs/x/checkpoints/last.pt")
    assert store.size("jobs/x/checkpoints/last.pt") == len(payload)
    assert store.list_keys("jobs/x/") == ["jobs/x/checkpoints/last.pt"]
    # A single-PUT object above the 8 MiB download threshold (as uploaded by many tools): the server
    # returns the whole-object checksum on each ranged GET; downloads must still succeed.
    single = os.urandom(12 * 2**20)
    s3["client"].put_object(Bucket=s3["bucket"], Key="roundtrip/jobs/x/single.bin", Body=single)
    store.get_file("jobs/x/single.bin", tmp_path / "single.bin")
    assert (tmp_path / "single.bin").read_bytes() == single
    assert store.delete_prefix("jobs/x/") == 2
    assert not store.exists("jobs/x/checkpoints/last.pt")
