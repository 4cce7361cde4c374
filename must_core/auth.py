"""API keys: random 256-bit tokens shown once, stored as SHA-256 hashes, each bound to a tenant."""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from must_core.db.base import utcnow
from must_core.db.models import ApiKey, Tenant
from must_core.jobs.queries import NotFoundError, get_or_create_tenant

KEY_PREFIX = "must_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, tenant_name: str, name: str = "") -> tuple[ApiKey, str]:
    """Create a key for the tenant (created if new). Returns the row and the plaintext key."""
    tenant = get_or_create_tenant(session, tenant_name)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        tenant_id=tenant.id, name=name, prefix=plaintext[:12], key_hash=hash_key(plaintext)
    )
    session.add(row)
    session.flush()
    return row, plaintext


def authenticate(session: Session, key: str) -> uuid.UUID | None:
    """The tenant id of an active key, or None."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    row = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
    if row is None:
        return None
    session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=utcnow()))
    return row.tenant_id


def list_keys(session: Session) -> list[tuple[ApiKey, str]]:
    rows = session.execute(
        select(ApiKey, Tenant.name)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .order_by(ApiKey.created_at)
    ).all()
    return [(k, t) for k, t in rows]


def revoke_key(session: Session, key_id_or_prefix: str) -> ApiKey:
    query = select(ApiKey)
    try:
        query = query.where(ApiKey.id == uuid.UUID(key_id_or_prefix))
    except ValueError:
        query = query.where(ApiKey.prefix == key_id_or_prefix)
    rows = session.scalars(query).all()
    if len(rows) != 1:
        raise NotFoundError(f"no single API key matches {key_id_or_prefix!r}")
    row = rows[0]
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row
