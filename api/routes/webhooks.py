"""/v1/webhooks: a tenant's webhook endpoints, its callback secret and the delivery records."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Query, Response, status
from fastapi import Path as PathParam
from sqlalchemy import delete, select

from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import ApiError
from must_core.db.models import WebhookDelivery, WebhookEndpoint
from must_core.jobs.schemas import (
    DeliveryList,
    DeliveryRead,
    WebhookCreate,
    WebhookList,
    WebhookRead,
    WebhookSecret,
)
from must_core.webhooks.outbox import tenant_secret
from must_core.webhooks.signing import new_secret
from must_core.webhooks.urls import validate_webhook_url

router = APIRouter(prefix="/webhooks", tags=["webhooks"])
_404: dict[int | str, dict[str, Any]] = {404: {"description": "No such endpoint for this tenant"}}
MAX_ENDPOINTS = 20


@router.post(
    "/endpoints",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookRead,
    responses={
        403: {"description": "URL refused by the SSRF policy (uri_forbidden)"},
        409: {"description": "Too many endpoints (too_many_webhooks)"},
        422: {"description": "invalid_uri or validation_error"},
    },
)
def create_webhook(
    body: WebhookCreate, session: SessionDep, tenant: TenantDep, settings: SettingsDep
) -> WebhookRead:
    """Register an endpoint for this tenant's job events. The response carries the endpoint's
    signing ``secret`` once; keep it to verify ``Must-Signature``."""
    validate_webhook_url(body.url, settings.webhooks)
    count = len(
        session.scalars(select(WebhookEndpoint.id).where(WebhookEndpoint.tenant_id == tenant)).all()
    )
    if count >= MAX_ENDPOINTS:
        raise ApiError("too_many_webhooks", f"at most {MAX_ENDPOINTS} webhook endpoints")
    endpoint = WebhookEndpoint(
        tenant_id=tenant, url=body.url, secret=new_secret(), events=sorted(set(body.events))
    )
    session.add(endpoint)
    session.commit()
    return _view(endpoint, with_secret=True)


@router.get("/endpoints", response_model=WebhookList)
def list_webhooks(session: SessionDep, tenant: TenantDep) -> WebhookList:
    """The tenant's endpoints (without their secrets)."""
    rows = session.scalars(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.tenant_id == tenant)
        .order_by(WebhookEndpoint.created_at)
    ).all()
    return WebhookList(items=[_view(e) for e in rows])


def _view(e: WebhookEndpoint, *, with_secret: bool = False) -> WebhookRead:
    """Never the secret, except in the response that creates it."""
    return WebhookRead(
        id=e.id,
        url=e.url,
        events=list(e.events),
        created_at=e.created_at,
        secret=e.secret if with_secret else None,
    )


WebhookId = PathParam(description="the endpoint's id")


@router.delete("/endpoints/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_404)
def delete_webhook(
    session: SessionDep,
    tenant: TenantDep,
    webhook_id: uuid.UUID = WebhookId,
) -> Response:
    """Remove an endpoint; its pending deliveries go with it."""
    res = session.execute(
        delete(WebhookEndpoint).where(
            WebhookEndpoint.id == webhook_id, WebhookEndpoint.tenant_id == tenant
        )
    )
    if int(res.rowcount) == 0:  # type: ignore[attr-defined]
        raise ApiError("not_found", f"webhook {webhook_id} not found")
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/secret", response_model=WebhookSecret)
def callback_secret(session: SessionDep, tenant: TenantDep) -> WebhookSecret:
    """The secret that signs deliveries to jobs' ``callback_url`` (created on first call)."""
    secret = tenant_secret(session, tenant)
    session.commit()
    return WebhookSecret(secret=secret)


@router.get("/deliveries", response_model=DeliveryList)
def list_deliveries(
    session: SessionDep,
    tenant: TenantDep,
    job_id: uuid.UUID | None = Query(None, description="only this job's deliveries"),
    limit: int = Query(50, ge=1, le=500),
) -> DeliveryList:
    """Delivery records, newest first: status, attempts, last HTTP status and error."""
    query = select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant)
    if job_id is not None:
        query = query.where(WebhookDelivery.job_id == job_id)
    rows = session.scalars(query.order_by(WebhookDelivery.created_at.desc()).limit(limit)).all()
    return DeliveryList(items=[DeliveryRead.model_validate(d) for d in rows])
