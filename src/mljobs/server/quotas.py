"""Quotas: how much of a pool a user may hold.

Per user (``'*'``: everyone's default) and pool (``'*'``: every pool's); for a user and a pool the
most specific row that sets a limit wins: (user, pool), (user, '*'), ('*', pool), ('*', '*').

- ``max_instances``: instances running at once; more wait (their pending reason names it).
- ``max_queued``: jobs queued at once; one more is refused at submit.
- ``max_instance_hours``: instance-hours over the last 24 h; once reached, submits are refused.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import sqlalchemy as sa

from mljobs.errors import InvalidArgumentError, NotFoundError, QuotaExceededError
from mljobs.server.store import Store, utcnow
from mljobs.server.tables import quotas, users
from mljobs.spec import check_identifier

__all__ = ["Quotas", "LIMITS"]

LIMITS = ("max_instances", "max_queued", "max_instance_hours")
_CACHE_S = 1.0


class Quotas:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._rows: tuple[float, dict[tuple[str, str], dict[str, Any]]] | None = None

    def _all(self) -> dict[tuple[str, str], dict[str, Any]]:
        with self._lock:
            hit = self._rows
        if hit is not None and time.monotonic() - hit[0] < _CACHE_S:
            return hit[1]
        with self.store.engine.connect() as c:
            rows = {(r.owner, r.pool): dict(r._mapping) for r in c.execute(sa.select(quotas))}
        with self._lock:
            self._rows = (time.monotonic(), rows)
        return rows

    def limits(self, owner: str, pool: str) -> dict[str, Any]:
        """The limits in force for ``owner`` on ``pool`` (None: none)."""
        rows = self._all()
        out: dict[str, Any] = {}
        for key in ((owner, pool), (owner, "*"), ("*", pool), ("*", "*")):
            row = rows.get(key)
            for name in LIMITS:
                if row is not None and out.get(name) is None and row[name] is not None:
                    out[name] = row[name]
        return {name: out.get(name) for name in LIMITS}

    def max_instances(self, owners: list[str], pool: str) -> dict[str, int | None]:
        return {o: self.limits(o, pool)["max_instances"] for o in owners}

    def check_submit(self, owner: str, pool: str, instances: int) -> None:
        """Refuse a submission over a hard limit, naming the limit and the current use."""
        lim = self.limits(owner, pool)
        if lim["max_queued"] is not None:
            queued = self.store.queued_count(owner, pool)
            if queued + 1 > lim["max_queued"]:
                raise QuotaExceededError(
                    f"user {owner} has {queued} job(s) queued on pool {pool}, their max_queued={lim['max_queued']}; "
                    "wait for some to start, cancel some, or ask an admin to raise it "
                    f"(`mljobs user quota set {owner} --pool {pool} --max-queued N`)")
        if lim["max_instance_hours"] is not None:
            used = self.instance_hours(owner, pool)
            if used >= lim["max_instance_hours"]:
                raise QuotaExceededError(
                    f"user {owner} used {used:.2f} instance-hour(s) on pool {pool} in the last 24 h, their "
                    f"max_instance_hours={lim['max_instance_hours']:g}; wait, or ask an admin to raise it "
                    f"(`mljobs user quota set {owner} --pool {pool} --max-instance-hours H`)")
        if lim["max_instances"] is not None and instances > lim["max_instances"]:
            raise QuotaExceededError(
                f"the job needs at least {instances} instance(s) but user {owner}'s max_instances on pool {pool} "
                f"is {lim['max_instances']}; lower min_instances/target_instances or ask an admin to raise it")

    def instance_hours(self, owner: str, pool: str) -> float:
        now = utcnow()
        since = now - dt.timedelta(days=1)
        total = 0.0
        for span in self.store.instance_spans(since, owner=owner, pool=pool) + self.store.instance_spans(
                live=True, owner=owner, pool=pool):
            start = max(span["started_time"] or since, since)
            end = span["ended_time"] or now
            total += max(0.0, (end - start).total_seconds())
        return total / 3600.0

    # -- the admin's side -----------------------------------------------------------------------
    def set(self, owner: str, pool: str, values: dict[str, Any]) -> dict[str, Any]:
        if owner != "*":
            with self.store.engine.connect() as c:
                if c.execute(sa.select(users.c.name).where(users.c.name == owner)).first() is None:
                    raise NotFoundError(f"user {owner!r} does not exist; `mljobs user list` shows the users "
                                        "('*' sets everyone's default)")
        pool = pool if pool == "*" else check_identifier("compute pool", pool)
        if pool != "*":
            self.store.get_pool(pool)
        for name, v in values.items():
            if name not in LIMITS:
                raise InvalidArgumentError(f"unknown quota {name!r}; quotas are {', '.join(LIMITS)}")
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise InvalidArgumentError(f"{name} must be a number >= 0 (or None: no limit), got {v!r}")
        row = {name: values.get(name) for name in LIMITS}
        with self.store.engine.begin() as c:
            c.execute(quotas.delete().where(quotas.c.owner == owner, quotas.c.pool == pool))
            if any(v is not None for v in row.values()):
                c.execute(quotas.insert().values(owner=owner, pool=pool, **row))
        with self._lock:
            self._rows = None
        return {"owner": owner, "pool": pool, **row}

    def of(self, owner: str | None) -> list[dict[str, Any]]:
        """The quota rows of ``owner`` (with everyone's defaults), or all rows."""
        rows = sorted(self._all().values(), key=lambda r: (r["owner"] != "*", r["owner"], r["pool"]))
        return [dict(r) for r in rows if owner is None or r["owner"] in (owner, "*")]
