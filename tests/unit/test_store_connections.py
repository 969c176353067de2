"""The PostgreSQL store's pool pings a connection only after it was idle (store._ping_when_idle),
and still replaces one the database dropped."""

from __future__ import annotations

import sqlalchemy as sa

from mljobs.server import store as store_mod
from mljobs.server.store import Store
from tests.conftest import PG_URL


def _backend(st: Store) -> int:
    with st.engine.connect() as c:
        return int(c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def _drop(pid: int) -> None:
    admin = sa.create_engine(PG_URL)
    try:
        with admin.begin() as c:
            assert c.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar_one()
    finally:
        admin.dispose()


def test_a_connection_the_database_dropped_is_replaced_at_checkout(pg_schema_url, monkeypatch):
    monkeypatch.setattr(store_mod, "_PING_IDLE_S", 0.0)  # every checkout counts as idle: pinged
    st = Store(pg_schema_url)
    try:
        first = _backend(st)
        _drop(first)
        assert _backend(st) != first  # the ping found it dead; the pool gave a fresh one, no error
    finally:
        st.close()


def test_a_connection_used_a_moment_ago_is_not_pinged(pg_schema_url, monkeypatch):
    monkeypatch.setattr(store_mod, "_PING_IDLE_S", 3600.0)
    st = Store(pg_schema_url)
    try:
        first = _backend(st)
        _drop(first)
        try:  # no ping: the dead connection is used, fails once, and the pool is renewed
            _backend(st)
        except sa.exc.OperationalError:
            pass
        else:
            raise AssertionError("the dropped connection was pinged though it was used a moment ago")
        assert _backend(st) != first
    finally:
        st.close()
