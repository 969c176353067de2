"""A new store made from tables.py (no Alembic) is the store that running every migration makes,
on SQLite and on PostgreSQL, and both are at the newest migration's revision."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.config import Config
from alembic.script import ScriptDirectory

import mljobs.server.store as store_mod
from mljobs.server.store import Store
from mljobs.server.tables import SCHEMA_REVISION
from tests.conftest import PG_URL, pg_available


def _schema(engine: sa.Engine) -> dict[str, Any]:
    """Everything a store's schema is: per table its columns (type, nullability, default), primary
    key, indexes (columns, uniqueness, expressions), unique constraints and foreign keys."""
    insp = sa.inspect(engine)
    out = {}
    for t in sorted(insp.get_table_names()):
        out[t] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"], str(c.get("default"))) for c in insp.get_columns(t)],
            "pk": insp.get_pk_constraint(t)["constrained_columns"],
            "indexes": sorted((i["name"], tuple(map(str, i["column_names"])), bool(i["unique"]),
                               tuple(map(str, i.get("expressions") or ())),
                               str(i.get("column_sorting") or "")) for i in insp.get_indexes(t)),
            "uniques": sorted((u["name"] or "", tuple(u["column_names"])) for u in insp.get_unique_constraints(t)),
            "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                          for f in insp.get_foreign_keys(t)),
        }
    return out


def test_schema_revision_is_the_newest_migration():
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store_mod.__file__).parent / "migrations"))
    assert ScriptDirectory.from_config(cfg).get_current_head() == SCHEMA_REVISION


def _both(url_a: str, url_b: str) -> tuple[dict[str, Any], dict[str, Any]]:
    made, migrated = Store(url_a), Store(url_b)
    try:
        made.migrate()
        migrated.migrate(by_alembic=True)
        for s in (made, migrated):
            with s.engine.connect() as c:
                assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [SCHEMA_REVISION]
        return _schema(made.engine), _schema(migrated.engine)
    finally:
        made.close()
        migrated.close()


def test_a_new_sqlite_store_is_what_the_migrations_make(tmp_path):
    made, migrated = _both(f"sqlite:///{tmp_path / 'made.db'}", f"sqlite:///{tmp_path / 'migrated.db'}")
    assert made == migrated


def test_a_new_postgres_store_is_what_the_migrations_make():
    reason = pg_available()
    if reason:
        pytest.skip(reason)
    eng = sa.create_engine(PG_URL)
    schemas = [f"mljobs_schema_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        with eng.begin() as c:
            for s in schemas:
                c.execute(sa.text(f"CREATE SCHEMA {s}"))
        made, migrated = _both(*(f"{PG_URL}?options=-csearch_path%3D{s}" for s in schemas))
        assert made == migrated
    finally:
        with eng.begin() as c:
            for s in schemas:
                c.execute(sa.text(f"DROP SCHEMA {s} CASCADE"))
        eng.dispose()


def test_a_store_at_an_older_revision_is_upgraded_by_the_migrations(tmp_path):
    from alembic import command

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = Store(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store_mod.__file__).parent / "migrations"))
    with old.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0009")
    old.migrate()
    with old.engine.connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_REVISION
    old.close()
