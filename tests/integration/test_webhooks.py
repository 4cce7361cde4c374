"""Webhooks against the real services: a job's callback_url and a registered endpoint both receive a
signed event when the job ends; a receiver that fails twice gets the event on the third attempt with
the same delivery id; the deliveries are recorded."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from must_core.webhooks.signing import verify
from tests.integration.conftest import job_body
from tests.integration.helpers import Proc, make_images, start_worker, wait_for, wait_job

pytestmark = pytest.mark.integration


class Receiver:
    """A real HTTP server on 127.0.0.1 recording every POST; fails the first ``fail_first``."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append({"headers": dict(self.headers), "body": body})
                ok = len(receiver.calls) > receiver.fail_first
                self.send_response(204 if ok else 500)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def worker(service_env: dict[str, str], log_dir: Path) -> Iterator[Proc]:
    proc = start_worker(service_env, log_dir, name="worker-webhooks")
    yield proc
    proc.stop()


def _check_signed(call: dict[str, Any], secret: str) -> dict[str, Any]:
    h = {k.lower(): v for k, v in call["headers"].items()}
    assert verify(secret, call["body"], h["must-timestamp"], h["must-signature"])
    assert not verify("whsec_wrong", call["body"], h["must-timestamp"], h["must-signature"])
    assert not verify(secret, call["body"] + b" ", h["must-timestamp"], h["must-signature"])
    event: dict[str, Any] = json.loads(call["body"])
    assert h["must-event"] == event["type"] and h["must-delivery"] == event["id"]
    return event


def test_callback_and_endpoint_signed_with_retry(
    worker: Proc, client_a: httpx.Client, upload: Any, tiny_config_uri: str, stamp: str
) -> None:
    callback = Receiver(fail_first=2)
    endpoint = Receiver()
    try:
        r = client_a.post(
            "/v1/webhooks/endpoints", json={"url": endpoint.url, "events": ["job.succeeded"]}
        )
        assert r.status_code == 201, r.text
        hook = r.json()
        assert hook["secret"].startswith("whsec_")
        listed = client_a.get("/v1/webhooks/endpoints").json()["items"]
        assert hook["id"] in [h["id"] for h in listed] and all(h["secret"] is None for h in listed)
        tenant_secret = client_a.get("/v1/webhooks/secret").json()["secret"]

        dataset = upload(f"hooks-{stamp}", make_images(2, ["red", "green", "blue"], seed=31))
        body = {**job_body(dataset, tiny_config_uri, min_steps=3), "callback_url": callback.url}
        jid = client_a.post("/v1/jobs", json=body).json()["id"]
        job = wait_job(client_a, jid, {"succeeded", "failed"}, 240)
        assert job["status"] == "succeeded", (job, worker.log()[-3000:])

        wait_for(lambda: len(callback.calls) >= 3, 60, what="three callback attempts")

        # the endpoint gets every job of the tenant: other tests' jobs may end while it exists
        def endpoint_events() -> list[dict[str, Any]] | None:
            evs = [_check_signed(c, hook["secret"]) for c in endpoint.calls]
            return evs if any(e["data"]["id"] == jid for e in evs) else None

        endpoint_evs = wait_for(endpoint_events, 60, what="the endpoint delivery")
        events = [_check_signed(c, tenant_secret) for c in callback.calls]
        assert len({e["id"] for e in events}) == 1  # one delivery, retried
        assert events[-1]["type"] == "job.succeeded" and events[-1]["data"]["id"] == jid
        assert events[-1]["data"]["model_id"] == job["model_id"]
        ev = next(e for e in endpoint_evs if e["data"]["id"] == jid)
        assert ev["type"] == "job.succeeded"

        def recorded() -> list[dict[str, Any]] | None:
            items = client_a.get("/v1/webhooks/deliveries", params={"job_id": jid}).json()["items"]
            return items if all(d["status"] == "delivered" for d in items) else None

        items = wait_for(recorded, 30, what="deliveries recorded as delivered")
        by_url = {d["url"]: d for d in items}
        assert (
            by_url[callback.url]["attempts"] == 3
            and by_url[callback.url]["last_status_code"] == 204
        )
        assert by_url[endpoint.url]["attempts"] == 1
        assert client_a.delete(f"/v1/webhooks/endpoints/{hook['id']}").status_code == 204
        assert client_a.delete(f"/v1/webhooks/endpoints/{hook['id']}").status_code == 404
    finally:
        callback.close()
        endpoint.close()


