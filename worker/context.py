"""Per-process resources (engine, store, runner), built lazily after fork, never at import."""

from __future__ import annotations

import threading
from functools import lru_cache

from sqlalchemy.orm import Session, sessionmaker

from must_core.db.session import make_engine, make_sessionmaker
from must_core.settings import get_settings
from must_core.storage import ArtifactStore, make_store
from worker.runner import JobRunner

_lock = threading.Lock()


@lru_cache(maxsize=1)
def sessions() -> sessionmaker[Session]:
    s = get_settings()
    return make_sessionmaker(make_engine(s.database_url, pool_size=2, echo=s.db.echo))


@lru_cache(maxsize=1)
def store() -> ArtifactStore:
    return make_store(get_settings())


def runner() -> JobRunner:
    with _lock:
        return JobRunner(get_settings(), sessions(), store())


def reset_after_fork() -> None:
    """A forked child must not reuse the parent's pooled DB connections."""
    if sessions.cache_info().currsize:
        engine = sessions().kw["bind"]
        engine.dispose(close=False)
    sessions.cache_clear()
    store.cache_clear()
