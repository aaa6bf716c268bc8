"""Engines and sessions for Postgres (service) and SQLite (embedded), and the schema upgrade for embedded mode."""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker

from helip.settings import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = REPO_ROOT / "migrations"

_engines: dict[str, Engine] = {}
_lock = threading.Lock()
_upgraded: set[str] = set()


def make_engine(url: str) -> Engine:
    """A new engine for `url`; SQLite gets WAL and a busy timeout so the API and a worker can share the file."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:  # a DB-API connection
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # pre_ping: a worker holds its engine for hours and Postgres may have dropped idle connections meanwhile.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def get_engine(url: str) -> Engine:
    """The process-wide engine for `url` (one pool per URL)."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


def session_factory(settings: Settings) -> sessionmaker[Session]:
    """Sessions on the settings' database; objects stay readable after commit (expire_on_commit=False)."""
    if settings.embedded:
        ensure_schema(settings)
    return sessionmaker(bind=get_engine(str(settings.database_url)), expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that commits on success and rolls back on error: for the worker and the CLI."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):  # -> alembic.config.Config (imported lazily: alembic is only needed here)
    """An Alembic config for `url` that works from any working directory."""
    from alembic.config import Config

    cfg = Config(str(REPO_ROOT / "alembic.ini")) if (REPO_ROOT / "alembic.ini").exists() else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """`alembic upgrade` programmatically (embedded mode at startup, and the migrate command)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def upgrade_database(settings: Settings) -> None:
    """`helip migrate` / the compose file's one-shot migrate service: the settings' database to head."""
    if settings.embedded:
        _upgraded.discard(str(settings.database_url))
        ensure_schema(settings)  # same file lock as the API and worker use
    else:
        upgrade(str(settings.database_url))


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def ensure_schema(settings: Settings) -> None:
    """Embedded (SQLite) mode only: bring the schema to head once per process. Production runs a migrate step."""
    url = str(settings.database_url)
    if not settings.embedded or url in _upgraded:
        return
    with _lock:
        if url in _upgraded:
            return
        # The API and the worker may start together on one SQLite file: serialise their upgrades.
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        with open(settings.data_dir / ".migrate.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                upgrade(url)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        _upgraded.add(url)


def has_schema(engine: Engine) -> bool:
    return inspect(engine).has_table("jobs")
