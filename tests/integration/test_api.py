"""API behaviour against real PostgreSQL, Redis and S3 (no worker needed): auth, validation, policy,
tenant isolation, cancel of a queued job, health/readiness."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.bad_inputs import BAD_JOB_PATCHES, BAD_LIST_QUERIES, raw_json
from tests.integration.conftest import job_body

pytestmark = pytest.mark.integration


def test_health_and_readiness(api: str) -> None:
    assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    assert httpx.get(f"{api}/docs").status_code == 200


def test_missing_bad_and_revoked_keys_are_401(api: str, cli: Any) -> None:
    r = httpx.get(f"{api}/v1/jobs")
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "unauthorized"
    assert (
        httpx.get(f"{api}/v1/jobs", headers={"Authorization": "Bearer must_nope"}).status_code
        == 401
    )
    key = cli("keys", "create", "--tenant", "tenant-revoke").stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{api}/v1/jobs", headers=headers).status_code == 200
    listing = cli("keys", "list").stdout
    assert key[:12] in listing and key not in listing  # the secret is never listed
    cli("keys", "revoke", key[:12])
    assert httpx.get(f"{api}/v1/jobs", headers=headers).status_code == 401


@pytest.fixture(scope="module")
def escape_link(datasets_root: Path, tmp_root: Path) -> str:
    outside = tmp_root / "outside"
    outside.mkdir(exist_ok=True)
    link = datasets_root / "escape"
    if not link.exists():
        os.symlink(outside, link)
    return f"file://{link}"


@pytest.mark.parametrize(
    ("uri", "status", "code"),
    [
        ("ftp://example.com/data.zip", 422, "invalid_uri"),
        ("s3://Bad_Bucket/x/", 422, "invalid_uri"),
        ("s3://test-must-datasets/a/../b/", 422, "invalid_uri"),
        ("file://relative/path", 422, "invalid_uri"),
        ("file:///etc", 403, "uri_forbidden"),
        ("ROOT/../../etc", 403, "uri_forbidden"),
        ("ROOT/does-not-exist", 403, "uri_forbidden"),
        ("ESCAPE", 403, "uri_forbidden"),
        ("http://127.0.0.1:9/data.zip", 403, "uri_forbidden"),
        ("http://169.254.169.254/latest/data.tar.gz", 403, "uri_forbidden"),
        ("http://[::1]/data.tgz", 403, "uri_forbidden"),
        ("https://example.com/data.txt", 422, "invalid_uri"),
        ("https://user:pw@example.com/data.zip", 422, "invalid_uri"),
    ],
)
def test_bad_uris_and_policy_violations_are_4xx(
    client_a: httpx.Client,
    datasets_root: Path,
    escape_link: str,
    tiny_config_uri: str,
    uri: str,
    status: int,
    code: str,
) -> None:
    uri = uri.replace("ROOT", f"file://{datasets_root}").replace("ESCAPE", escape_link)
    r = client_a.post("/v1/jobs", json=job_body(uri, tiny_config_uri))
    assert r.status_code == status, r.text
    body = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert body["code"] == code and body["status"] == status and body["type"] == f"/problems/{code}"
    assert body["instance"] == "/v1/jobs"


@pytest.mark.parametrize(
    ("patch", "code"),
    [
        ({"params": {"epochs": 1, "no_such_param": 3}}, "invalid_config"),
        ({"params": {"preset": "nope"}}, "invalid_config"),
        ({"params": {"device": "cuda"}}, "invalid_config"),
        ({"params": {"stop_check_every_steps": 1000}}, "invalid_config"),
        ({"params": {"num_processes": 9}}, "invalid_config"),  # above api.max_processes_per_job
        ({"params": {"batch_size": 10, "num_processes": 4}}, "invalid_config"),  # 10 % 4 != 0
        ({"params": {"batch_size": 64, "micro_batch_size": 48}}, "invalid_config"),
        ({"params": {"epochs": 0}}, "validation_error"),
        ({"class_names": ["only-one"]}, "validation_error"),
        ({"class_names": ["a", "a"]}, "validation_error"),
        ({"templates": ["no placeholder"]}, "validation_error"),
        ({"base_model": {"arch": "x", "config_uri": "file:///etc/passwd"}}, "uri_forbidden"),
    ],
)
def test_invalid_requests(
    client_a: httpx.Client, upload: Any, tiny_config_uri: str, patch: dict[str, Any], code: str
) -> None:
    body = {**job_body("s3://test-must-datasets/none/", tiny_config_uri), **patch}
    r = client_a.post("/v1/jobs", json=body)
    assert r.status_code in (403, 422), r.text
    assert r.json()["code"] == code


def test_tenant_isolation_and_queued_cancel(
    client_a: httpx.Client, client_b: httpx.Client, tiny_config_uri: str
) -> None:
    r = client_a.post(
        "/v1/jobs", json=job_body("s3://test-must-datasets/isolation/", tiny_config_uri)
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["attempt"] == 0
    jid = job["id"]
    # The other tenant cannot see, list or cancel it: 404, not 403 (no existence leak).
    assert client_b.get(f"/v1/jobs/{jid}").status_code == 404
    assert client_b.post(f"/v1/jobs/{jid}/cancel").json()["code"] == "not_found"
    assert jid not in [j["id"] for j in client_b.get("/v1/jobs").json()["items"]]
    assert jid in [j["id"] for j in client_a.get("/v1/jobs").json()["items"]]
    assert client_a.get("/v1/jobs/not-a-uuid").status_code == 422
    # Cancel a queued job: immediate and idempotent; the worker will never start it.
    first = client_a.post(f"/v1/jobs/{jid}/cancel")
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    again = client_a.post(f"/v1/jobs/{jid}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    listed = client_a.get("/v1/jobs", params={"status": "cancelled", "limit": 5}).json()
    assert jid in [j["id"] for j in listed["items"]] and listed["limit"] == 5
    assert client_a.get("/v1/jobs", params={"status": "bogus"}).status_code == 422


@pytest.mark.parametrize("patch", BAD_JOB_PATCHES, ids=lambda p: ascii(p)[:40])
def test_unstorable_input_is_422_and_commits_nothing_on_postgres(
    api: str, cli: Any, tiny_config_uri: str, patch: dict[str, Any]
) -> None:
    key = cli("keys", "create", "--tenant", "tenant-bad-input").stdout.strip()
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    body = {**job_body("s3://test-must-datasets/none/", tiny_config_uri), **patch}
    r = httpx.post(f"{api}/v1/jobs", headers=headers, content=raw_json(body))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    listed = httpx.get(f"{api}/v1/jobs", headers=headers)
    assert listed.status_code == 200 and listed.json()["total"] == 0
    for query in BAD_LIST_QUERIES:
        assert httpx.get(f"{api}/v1/jobs", headers=headers, params=query).status_code == 422


def test_local_dir_and_artifact_bucket_follow_the_uri_policy(
    client_a: httpx.Client, client_b: httpx.Client, tiny_config_uri: str, s3: dict[str, Any]
) -> None:
    dataset = "s3://test-must-datasets/none/"

    def submit(client: httpx.Client, **base_model: Any) -> httpx.Response:
        body = job_body(dataset, tiny_config_uri)
        body["base_model"] = {**body["base_model"], **base_model}
        return client.post("/v1/jobs", json=body)

    for arch in ("local-dir:/etc", "local-dir:/no/such/folder"):
        r = submit(client_a, arch=arch)
        assert (r.status_code, r.json()["code"]) == (403, "uri_forbidden"), r.text
        assert "inside the allowed roots" in r.json()["detail"]  # same answer, existing or not
        zs = client_a.post(
            "/v1/classify",
            json={"base_model": {"arch": arch}, "class_names": ["a", "b"], "images": ["AAAA"]},
        )
        assert (zs.status_code, zs.json()["code"]) == (403, "uri_forbidden"), zs.text
    theirs = submit(client_b).json()["id"]
    mine = submit(client_a).json()["id"]
    artifacts = f"s3://{s3['bucket']}/jobs"
    details = set()
    for job_id in (theirs, "00000000-0000-4000-8000-000000000000"):
        r = submit(client_a, checkpoint_uri=f"{artifacts}/{job_id}/checkpoints/last.pt")
        assert (r.status_code, r.json()["code"]) == (403, "uri_forbidden"), r.text
        details.add(r.json()["detail"])
    assert len(details) == 1  # another tenant's job and no job look the same
    own = submit(client_a, checkpoint_uri=f"{artifacts}/{mine}/checkpoints/last.pt")
    assert own.status_code == 202, own.text
    for client, job_id in ((client_b, theirs), (client_a, mine), (client_a, own.json()["id"])):
        client.post(f"/v1/jobs/{job_id}/cancel")


def test_concurrent_submissions_with_one_idempotency_key_make_one_job(
    api: str, cli: Any, tiny_config_uri: str
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    key = cli("keys", "create", "--tenant", "tenant-idem").stdout.strip()
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "same-submission"}
    body = job_body("s3://test-must-datasets/idem/", tiny_config_uri)
    with ThreadPoolExecutor(8) as pool:
        rs = list(
            pool.map(lambda _: httpx.post(f"{api}/v1/jobs", headers=headers, json=body), range(8))
        )
    assert all(r.status_code == 202 for r in rs), [r.text for r in rs if r.status_code != 202]
    assert len({r.json()["id"] for r in rs}) == 1
    listed = httpx.get(f"{api}/v1/jobs", headers=headers).json()
    assert listed["total"] == 1
    httpx.post(f"{api}/v1/jobs/{rs[0].json()['id']}/cancel", headers=headers)
