"""Build the configured store from settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from must_core.storage.base import ArtifactStore

if TYPE_CHECKING:
    from must_core.settings import Settings


def make_s3_client_from_settings(settings: Settings) -> object:
    from must_core.storage.s3 import make_s3_client

    st = settings.storage
    return make_s3_client(
        endpoint_url=st.endpoint_url,
        region=st.region,
        access_key_id=st.access_key_id.get_secret_value() if st.access_key_id else None,
        secret_access_key=st.secret_access_key.get_secret_value() if st.secret_access_key else None,
        addressing_style=st.addressing_style,
        connect_timeout_s=st.connect_timeout_s,
        read_timeout_s=st.read_timeout_s,
        max_attempts=st.max_attempts,
    )


def make_store(settings: Settings) -> ArtifactStore:
    """``MUST_STORAGE__BACKEND`` picks the backend: ``local`` (default) or ``s3``."""
    if settings.storage.backend == "s3":
        from must_core.storage.s3 import S3Store

        return S3Store(
            make_s3_client_from_settings(settings), settings.storage.bucket, settings.storage.prefix
        )
    from must_core.storage.local import LocalStore

    return LocalStore(settings.storage_root)
