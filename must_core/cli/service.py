"""Service commands: ``must serve`` (API + worker on one machine), ``must keys``, ``must migrate``.

``must serve`` starts the API (uvicorn) and a Celery worker as subprocesses, so ``must_core`` never
imports the web or queue packages.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_logger = logging.getLogger("must.serve")


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the API and a worker on this machine (embedded mode)")
    serve.add_argument("--host", help="bind address (default: MUST_API__HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: MUST_API__PORT or 8000)")
    serve.add_argument("--data-dir", type=Path, help="database, broker, artifacts (MUST_DATA_DIR)")
    serve.add_argument(
        "--require-keys",
        action="store_true",
        help="require API keys even on 127.0.0.1 (always required elsewhere)",
    )
    serve.add_argument(
        "--allow-root",
        action="append",
        type=Path,
        default=[],
        help="folder file:// dataset URIs may read (repeatable; default: data dir"
        " 'datasets/' plus MUST_DATASETS__ALLOWED_ROOTS)",
    )
    serve.add_argument("--worker-threads", type=int, help="torch threads of the worker")
    serve.add_argument("--no-worker", action="store_true", help="API only")
    serve.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="manage API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--tenant", required=True, help="tenant name (created if new)")
    create.add_argument("--name", default="", help="label for this key")
    create.set_defaults(func=cmd_keys_create)
    lst = ksub.add_parser("list", help="list keys (never the secrets)")
    lst.set_defaults(func=cmd_keys_list)
    revoke = ksub.add_parser("revoke", help="revoke a key by id or prefix")
    revoke.add_argument("key", help="key id (UUID) or the 12-character prefix shown by list")
    revoke.set_defaults(func=cmd_keys_revoke)

    migrate = sub.add_parser("migrate", help="apply database migrations (alembic upgrade head)")
    migrate.set_defaults(func=cmd_migrate)


# ---- migrations ------------------------------------------------------------------------------------
def upgrade_database(url: str) -> None:
    """``alembic upgrade head`` on ``url`` (migrations ship as the ``migrations`` package)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(cfg, "head")


def _migrations_dir() -> Path:
    """The Alembic scripts: the ``migrations`` package when importable, else the source checkout."""
    try:
        import migrations

        return Path(migrations.__file__).parent
    except ImportError:
        here = Path(__file__).resolve().parents[2] / "migrations"
        if (here / "env.py").is_file():
            return here
        raise RuntimeError(
            "Alembic migrations not found: run from the source checkout or install the "
            "'migrations' package"
        ) from None


def cmd_migrate(args: argparse.Namespace) -> int:
    from must_core.settings import get_settings

    upgrade_database(get_settings().database_url)
    print("database is at the latest revision")
    return 0


# ---- keys ------------------------------------------------------------------------------------------
def _sessions() -> Any:
    from must_core.db.session import make_engine, make_sessionmaker
    from must_core.settings import get_settings

    settings = get_settings()
    if settings.database_url.startswith("sqlite"):
        upgrade_database(settings.database_url)  # embedded: the schema may not exist yet
    return make_sessionmaker(make_engine(settings.database_url, null_pool=True))


