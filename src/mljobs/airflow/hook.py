"""MLJobsHook: where an Airflow task finds its mljobs control plane (a connection, options, or the defaults)."""

from __future__ import annotations

import dataclasses
from typing import Any

from airflow.sdk import BaseHook

from mljobs.client.session import Session
from mljobs.errors import InvalidArgumentError

__all__ = ["MLJobsHook", "SessionSettings", "settings_from_connection"]

_SESSION_OPTIONS = ("url", "token", "database", "schema", "home")


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """What a session needs; None fields fall back to MLJOBS_URL, MLJOBS_TOKEN, config.toml, the embedded server."""

    url: str | None = None
    token: str | None = None
    database: str | None = None
    schema: str | None = None
    home: str | None = None

    def session(self) -> Session:
        return Session(self.url, token=self.token, database=self.database, schema=self.schema, home=self.home)


def settings_from_connection(conn: Any) -> SessionSettings:
    """An Airflow connection of type ``mljobs``: host (with or without ``http(s)://``) and port give the
    URL, the password is the token, ``extra`` may name ``database`` and ``schema``."""
    host = (conn.host or "").strip()
    if not host:
        raise InvalidArgumentError(
            f"Airflow connection {conn.conn_id!r} has no host: set it to the mljobs server, e.g. "
            f"AIRFLOW_CONN_{str(conn.conn_id).upper()}='mljobs://:TOKEN@127.0.0.1:8700'")
    url = host if "://" in host else f"http://{host}"
    if conn.port and url.count(":") < 2:
        url = f"{url}:{conn.port}"
    extra = conn.extra_dejson or {}
    unknown = sorted(set(extra) - {"database", "schema"})
    if unknown:
        raise InvalidArgumentError(f"Airflow connection {conn.conn_id!r}: unknown extra field(s) {unknown}; "
                                   "an mljobs connection's extra takes only 'database' and 'schema'")
    return SessionSettings(url=url.rstrip("/"), token=conn.password or None, database=extra.get("database"),
                           schema=extra.get("schema"))


class MLJobsHook(BaseHook):
    """A session on an mljobs control plane for an Airflow task.

    Args:
        mljobs_conn_id: an Airflow connection of type ``mljobs`` (host, port, password = token).
        session_options: or the session's options directly (``url``, ``token``, ``database``,
            ``schema``, ``home``). With neither, the worker's own settings apply (``MLJOBS_URL``,
            ``MLJOBS_TOKEN``, ``$MLJOBS_HOME/config.toml``, else the embedded local server).
    """

    conn_name_attr = "mljobs_conn_id"
    default_conn_name = "mljobs_default"
    conn_type = "mljobs"
    hook_name = "mljobs"

    def __init__(self, mljobs_conn_id: str | None = None, session_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        if mljobs_conn_id is not None and session_options:
            raise InvalidArgumentError("give either mljobs_conn_id or session_options, not both "
                                       f"(got {mljobs_conn_id!r} and {sorted(session_options)})")
        unknown = sorted(set(session_options or {}) - set(_SESSION_OPTIONS))
        if unknown:
            raise InvalidArgumentError(f"unknown session option(s) {unknown}; use {', '.join(_SESSION_OPTIONS)}")
        self.mljobs_conn_id = mljobs_conn_id
        self.session_options = dict(session_options or {})

    def settings(self) -> SessionSettings:
        if self.mljobs_conn_id is not None:
            return settings_from_connection(self.get_connection(self.mljobs_conn_id))
        return SessionSettings(**self.session_options)

    def get_conn(self) -> Session:
        return self.settings().session()

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {"hidden_fields": ["login", "schema"],
                "relabeling": {"host": "mljobs server (host or URL)", "password": "token"},
                "placeholders": {"host": "127.0.0.1", "port": "8700",
                                 "extra": '{"database": "MLJOBS", "schema": "PUBLIC"}'}}