def test_webhook_inputs_are_clear_4xx(client_a: httpx.Client) -> None:
    for url in ("ftp://example.com/x", "http://user:pw@example.com/x", "not a url"):
        r = client_a.post("/v1/webhooks/endpoints", json={"url": url})
        assert r.status_code == 422 and r.json()["code"] == "validation_error", r.text
    r = client_a.post(
        "/v1/webhooks/endpoints", json={"url": "https://example.com/x", "events": ["nope"]}
    )
    assert r.status_code == 422 and r.json()["code"] == "validation_error"


def test_outbox_survives_a_dead_sender_and_announces_once(pg_url: str) -> None:
    """On PostgreSQL: a terminal job is announced exactly once even with two relays; a delivery whose
    sender died after leasing it (no attempt recorded) is sent after the lease expires; a receiver
    that keeps failing ends as ``failed`` after max_attempts with every attempt counted."""
    import time

    from must_core.db.models import Job, WebhookDelivery
    from must_core.db.session import make_engine, make_sessionmaker, session_scope
    from must_core.jobs import queries
    from must_core.settings import Settings, WebhookSettings
    from must_core.webhooks import outbox

    good, bad = Receiver(), Receiver(fail_first=10**6)
    settings = Settings(
        webhooks=WebhookSettings(
            allow_private_hosts=True,
            lease_s=1.0,
            backoff_base_s=0.1,
            backoff_max_s=0.2,
            max_attempts=3,
            timeout_s=3,
        )
    )
    sessions = make_sessionmaker(make_engine(pg_url))
    try:
        with session_scope(sessions) as s:
            # the database is shared with earlier tests: their unsent deliveries are not ours to lease
            s.query(WebhookDelivery).filter(WebhookDelivery.status == "pending").update(
                {"status": "failed"}
            )
        with session_scope(sessions) as s:
            tenant = queries.get_or_create_tenant(s, f"outbox-{time.time_ns()}")
            ids = []
            for url in (good.url, bad.url):
                job = queries.create_job(
                    s,
                    tenant.id,
                    {"dataset_uri": "s3://b/p/", "class_names": ["a", "b"], "callback_url": url},
                )
                job.status, job.finished_at = "failed", outbox.utcnow()
                ids.append(job.id)
        with session_scope(sessions) as s:
            assert outbox.emit_due(s, settings, outbox.utcnow()) == 2
            assert outbox.emit_due(s, settings, outbox.utcnow()) == 0  # announced once
            # a sender leases both deliveries and dies before attempting them
            leased = outbox._lease(s, settings.webhooks, outbox.utcnow(), 10)
        assert len(leased) == 2
        assert outbox.relay_webhooks(settings, sessions) == 0  # still leased: nobody sends
        assert good.calls == []
        time.sleep(1.2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            outbox.relay_webhooks(settings, sessions)
            with session_scope(sessions) as s:
                rows = {
                    d.url: d
                    for d in s.query(WebhookDelivery).filter(WebhookDelivery.job_id.in_(ids))
                }
                if rows[good.url].status == "delivered" and rows[bad.url].status == "failed":
                    break
            time.sleep(0.2)
        assert rows[good.url].status == "delivered" and rows[good.url].attempts == 1
        assert rows[bad.url].status == "failed" and rows[bad.url].attempts == 3
        assert rows[bad.url].last_status_code == 500 and len(bad.calls) == 3
        with session_scope(sessions) as s:  # a resumed job that ends again is announced again
            j = s.get(Job, ids[0])
            assert j is not None and j.notified_status == "failed"
            j.status = "cancelled"
            assert outbox.emit_due(s, settings, outbox.utcnow()) == 1
    finally:
        good.close()
        bad.close()
