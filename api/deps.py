"""Request dependencies as ``Annotated`` aliases (swap them in tests via dependency_overrides)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.queue import JobQueue
from must_core import auth
from must_core.db.session import session_scope
from must_core.jobs.queries import DEFAULT_TENANT, get_or_create_tenant
from must_core.ratelimit import FailureLimiter
from must_core.settings import Settings
from must_core.storage import ArtifactStore


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One unit of work per request: commit on success, roll back on error."""
    with session_scope(request.app.state.sessions) as session:
        yield session


def get_store(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.store
    return store


def get_queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.queue
    return queue


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


def get_tenant(request: Request, session: SessionDep, settings: SettingsDep) -> uuid.UUID:
    """The caller's tenant from ``Authorization: Bearer <key>``.

    With ``MUST_API__AUTH=none`` (loopback only) a call without a key acts as the default tenant.
    Failed attempts count per client address and per presented key (429 over the limit).
    """
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header and settings.api.auth == "none":
        return get_or_create_tenant(session, DEFAULT_TENANT).id
    limiter: FailureLimiter = request.app.state.auth_limiter
    subjects = _subjects(request, token.strip())
    limiter.check(*subjects)
    try:
        return _authenticate(session, scheme, token.strip(), header)
    except ApiError:
        limiter.failed(*subjects)
        raise


def _subjects(request: Request, token: str) -> tuple[str, ...]:
    address = f"addr:{request.client.host if request.client else '?'}"
    return (address, f"key:{auth.hash_key(token)}") if token else (address,)


def _authenticate(session: Session, scheme: str, token: str, header: str) -> uuid.UUID:
    if not header:
        raise ApiError("unauthorized", "missing API key: send 'Authorization: Bearer <api key>'")
    if scheme.lower() != "bearer" or not token:
        raise ApiError("unauthorized", "use 'Authorization: Bearer <api key>'")
    tenant_id = auth.authenticate(session, token)
    if tenant_id is None:
        raise ApiError("unauthorized", "unknown or revoked API key")
    return tenant_id


TenantDep = Annotated[uuid.UUID, Depends(get_tenant)]


def get_tenant_short(request: Request, settings: SettingsDep) -> uuid.UUID:
    """Like :func:`get_tenant`, but with its own short session: routes that then spend long on
    inference (``/classify``) must not hold a pooled connection for the whole request."""
    with session_scope(request.app.state.sessions) as session:
        return get_tenant(request, session, settings)


ShortTenantDep = Annotated[uuid.UUID, Depends(get_tenant_short)]
