"""The webhook outbox: terminal job events become delivery rows in the same transaction that marks
the job notified, and a relay (the worker's sweeper thread) sends due rows with retries.

Nothing is fire-and-forget: an event exists once its row is committed; a sender that dies mid-attempt
leaves the row leased (``next_attempt_at`` pushed by ``lease_s``), and the next relay retries it.
Delivery is at least once; receivers de-duplicate on ``Must-Delivery``.
"""

from __future__ import annotations

import json
import logging
import random
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from must_core.datasets.errors import UriPolicyError
from must_core.datasets.fetch import pinned_opener
from must_core.db.base import utcnow
from must_core.db.models import Job, Tenant, WebhookDelivery, WebhookEndpoint
from must_core.db.session import session_scope
from must_core.jobs.states import TERMINAL
from must_core.jobs.views import job_view
from must_core.settings import Settings, WebhookSettings
from must_core.webhooks.signing import new_secret, signed_headers

_logger = logging.getLogger(__name__)

EVENTS = ("job.succeeded", "job.failed", "job.cancelled")


# ---- tenant secret and endpoints ---------------------------------------------------------------------
def tenant_secret(session: Session, tenant_id: uuid.UUID) -> str:
    """The tenant's callback_url signing secret, created on first use."""
    tenant = session.get(Tenant, tenant_id, with_for_update=True)
    assert tenant is not None
    if tenant.webhook_secret is None:
        tenant.webhook_secret = new_secret()
        session.flush()
    return tenant.webhook_secret


# ---- emit: terminal jobs → delivery rows ---------------------------------------------------------------
def emit_due(session: Session, settings: Settings, now: datetime) -> int:
    """Write deliveries for jobs that reached a terminal status not yet announced. Returns rows."""
    window = now - timedelta(seconds=settings.webhooks.emit_window_s)
    due = session.execute(
        select(Job.id, Job.status).where(
            Job.finished_at >= window,
            Job.status.in_([s.value for s in TERMINAL]),
            or_(Job.notified_status.is_(None), Job.notified_status != Job.status),
        )
    ).all()
    written = 0
    for job_id, status in due:
        # conditional: of several relays, exactly one announces this status
        res = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == status,
                or_(Job.notified_status.is_(None), Job.notified_status != status),
            )
            .values(notified_status=status)
        )
        if int(res.rowcount) == 1:  # type: ignore[attr-defined]
            job = session.get(Job, job_id)
            assert job is not None
            written += _write_deliveries(session, job, f"job.{status}", now)
    return written


def _write_deliveries(session: Session, job: Job, event: str, now: datetime) -> int:
    targets: list[tuple[str, uuid.UUID | None]] = []
    callback = (job.spec or {}).get("callback_url")
    if callback:
        targets.append((callback, None))
    endpoints = session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == job.tenant_id)
    ).all()
    targets += [(e.url, e.id) for e in endpoints if event in (e.events or [])]
    data = job_view(job).model_dump(mode="json")
    for url, endpoint_id in targets:
        delivery_id = uuid.uuid4()
        payload = {
            "id": str(delivery_id),
            "type": event,
            "created_at": now.isoformat(),
            "data": data,
        }
        session.add(
            WebhookDelivery(
                id=delivery_id,
                tenant_id=job.tenant_id,
                job_id=job.id,
                endpoint_id=endpoint_id,
                url=url,
                event=event,
                payload=payload,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    session.flush()
    return len(targets)


# ---- deliver: due rows → HTTP POSTs ---------------------------------------------------------------------
class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A webhook is one POST to the registered URL; a redirect is a failed attempt."""

    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None


def post(url: str, body: bytes, headers: dict[str, str], policy: WebhookSettings) -> int:
    """POST through the pinned (SSRF-checked at connect time) opener; returns the HTTP status.

    Raises:
        UriPolicyError: the host now resolves to a refused address (e.g. DNS rebinding).
        OSError / urllib.error.URLError: the receiver could not be reached.
    """
    opener = pinned_opener(policy.allow_private_hosts, _NoRedirects())
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with opener.open(request, timeout=policy.timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def backoff_s(attempts: int, policy: WebhookSettings) -> float:
    """Exponential: base, 2·base, 4·base, ... capped, with ±20 % jitter (no thundering herd)."""
    delay = min(policy.backoff_max_s, policy.backoff_base_s * 2 ** max(0, attempts - 1))
    return float(delay * random.uniform(0.8, 1.2))  # noqa: S311


def _lease(session: Session, policy: WebhookSettings, now: datetime, limit: int) -> list[uuid.UUID]:
    rows = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.next_attempt_at)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    ).all()
    leased = []
    for delivery_id, due in rows:
        res = session.execute(  # conditional: one relay per attempt
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.next_attempt_at == due)
            .values(next_attempt_at=now + timedelta(seconds=policy.lease_s))
        )
        if int(res.rowcount) == 1:  # type: ignore[attr-defined]
            leased.append(delivery_id)
    return leased


def _secret(session: Session, d: WebhookDelivery) -> str:
    if d.endpoint_id is not None:
        endpoint = session.get(WebhookEndpoint, d.endpoint_id)
        if endpoint is not None:
            return endpoint.secret
    return tenant_secret(session, d.tenant_id)


def _attempt(
    sessions: sessionmaker[Session], policy: WebhookSettings, delivery_id: uuid.UUID
) -> bool:
    with session_scope(sessions) as s:
        d = s.get(WebhookDelivery, delivery_id)
        if d is None or d.status != "pending":
            return False
        body = json.dumps(d.payload, separators=(",", ":"), sort_keys=True).encode()
        headers = signed_headers(_secret(s, d), body, d.event, str(d.id))
        url, attempts = d.url, d.attempts + 1
    code: int | None = None
    error: str | None = None
    try:
        code = post(url, body, headers, policy)
        if not 200 <= code < 300:
            error = f"HTTP {code}"
    except UriPolicyError as exc:
        error = f"refused: {exc.message}"
    except (OSError, urllib.error.URLError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    now = utcnow()
    values: dict[str, Any] = {"attempts": attempts, "last_status_code": code, "last_error": error}
    if error is None:
        values.update(status="delivered", delivered_at=now)
    elif attempts >= policy.max_attempts:
        values.update(status="failed")
    else:
        values.update(next_attempt_at=now + timedelta(seconds=backoff_s(attempts, policy)))
    with session_scope(sessions) as s:
        s.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values))
    if error is not None:
        _logger.warning(
            "webhook %s to %s: attempt %d failed (%s)", delivery_id, url, attempts, error
        )
    return error is None


def relay_webhooks(settings: Settings, sessions: sessionmaker[Session], limit: int = 50) -> int:
    """Emit due events, then attempt due deliveries; returns the number delivered."""
    now = utcnow()
    with session_scope(sessions) as s:
        emit_due(s, settings, now)
        leased = _lease(s, settings.webhooks, now, limit)
    return sum(_attempt(sessions, settings.webhooks, d) for d in leased)
