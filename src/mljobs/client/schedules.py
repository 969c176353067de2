"""Schedules: a registered job definition called on a clock (``create_schedule`` and friends)."""

from __future__ import annotations

import datetime as dt
import inspect
from typing import TYPE_CHECKING, Any

from mljobs.client.definitions import MLJobDefinition, encode_call, get_definition
from mljobs.client.session import Session, get_active_session
from mljobs.errors import InvalidArgumentError
from mljobs.spec import PayloadKind

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["create_schedule", "list_schedules", "get_schedule", "pause_schedule", "resume_schedule",
           "drop_schedule", "schedule_events", "LIST_SCHEDULES_COLUMNS"]

LIST_SCHEDULES_COLUMNS = ["definition", "cron", "every_s", "timezone", "concurrency", "catchup", "paused",
                          "next_tick", "last_tick", "last_job_id", "last_status", "note", "owner", "created_time"]


def _when(t: dt.datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:
        raise InvalidArgumentError(f"{t!r} has no time zone; give an aware datetime "
                                   "(e.g. datetime(2026, 12, 1, 3, tzinfo=timezone.utc))")
    return t.isoformat()


def create_schedule(name: str, definition: MLJobDefinition[Any, Any] | str, *, cron: str | None = None,
                    every: str | None = None, args: Any = None, kwargs: dict[str, Any] | None = None,
                    timezone: str = "UTC", concurrency: str = "forbid", catchup: bool = False,
                    start_at: dt.datetime | None = None, end_at: dt.datetime | None = None,
                    session: Session | None = None) -> dict[str, Any]:
    """Call a registered definition on a clock; the server fires each tick once.

    Args:
        name: the schedule's name.
        definition: a registered :class:`MLJobDefinition` (or its name).
        cron: a 5-field cron expression in ``timezone`` (``"0 3 * * *"``: 03:00 every day), or
        every: an interval (``"30s"``, ``"15m"``, ``"1h"``, at least ``"1s"``); exactly one of them.
        args, kwargs: a function's arguments for every run (checked against it now); for a script,
            ``args`` is its list of strings.
        timezone: the cron expression's time zone (daylight-saving changes included).
        concurrency: ``"forbid"`` skips a tick while the last run is active, ``"replace"`` cancels
            that run, ``"allow"`` lets runs overlap.
        catchup: fire the ticks that fell while no server ran once it is back (else they are skipped,
            and the schedule's history says so).
        start_at, end_at: the first and last moment a tick may fall (aware datetimes).

    Each run is a job named ``<name>_<tick>`` whose ``schedule_name`` and ``scheduled_tick`` say
    which tick it is for: ``list_jobs(schedule=name)``.
    """
    session = session or get_active_session()
    if isinstance(definition, str):
        definition = get_definition(definition, session=session)
    if not isinstance(definition, MLJobDefinition) or not definition.registered:
        raise InvalidArgumentError("create_schedule needs a registered definition: "
                                   "MLJobDefinition.register(fn_or_file, pool, stage_name) makes one")
    info = definition.info or {}
    body: dict[str, Any] = {"name": name, "definition": info["name"], "timezone": timezone,
                            "concurrency": concurrency, "catchup": catchup, "start_at": _when(start_at),
                            "end_at": _when(end_at)}
    if cron is not None:
        body["cron"] = cron
    if every is not None:
        body["every"] = every
    if info["payload_kind"] == PayloadKind.FUNCTION.value:
        if args is not None and not isinstance(args, (list, tuple)):
            raise InvalidArgumentError(f"args for a function are its positional arguments (a tuple), got {args!r}")
        sig = definition.signature or inspect.Signature()
        qualname = info["entrypoint"][0] if info["entrypoint"] else info["name"]
        body["call"] = encode_call(sig, qualname, definition.session_param, tuple(args or ()), dict(kwargs or {}))
    else:
        if kwargs:
            raise InvalidArgumentError(f"definition {info['name']} runs a script: give args=[...] (strings), not kwargs")
        if args is not None:
            if isinstance(args, str) or not isinstance(args, (list, tuple)):
                raise InvalidArgumentError(f"args for a script is a list of strings, got {args!r}")
            body["args"] = [str(a) for a in args]
    return session.request("POST", "/schedules", json=body).json()


def get_schedule(name: str, session: Session | None = None) -> dict[str, Any]:
    session = session or get_active_session()
    return session.request("GET", f"/schedules/{name}").json()


def list_schedules(session: Session | None = None) -> pd.DataFrame:
    """Your schedules (every user's for an admin) with their next tick and last run, indexed by name."""
    import pandas as pd

    session = session or get_active_session()
    rows = session.request("GET", "/schedules").json()
    df = pd.DataFrame(rows, columns=["name", *LIST_SCHEDULES_COLUMNS])
    for col in ("next_tick", "last_tick", "created_time"):
        df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
    return df.set_index("name")


def pause_schedule(name: str, session: Session | None = None) -> dict[str, Any]:
    """Stop firing (runs already made go on)."""
    session = session or get_active_session()
    return session.request("POST", f"/schedules/{name}/pause").json()


def resume_schedule(name: str, session: Session | None = None) -> dict[str, Any]:
    """Fire again from the next tick after now (ticks that fell while paused are skipped)."""
    session = session or get_active_session()
    return session.request("POST", f"/schedules/{name}/resume").json()


def drop_schedule(name: str, session: Session | None = None) -> None:
    """Remove the schedule (its runs stay)."""
    session = session or get_active_session()
    session.request("DELETE", f"/schedules/{name}")


def schedule_events(name: str, limit: int = 100, session: Session | None = None) -> list[dict[str, Any]]:
    """The schedule's history, newest first: ticks fired (with their job), skipped (and why), changes."""
    session = session or get_active_session()
    return session.request("GET", f"/schedules/{name}/events", params={"limit": limit}).json()
