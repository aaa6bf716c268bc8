"""Alembic: upgrade head and downgrade base on fresh Postgres and SQLite databases, and no drift from the models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from helip import db
from helip.settings import Settings
from helip.tables import Base

ROOT = Path(__file__).resolve().parent.parent
TABLES = {"jobs", "events", "step_metrics", "eval_results", "checkpoints", "artifacts", "webhook_deliveries",
          "mining_shards"}


def _diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_postgres_upgrade_downgrade_and_no_drift(make_pg_database) -> None:
    url = make_pg_database()
    assert _tables(url) == set()
    db.upgrade(url)
    assert _tables(url) == TABLES | {"alembic_version"}
    assert _diff(url) == []  # the migration creates exactly what the models declare
    engine = create_engine(url)
    try:
        idx = {i["name"] for i in inspect(engine).get_indexes("jobs")}
        uniques = {tuple(u["column_names"]) for u in inspect(engine).get_unique_constraints("step_metrics")}
    finally:
        engine.dispose()
    assert {"ix_jobs_owner_created", "ix_jobs_status_heartbeat"} <= idx
    assert ("job_id", "step", "run") in uniques
    db.downgrade(url)
    assert _tables(url) == {"alembic_version"}
    db.upgrade(url)  # and back up again: downgrade left nothing behind that blocks it
    assert _diff(url) == []


def test_alembic_command_line_with_x_url(make_pg_database) -> None:
    from alembic.script import ScriptDirectory

    url = make_pg_database()
    HEAD = ScriptDirectory.from_config(db.alembic_config(url)).get_current_head()  # noqa: N806
    assert HEAD is not None
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    for args in (["upgrade", "head"], ["downgrade", "base"]):
        out = subprocess.run([sys.executable, "-m", "alembic", "-x", f"url={url}", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        if args == ["upgrade", "head"]:
            assert _tables(url) == TABLES | {"alembic_version"}
            engine = create_engine(url)
            try:
                with engine.connect() as conn:
                    assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == HEAD
            finally:
                engine.dispose()
    assert _tables(url) == {"alembic_version"}


def test_sqlite_embedded_schema(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # embedded defaults: SQLite under data_dir
    url = str(settings.database_url)
    assert url == f"sqlite:///{tmp_path.resolve() / 'helip.sqlite'}"
    db.upgrade_database(settings)  # what `helip migrate` runs
    assert _tables(url) == TABLES | {"alembic_version"}
    assert _diff(url) == []
    db.downgrade(url)
    assert _tables(url) == {"alembic_version"}


def test_offline_sql_renders(tmp_path: Path) -> None:
    """`alembic upgrade head --sql` (what an operator reviews before a migration) renders CREATE TABLEs."""
    out = subprocess.run([sys.executable, "-m", "alembic", "-x", "url=postgresql+psycopg://u@h/db", "upgrade",
                          "head", "--sql"], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for table in TABLES:
        assert f"CREATE TABLE {table}" in out.stdout
