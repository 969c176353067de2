"""Schedules: a job definition called on a clock, each tick fired exactly once.

A schedule row holds its next tick. Firing a tick is one store transaction: a compare-and-set
that moves ``next_tick`` on from the tick it read, the job that the tick made, and the
schedule's history line. Another server (or this one after a ``kill -9`` and a restart) that read
the same tick finds it moved and makes nothing, and a unique index on (owner, schedule, tick)
keeps a second job for a tick out even so. A crash between the payload's upload and that
transaction leaves only files, never a job, and the tick fires again.

Ticks come from croniter (5-field cron, in the schedule's time zone, daylight-saving changes
included) or from a fixed interval counted from the schedule's start. Ticks that fell while no
server ran fire on the next start only with ``catchup=True``; otherwise they are skipped, and the
history says how many and when.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import threading
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from croniter import croniter

from mljobs.errors import ConflictError, InvalidArgumentError, MLJobsError, NotFoundError
from mljobs.server.auth import Principal
from mljobs.server.definitions import is_remote
from mljobs.server.store import utcnow
from mljobs.server.tables import schedule_events, schedules, users
from mljobs.spec import PayloadKind, check_identifier
from mljobs.status import ACTIVE_VALUES

if TYPE_CHECKING:
    from mljobs.server.schemas import ScheduleIn
    from mljobs.server.service import ControlPlane

__all__ = ["Schedules", "parse_every", "check_cron", "tick_after", "CONCURRENCY"]

log = logging.getLogger("mljobs.server")
CONCURRENCY = ("forbid", "allow", "replace")
_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_MAX_SKIPPED_COUNT = 100_000  # ticks counted one by one when reporting a long outage


def parse_every(text: str) -> float:
    """``"30s"``, ``"15m"``, ``"1h"``, ``"2d"`` in seconds (at least 1)."""
    m = _EVERY.match(text or "")
    if not m:
        raise InvalidArgumentError(f"every={text!r} is not an interval; write a number and a unit, like "
                                   "'30s', '15m', '1h' or '1d'")
    seconds = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if seconds < 1:
        raise InvalidArgumentError(f"every={text!r} is under 1 s; the shortest interval is '1s'")
    return seconds


def check_cron(expr: str) -> str:
    fields = (expr or "").split()
    if len(fields) != 5 or not croniter.is_valid(" ".join(fields)):
        raise InvalidArgumentError(
            f"cron={expr!r} is not a 5-field cron expression (minute hour day-of-month month day-of-week), "
            "e.g. '0 3 * * *' for 03:00 every day or '*/15 * * * *' for every 15 minutes")
    return " ".join(fields)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgumentError(f"timezone={name!r} is not a time zone name; use one like 'UTC', "
                                   "'Europe/Berlin' or 'America/New_York'") from None


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    return t.replace(tzinfo=dt.timezone.utc) if t is not None and t.tzinfo is None else t


def tick_after(row: dict[str, Any], after: dt.datetime) -> dt.datetime | None:
    """The schedule's first tick strictly after ``after`` (UTC), none before ``start_at``; None
    once past ``end_at``."""
    start = _aware(row.get("start_at"))
    if start is not None and after < start:
        after = start - dt.timedelta(microseconds=1)
    if row.get("cron"):
        local = after.astimezone(_zone(row["timezone"]))
        tick = croniter(row["cron"], local).get_next(dt.datetime).astimezone(dt.timezone.utc)
    else:
        every = float(row["every_s"])
        anchor = start or _aware(row["created_time"])
        assert anchor is not None
        n = math.floor((after - anchor).total_seconds() / every) + 1
        tick = anchor + dt.timedelta(seconds=max(n, 0) * every)
        while tick <= after:  # float rounding
            tick += dt.timedelta(seconds=every)
    end = _aware(row.get("end_at"))
    return None if end is not None and tick > end else tick


class _Raced(Exception):
    """Another server (or thread) fired or changed the tick first."""


class Schedules:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.engine = cp.store.engine
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at: dt.datetime | None = None

    # -- the catalog ----------------------------------------------------------------------------
    def _row(self, owner: str, name: str) -> dict[str, Any]:
        name = check_identifier("schedule", name)
        with self.engine.connect() as c:
            r = c.execute(sa.select(schedules).where(schedules.c.owner == owner, schedules.c.name == name)).first()
        if r is None:
            raise NotFoundError(f"schedule {name} does not exist (or is not yours); mljobs.list_schedules() or "
                                "`mljobs schedule list` shows yours")
        return {k: _aware(v) if isinstance(v, dt.datetime) else v for k, v in r._mapping.items()}

    def view(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {k: row[k] for k in ("name", "owner", "cron", "every_s", "timezone", "concurrency", "catchup",
                                   "start_at", "end_at", "paused", "next_tick", "last_tick", "last_job_id",
                                   "note", "created_time")}
        out["definition"] = row["definition_name"]
        out["last_status"] = None
        if row["last_job_id"]:
            try:
                out["last_status"] = self.cp.store.get_job(row["last_job_id"]).status
            except NotFoundError:
                out["last_status"] = "DELETED"
        out["note"] = self._note(row)
        return out

    def _note(self, row: dict[str, Any]) -> str:
        """Why the schedule's runs wait or stop, in words (the stored note, else its pool's state)."""
        if row["paused"]:
            return row["note"] or "paused: resume it with mljobs.resume_schedule(name)"
        if row["next_tick"] is None:
            return row["note"] or "ended: no tick is left before its end_at"
        try:
            spec = self.cp.definitions.get_row(row["owner"], row["definition_name"])["spec"]
            pool = self.cp.store.get_pool(spec["compute_pool"])
        except NotFoundError as e:
            return f"its runs cannot start: {e}"
        if pool["suspended"]:
            return (f"pool {pool['name']} is SUSPENDED: its runs queue until it is resumed "
                    f"(`mljobs pool resume {pool['name']}`)")
        return row["note"]

    def get(self, name: str, who: Principal) -> dict[str, Any]:
        return self.view(self._row(who.name, name))

    def list(self, who: Principal) -> list[dict[str, Any]]:
        q = sa.select(schedules).order_by(schedules.c.owner, schedules.c.name)
        if who.owner_filter is not None:
            q = q.where(schedules.c.owner == who.owner_filter)
        with self.engine.connect() as c:
            rows = [{k: _aware(v) if isinstance(v, dt.datetime) else v for k, v in r._mapping.items()}
                    for r in c.execute(q)]
        return [self.view(r) for r in rows]

    def create(self, body: ScheduleIn, call: bytes | None, who: Principal) -> dict[str, Any]:
        name = check_identifier("schedule", body.name)
        defn = self.cp.definitions.get_row(who.name, body.definition)
        if is_remote(defn["name"]):  # pruned as the function changes: a schedule needs a name of its own
            raise InvalidArgumentError(f"{defn['name']} is @remote's own definition of a function; register it to "
                                       "schedule it: MLJobDefinition.register(fn, pool, stage_name, name='NIGHTLY')")
        if (body.cron is None) == (body.every is None):
            raise InvalidArgumentError("give exactly one of cron='0 3 * * *' (a cron expression) and every='1h' "
                                       "(an interval)")
        cron = check_cron(body.cron) if body.cron is not None else None
        every = parse_every(body.every) if body.every is not None else None
        _zone(body.timezone)
        if body.concurrency not in CONCURRENCY:
            raise InvalidArgumentError(f"concurrency={body.concurrency!r}: use one of {', '.join(CONCURRENCY)}")
        start, end = _utc(body.start_at, "start_at"), _utc(body.end_at, "end_at")
        if start is not None and end is not None and end <= start:
            raise InvalidArgumentError(f"end_at ({end:%Y-%m-%d %H:%M:%S} UTC) must come after start_at "
                                       f"({start:%Y-%m-%d %H:%M:%S} UTC)")
        function = defn["spec"]["payload_kind"] == PayloadKind.FUNCTION.value
        if function and body.args:
            raise InvalidArgumentError(f"job definition {defn['name']} is a function: give its arguments as "
                                       "args=(...) and kwargs={...}, not a list of strings")
        if not function and call is not None:
            raise InvalidArgumentError(f"job definition {defn['name']} runs a script: give its arguments as "
                                       "args=[...] (strings for its sys.argv)")
        now = utcnow()
        row: dict[str, Any] = {
            "owner": who.name, "name": name, "definition_name": defn["name"], "cron": cron, "every_s": every,
            "timezone": body.timezone, "concurrency": body.concurrency, "catchup": body.catchup,
            "start_at": start, "end_at": end, "args": body.args, "call_payload": call, "paused": False,
            "last_tick": None, "last_job_id": None, "note": "", "created_time": now}
        row["next_tick"] = tick_after(row, now)
        if row["next_tick"] is None:
            raise InvalidArgumentError(f"schedule {name} has no tick before its end_at; move end_at later")
        try:
            with self.engine.begin() as c:
                c.execute(schedules.insert().values(**row))
                self._event(c, who.name, name, "created", message=self._describe(row))
        except sa.exc.IntegrityError:
            raise ConflictError(f"schedule {name} already exists; drop it first (mljobs.drop_schedule({name!r})) "
                                "or pick another name") from None
        self.wake()
        return self.view(row)

    @staticmethod
    def _describe(row: dict[str, Any]) -> str:
        when = f"cron '{row['cron']}' ({row['timezone']})" if row["cron"] else f"every {row['every_s']:g} s"
        return f"{when}, calls {row['definition_name']}, concurrency={row['concurrency']}, catchup={row['catchup']}"

    def set_paused(self, name: str, paused: bool, who: Principal) -> dict[str, Any]:
        """Pause, or resume from the next tick after now (ticks that fell while it was paused are
        skipped, and its history says so)."""
        row = self._row(who.name, name)
        values: dict[str, Any] = {"paused": paused, "note": ""}
        message = "paused" if paused else "resumed"
        if not paused and row["paused"]:
            now = utcnow()
            values["next_tick"] = tick_after(row, now)
            skipped = self._count(row, row["next_tick"], now)
            if skipped:
                message += f"; {skipped} tick(s) that fell while it was paused are skipped"
        with self.engine.begin() as c:
            c.execute(schedules.update().where(schedules.c.owner == row["owner"], schedules.c.name == row["name"])
                      .values(**values))
            self._event(c, row["owner"], row["name"], "paused" if paused else "resumed", message=message)
        self.wake()
        return self.get(name, who)

    def drop(self, name: str, who: Principal) -> None:
        """Remove the schedule and its history; its runs stay (and keep its name)."""
        row = self._row(who.name, name)
        with self.engine.begin() as c:
            c.execute(schedules.delete().where(schedules.c.owner == row["owner"], schedules.c.name == row["name"]))
            c.execute(schedule_events.delete().where(schedule_events.c.owner == row["owner"],
                                                     schedule_events.c.schedule_name == row["name"]))

    def events(self, name: str, who: Principal, limit: int = 100) -> list[dict[str, Any]]:
        """The schedule's history, newest first."""
        row = self._row(who.name, name)
        q = (sa.select(schedule_events.c.time, schedule_events.c.tick, schedule_events.c.kind,
                       schedule_events.c.job_id, schedule_events.c.message)
             .where(schedule_events.c.owner == row["owner"], schedule_events.c.schedule_name == row["name"])
             .order_by(schedule_events.c.id.desc()))
        if limit > 0:
            q = q.limit(limit)
        with self.engine.connect() as c:
            return [{**r._mapping, "time": _aware(r.time), "tick": _aware(r.tick)} for r in c.execute(q)]

    @staticmethod
    def _event(c: sa.Connection, owner: str, name: str, kind: str, *, tick: dt.datetime | None = None,
               job_id: str | None = None, message: str = "") -> None:
        c.execute(schedule_events.insert().values(owner=owner, schedule_name=name, time=utcnow(), tick=tick,
                                                  kind=kind, job_id=job_id, message=message))

    @staticmethod
    def _count(row: dict[str, Any], first: dt.datetime | None, before: dt.datetime) -> int:
        """How many ticks from ``first`` fall before ``before`` (counted up to a bound)."""
        n, tick = 0, first
        while tick is not None and tick < before and n < _MAX_SKIPPED_COUNT:
            n += 1
            tick = tick_after(row, tick)
        return n

    # -- the clock --------------------------------------------------------------------------------
    def start(self) -> None:
        """Skip the ticks that fell while no server ran (unless a schedule says catchup), then fire
        ticks as they come, in a thread of their own."""
        self.started_at = utcnow()
        self._skip_missed(self.started_at)
        self._thread = threading.Thread(target=self._loop, name="mljobs-schedules", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def _skip_missed(self, now: dt.datetime) -> None:
        with self.engine.connect() as c:
            rows = [dict(r._mapping) for r in c.execute(sa.select(schedules).where(
                schedules.c.paused.is_(False), schedules.c.catchup.is_(False), schedules.c.next_tick < now))]
        for row in rows:
            row = {k: _aware(v) if isinstance(v, dt.datetime) else v for k, v in row.items()}
            first, nxt = row["next_tick"], tick_after(row, now)
            count = self._count(row, first, now)
            with self.engine.begin() as c:
                moved = c.execute(schedules.update().where(
                    schedules.c.owner == row["owner"], schedules.c.name == row["name"],
                    schedules.c.next_tick == first).values(next_tick=nxt)).rowcount
                if moved:
                    self._event(c, row["owner"], row["name"], "skipped", tick=first, message=(
                        f"{count}{'+' if count >= _MAX_SKIPPED_COUNT else ''} tick(s) from {first:%Y-%m-%d %H:%M:%S} "
                        f"UTC fell while no server ran and are skipped (catchup=False)"))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.fire_due(utcnow())
            except sa.exc.OperationalError as e:
                log.warning("schedules: the store did not answer (%s); trying again in 1 s", e.orig)
                wait = 1.0
            except Exception:  # noqa: BLE001 - the clock goes on
                log.exception("schedules")
                wait = 1.0
            with self._wake:
                if not self._stop.is_set():
                    self._wake.wait(wait)

    def fire_due(self, now: dt.datetime) -> float:
        """Fire every tick due at ``now``; returns how long to sleep until the next (at most 1 s, so
        schedules another server made are seen; 5 s while there is none: this server's own new
        schedules wake the clock at once)."""
        with self.engine.connect() as c:
            due = [dict(r._mapping) for r in c.execute(
                sa.select(schedules).where(schedules.c.paused.is_(False), schedules.c.next_tick <= now)
                .order_by(schedules.c.next_tick).limit(100))]
            soonest = c.execute(sa.select(sa.func.min(schedules.c.next_tick))
                                .where(schedules.c.paused.is_(False))).scalar()
        for row in due:
            row = {k: _aware(v) if isinstance(v, dt.datetime) else v for k, v in row.items()}
            try:
                self._fire(row)
            except _Raced:
                continue
            except Exception:  # noqa: BLE001 - one schedule's failure stops no other
                log.exception("schedule %s/%s", row["owner"], row["name"])
        if due:
            return 0.0
        soonest = _aware(soonest)
        if soonest is None:
            return 5.0
        return max(0.0, min(1.0, (soonest - utcnow()).total_seconds()))

    def _owner(self, name: str) -> Principal | None:
        """The schedule's owner acting; None when the server has users and the owner is not one
        any more (a deleted user's schedule fires nothing)."""
        with self.engine.connect() as c:
            admin = c.execute(sa.select(users.c.admin).where(users.c.name == name)).scalar()
        if admin is None and self.cp.store.has_users():
            return None
        return Principal(name, admin=bool(admin))

    def _fire(self, row: dict[str, Any]) -> None:
        tick = row["next_tick"]
        following = tick_after(row, tick)
        owner, name = row["owner"], row["name"]
        who = self._owner(owner)
        if who is None:
            self._advance(row, following, "failed", tick, f"user {owner!r} no longer exists: paused", pause=True)
            return
        last = None
        if row["last_job_id"]:
            try:
                last = self.cp.store.get_job(row["last_job_id"])
            except NotFoundError:
                last = None
        if last is not None and last.status in ACTIVE_VALUES and row["concurrency"] != "allow":
            if row["concurrency"] == "forbid":
                self._advance(row, following, "skipped", tick,
                              f"run {last.id} of the tick before is still {last.status} (concurrency=forbid)")
                return
            self.cp.cancel(last.id, who)  # replace
            self._event_now(owner, name, "replaced", tick, last.id,
                            f"cancelled run {last.id} ({last.status}) for this tick (concurrency=replace)")
        try:
            defn = self.cp.definitions.get_row(owner, row["definition_name"])
            prepared = self.cp.definitions.prepare(
                defn, who, args=row["args"], call=row["call_payload"],
                job_name=f"{name}_{tick:%Y%m%dT%H%M%S}", schedule_name=name, scheduled_tick=tick)
        except MLJobsError as e:
            self._advance(row, following, "failed", tick, f"this tick made no run: {e}")
            return
        try:
            with self.engine.begin() as c:
                if c.execute(schedules.update().where(
                        schedules.c.owner == owner, schedules.c.name == name, schedules.c.next_tick == tick,
                        schedules.c.paused.is_(False)).values(
                        next_tick=following, last_tick=tick, last_job_id=prepared.job_id, note="")).rowcount != 1:
                    raise _Raced()
                self.cp.store.insert_job(prepared.row, conn=c)
                self._event(c, owner, name, "fired", tick=tick, job_id=prepared.job_id,
                            message=f"run {prepared.job_id}")
        except (_Raced, sa.exc.IntegrityError):
            prepared.discard()
            raise _Raced() from None
        except BaseException:
            prepared.discard()
            raise
        self.cp.request_schedule(prepared.pool)

    def _advance(self, row: dict[str, Any], following: dt.datetime | None, kind: str, tick: dt.datetime,
                 message: str, pause: bool = False) -> None:
        """Move past ``tick`` without a run, saying why in the history (and pausing, if asked)."""
        values: dict[str, Any] = {"next_tick": following}
        if pause:
            values.update(paused=True, note=message)
        with self.engine.begin() as c:
            if c.execute(schedules.update().where(
                    schedules.c.owner == row["owner"], schedules.c.name == row["name"],
                    schedules.c.next_tick == tick).values(**values)).rowcount != 1:
                raise _Raced()
            self._event(c, row["owner"], row["name"], kind, tick=tick, message=message)

    def _event_now(self, owner: str, name: str, kind: str, tick: dt.datetime, job_id: str | None,
                   message: str) -> None:
        with self.engine.begin() as c:
            self._event(c, owner, name, kind, tick=tick, job_id=job_id, message=message)


def _utc(t: dt.datetime | None, what: str) -> dt.datetime | None:
    if t is None:
        return None
    if t.tzinfo is None:
        raise InvalidArgumentError(f"{what} must say its time zone (e.g. 2026-12-01T03:00:00+00:00)")
    return t.astimezone(dt.timezone.utc)