def cmd_keys_create(args: argparse.Namespace) -> int:
    from must_core import auth
    from must_core.db.session import session_scope

    with session_scope(_sessions()) as s:
        row, plaintext = auth.create_key(s, args.tenant, args.name)
        key_id = row.id
    print(plaintext)
    print(
        f"# key id {key_id} for tenant {args.tenant!r}; store it now, it is not shown again",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from must_core import auth
    from must_core.db.session import session_scope

    with session_scope(_sessions()) as s:
        rows = auth.list_keys(s)
        print(f"{'id':36}  {'prefix':12}  {'tenant':20}  {'name':16}  status")
        for key, tenant in rows:
            state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
            print(f"{key.id!s:36}  {key.prefix:12}  {tenant:20}  {key.name:16}  {state}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from must_core import auth
    from must_core.db.session import session_scope
    from must_core.errors import MustError

    try:
        with session_scope(_sessions()) as s:
            row = auth.revoke_key(s, args.key)
            print(f"revoked {row.id} ({row.prefix})")
    except MustError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


# ---- serve -----------------------------------------------------------------------------------------
def serve_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment for the API and worker subprocesses: settings + per-process thread counts."""
    env = dict(os.environ)
    if args.data_dir is not None:
        env["MUST_DATA_DIR"] = str(args.data_dir.resolve())
    if args.host:
        env["MUST_API__HOST"] = args.host
    if args.port:
        env["MUST_API__PORT"] = str(args.port)
    if args.worker_threads:
        env["MUST_WORKER__NUM_THREADS"] = str(args.worker_threads)
    from must_core.settings import LOOPBACK_HOSTS, ApiSettings, Settings

    host = env.get("MUST_API__HOST", ApiSettings().host)
    if "MUST_API__AUTH" not in env:
        env["MUST_API__AUTH"] = (
            "keys" if args.require_keys or host not in LOOPBACK_HOSTS else "none"
        )
    roots = [str(p.resolve()) for p in args.allow_root]
    if roots or "MUST_DATASETS__ALLOWED_ROOTS" not in env:
        default_data = Settings.model_fields["data_dir"].default
        data_dir = Path(env.get("MUST_DATA_DIR", str(default_data))).resolve()
        default_root = data_dir / "datasets"
        default_root.mkdir(parents=True, exist_ok=True)
        import json

        existing = json.loads(env.get("MUST_DATASETS__ALLOWED_ROOTS", "[]"))
        env["MUST_DATASETS__ALLOWED_ROOTS"] = json.dumps([*existing, str(default_root), *roots])
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    env = serve_env(args)
    os.environ.update(env)
    from must_core.logging import configure
    from must_core.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    configure(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _logger.info("database %s", settings.database_url)
    upgrade_database(settings.database_url)
    from must_core.jobs.broker import ensure_broker_dirs

    ensure_broker_dirs(settings)
    if settings.api.auth == "none":
        _logger.warning(
            "embedded mode WITHOUT API keys: bound to %s only; use --require-keys or bind "
            "elsewhere to enforce keys",
            settings.api.host,
        )
    api_env = {**env, "OMP_NUM_THREADS": str(settings.api.num_threads)}
    worker_env = {**env, "OMP_NUM_THREADS": str(settings.worker_threads)}
    py = sys.executable
    procs: dict[str, subprocess.Popen[bytes]] = {}
    procs["api"] = subprocess.Popen(
        [
            py,
            "-m",
            "uvicorn",
            "api.main:create_app",
            "--factory",
            "--host",
            settings.api.host,
            "--port",
            str(settings.api.port),
            "--workers",
            "1",
            "--http",
            "api.server:TimedH11Protocol",
            "--no-access-log",
        ],
        env=api_env,
    )
    if not args.no_worker:
        procs["worker"] = subprocess.Popen(
            [
                py,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "worker",
                "-Q",
                settings.worker.queue,
                "--pool=prefork",
                "--concurrency=1",
                "--max-tasks-per-child=1",
                "--without-gossip",
                "--without-mingle",
                "-n",
                f"must-{os.getpid()}@%h",
                "-l",
                settings.log_level.upper(),
            ],
            env=worker_env,
        )
    _logger.info(
        "must serve: API on http://%s:%d (docs at /docs), worker threads %d, API threads %d, "
        "data in %s",
        settings.api.host,
        settings.api.port,
        settings.worker_threads,
        settings.api.num_threads,
        settings.data_dir.resolve(),
    )
    return _supervise(procs, (settings.api.host, settings.api.port))


def _accepts(address: tuple[str, int]) -> bool:
    import socket

    try:
        with socket.create_connection(address, timeout=0.5):
            return True
    except OSError:
        return False


def _supervise(procs: dict[str, subprocess.Popen[bytes]], address: tuple[str, int]) -> int:
    """Wait on the children; log "ready" once the API port accepts connections."""
    stopping = False

    def _stop(signum: int, _: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    code = 0
    started, ready = time.monotonic(), False
    while not stopping:
        if not ready and _accepts(address):
            ready = True
            _logger.info(
                "ready: http://%s:%d accepts connections (%.1fs after start)",
                *address,
                time.monotonic() - started,
            )
        for name, proc in procs.items():
            if proc.poll() is not None:
                _logger.error("%s exited with status %s; stopping", name, proc.returncode)
                code = proc.returncode or 1
                stopping = True
        time.sleep(0.5)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the service commands alone: ``python -m must_core.cli.service serve``."""
    parser = argparse.ArgumentParser(prog="must", description="MUST service commands")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
