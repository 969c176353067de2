"""The store: every read and write of job, pool, instance and stage state.

SQLite (WAL) by default, PostgreSQL when configured. Status changes are compare-and-set
``UPDATE ... WHERE status IN (:allowed)`` against the transition table, so two writers can
never both move a job, and a terminal state never changes.
"""

from __future__ import annotations

import datetime as dt
import secrets as pysecrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mljobs.errors import ConflictError, InvalidTransitionError, NotFoundError
from mljobs.server.records import JobRecord, QueuedJob
from mljobs.server.tables import (SCHEMA_REVISION, alembic_version, instances, integrations, job_events, jobs, metadata,
                                  pools, secrets, stages, usage_spans, users)
from mljobs.spec import PoolSpec
from mljobs.status import ACTIVE, INSTANCE_STATUS, JOB_STATUS, LIVE_INSTANCE, TERMINAL, TERMINAL_VALUES, can_transition

__all__ = ["Store", "utcnow", "normalize_url"]



def _keep_usage(c: sa.Connection, job_id: str, instance_id: int | None = None,
                ended: dt.datetime | None = None) -> None:
    """Runs into ``usage_spans``: in the transaction that marks an instance EXITED, its run;
    with ``ended`` (a requeue, which drops the job's instance rows), every run not recorded yet
    (the live ones), ended then."""
    end = sa.literal(ended, sa.DateTime(timezone=True)) if ended is not None else instances.c.ended_time
    q = (sa.select(jobs.c.owner, jobs.c.compute_pool, pools.c.instance_family, instances.c.started_time, end)
         .join(jobs, jobs.c.id == instances.c.job_id).join(pools, pools.c.name == jobs.c.compute_pool)
         .where(instances.c.job_id == job_id, instances.c.started_time.is_not(None)))
    if ended is None:
        q = q.where(instances.c.instance_id == instance_id, instances.c.ended_time.is_not(None))
    else:
        q = q.where(instances.c.status.in_(sorted(LIVE_INSTANCE)))
    c.execute(usage_spans.insert().from_select(
        ["owner", "compute_pool", "instance_family", "started_time", "ended_time"], q))


def _event(c: sa.Connection, job_id: str, status: str, message: str = "", time: dt.datetime | None = None) -> None:
    """Note a status the job took, in the transaction that moved it there."""
    c.execute(job_events.insert().values(job_id=job_id, time=time or utcnow(), status=status, message=message))


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


_PING_IDLE_S = 2.0


def _ping_when_idle(engine: Engine) -> None:
    """SQLAlchemy's ``pool_pre_ping``, but only for a connection idle for ``_PING_IDLE_S``: a job
    takes a connection from the pool some 25 times, and a ping each time cost PostgreSQL a round
    trip each (5-7 ms a job). A connection the database dropped (a restart, an idle timeout) is
    replaced at checkout as before (PoolEvents.checkout: a DisconnectionError makes the pool take
    a fresh one); one dropped within seconds of its last use fails that one statement, and
    SQLAlchemy then renews the whole pool."""

    @sa.event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < _PING_IDLE_S:
            return  # new, or used a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)  # the dialect's own ping: one round trip, no transaction left open
        except Exception as e:  # noqa: BLE001 - whatever the driver raises for a dead connection
            raise sa.exc.DisconnectionError(f"a pooled connection was dropped: {e}") from e


def _pool_row(r: Any) -> dict[str, Any]:
    row = _row(r)
    row["provider_options"] = row.get("provider_options") or {}
    return row


def _job(r: Any) -> JobRecord:
    return JobRecord.from_row(_row(r))


def _row(r: Any) -> dict[str, Any]:
    d = dict(r._mapping)
    for k, v in d.items():
        if isinstance(v, dt.datetime):
            d[k] = _aware(v)
    return d


# The users with queued jobs on a pool: a loose index scan (one seek per user on
# ix_jobs_pool_status_owner) instead of reading the whole queue; then each user's head, by
# another seek each (Store.pending_heads).
_OWNERS_CTE = (
    "WITH RECURSIVE o(owner) AS ("
    " SELECT MIN(owner) FROM jobs WHERE compute_pool = :pool AND status = :status"
    " UNION ALL"
    " SELECT (SELECT MIN(j.owner) FROM jobs j WHERE j.compute_pool = :pool AND j.status = :status AND j.owner > o.owner)"
    " FROM o WHERE o.owner IS NOT NULL) ")
_QUEUED_OWNERS = sa.text(_OWNERS_CTE + "SELECT owner FROM o WHERE owner IS NOT NULL")
_HEAD = ("SELECT id, owner, priority, created_time, min_instances, target_instances FROM jobs "
         "WHERE compute_pool = :pool AND status = :status")
_HEAD_ORDER = "ORDER BY priority DESC, created_time, id LIMIT :k"
_QUEUED_HEADS_PG = sa.text(
    _OWNERS_CTE + f"SELECT h.* FROM o CROSS JOIN LATERAL ({_HEAD} AND owner = o.owner {_HEAD_ORDER}) h "
    "WHERE o.owner IS NOT NULL")
_UID_HIGH = "job_uid_high"  # the highest uid a user's sandboxed jobs were given (never given again)


class _Raced(Exception):
    """Another server changed what a compare-and-set expected."""


class Store:
    # How long a pool's row is reused without asking the database: every job reads its pool
    # several times, pools change rarely, and this server's own changes clear it at once (another
    # server sharing a PostgreSQL store is seen within this time).
    POOL_CACHE_S = 1.0

    def __init__(self, url: str, busy_timeout_s: float = 30.0) -> None:
        self.url = normalize_url(url)
        self._pools: dict[str, tuple[float, dict[str, Any]]] = {}  # name -> (when read, row)
        self._stages: dict[str, dict[str, Any]] = {}  # stage rows never change once made
        self._integrations: tuple[float, list[dict[str, Any]]] | None = None  # (when read, rows), as pools
        if self.url.startswith("sqlite"):
            self.engine: Engine = sa.create_engine(
                self.url, connect_args={"check_same_thread": False, "timeout": busy_timeout_s}, pool_size=8,
                max_overflow=16,
            )

            @sa.event.listens_for(self.engine, "connect")
            def _pragmas(conn: Any, _: Any) -> None:
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
                cur.close()
        else:
            self.engine = sa.create_engine(self.url, pool_size=8, max_overflow=16)
            _ping_when_idle(self.engine)

    @classmethod
    def sqlite(cls, path: Path, busy_timeout_s: float = 30.0) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{path}", busy_timeout_s)

    def migrate(self, *, by_alembic: bool = False) -> None:
        """Bring the schema to the newest revision. A store at it is left alone, and an empty one
        gets the tables as ``tables.py`` declares them, stamped at the newest revision (what
        running every migration gives: tests/unit/test_schema.py compares the two); neither imports
        Alembic, whose import is a third of a server's start. Any other store (an older revision)
        is upgraded by Alembic's migrations, as is every store with ``by_alembic``."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # one migrator at a time per database
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7251001)"))
            if not by_alembic:
                names = set(sa.inspect(conn).get_table_names())
                if not names:
                    metadata.create_all(conn)
                    alembic_version.create(conn)
                    conn.execute(alembic_version.insert().values(version_num=SCHEMA_REVISION))
                    return
                if "alembic_version" in names and conn.execute(
                        sa.select(alembic_version.c.version_num)).scalar() == SCHEMA_REVISION:
                    return
            from alembic import command
            from alembic.config import Config

            cfg = Config()
            cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    # -- pools --------------------------------------------------------------------------------
    def create_pool(self, spec: PoolSpec, if_not_exists: bool = False, owner: str | None = None) -> bool:
        """Insert a pool; False if it existed and ``if_not_exists``; ConflictError otherwise."""
        with self.engine.begin() as c:
            if c.execute(sa.select(pools.c.name).where(pools.c.name == spec.name)).first():
                if if_not_exists:
                    return False
                raise ConflictError(
                    f"compute pool {spec.name} already exists; use if_not_exists=True or "
                    f"`mljobs pool drop {spec.name}` first"
                )
            c.execute(pools.insert().values(**spec.to_dict(), suspended=False, created_time=utcnow(), owner=owner))
        self._pools.pop(spec.name, None)
        return True

    def get_pool(self, name: str) -> dict[str, Any]:
        hit = self._pools.get(name)
        if hit is not None and time.monotonic() - hit[0] < self.POOL_CACHE_S:
            return dict(hit[1])
        with self.engine.connect() as c:
            r = c.execute(sa.select(pools).where(pools.c.name == name)).first()
        if r is None:
            raise NotFoundError(
                f"compute pool {name!r} does not exist; `mljobs pool list` shows the pools, "
                f"create_compute_pool({name!r}, instance_family=...) makes one"
            )
        row = _pool_row(r)
        self._pools[name] = (time.monotonic(), row)
        return dict(row)

    def list_pools(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [_pool_row(r) for r in c.execute(sa.select(pools).order_by(pools.c.name))]

    def update_pool(self, name: str, **values: Any) -> None:
        try:
            with self.engine.begin() as c:
                if c.execute(pools.update().where(pools.c.name == name).values(**values)).rowcount == 0:
                    self._pools.pop(name, None)
                    self.get_pool(name)
        finally:
            self._pools.pop(name, None)

    def drop_pool(self, name: str) -> None:
        try:
            self._drop_pool(name)
        finally:
            self._pools.pop(name, None)

    def _drop_pool(self, name: str) -> None:
        self._pools.pop(name, None)
        with self.engine.begin() as c:
            active = c.execute(
                sa.select(sa.func.count()).select_from(jobs).where(
                    jobs.c.compute_pool == name, jobs.c.status.in_([s.value for s in ACTIVE]))
            ).scalar_one()
            if active:
                raise ConflictError(
                    f"compute pool {name} has {active} active job(s); cancel them first "
                    "(`mljobs jobs list` shows them)"
                )
            if c.execute(pools.delete().where(pools.c.name == name)).rowcount == 0:
                self.get_pool(name)

    # -- stages -------------------------------------------------------------------------------
    def get_stage(self, name: str) -> dict[str, Any] | None:
        if name in self._stages:
            return dict(self._stages[name])
        with self.engine.connect() as c:
            r = c.execute(sa.select(stages).where(stages.c.name == name)).first()
        if r is None:
            return None
        self._stages[name] = _row(r)
        return dict(self._stages[name])

    def create_stage(self, name: str, url: str, if_not_exists: bool = True, owner: str | None = None) -> dict[str, Any]:
        try:
            with self.engine.begin() as c:
                c.execute(stages.insert().values(name=name, url=url, created_time=utcnow(), owner=owner))
        except sa.exc.IntegrityError:
            if not if_not_exists:
                raise ConflictError(f"stage {name} already exists") from None
        got = self.get_stage(name)
        assert got is not None  # just inserted, or already there
        return got

    def list_stages(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [_row(r) for r in c.execute(sa.select(stages).order_by(stages.c.name))]

    # -- jobs ---------------------------------------------------------------------------------
    # -- external access integrations ---------------------------------------------------------
    def create_integration(self, name: str, allowed_hosts: list[str], *, replace: bool = False,
                           if_not_exists: bool = False) -> bool:
        """True if it was created (or replaced); False if it existed and ``if_not_exists``."""
        try:
            return self._create_integration(name, allowed_hosts, replace, if_not_exists)
        finally:
            self._integrations = None

    def _create_integration(self, name: str, allowed_hosts: list[str], replace: bool, if_not_exists: bool) -> bool:
        with self.engine.begin() as c:
            exists = c.execute(sa.select(integrations.c.name).where(integrations.c.name == name)).first()
            if exists and if_not_exists:
                return False
            if exists and not replace:
                raise ConflictError(f"external access integration {name} already exists; pass replace=True "
                                    "to change its hosts or drop it first")
            if exists:
                c.execute(integrations.update().where(integrations.c.name == name).values(allowed_hosts=allowed_hosts))
            else:
                c.execute(integrations.insert().values(name=name, allowed_hosts=allowed_hosts, created_time=utcnow()))
        return True

    def list_integrations(self) -> list[dict[str, Any]]:
        hit = self._integrations
        if hit is not None and time.monotonic() - hit[0] < self.POOL_CACHE_S:
            return [dict(r) for r in hit[1]]
        with self.engine.connect() as c:
            rows = [_row(r) for r in c.execute(sa.select(integrations).order_by(integrations.c.name))]
        self._integrations = (time.monotonic(), rows)
        return [dict(r) for r in rows]

    def drop_integration(self, name: str) -> None:
        try:
            with self.engine.begin() as c:
                if c.execute(integrations.delete().where(integrations.c.name == name)).rowcount == 0:
                    raise NotFoundError(f"external access integration {name} does not exist; "
                                        "`mljobs integration list` shows them")
        finally:
            self._integrations = None

    def insert_job(self, row: dict[str, Any], conn: sa.Connection | None = None) -> None:
        """Record a new job (in ``conn``'s transaction when given: a schedule's tick)."""
        if conn is not None:
            conn.execute(jobs.insert().values(**row))
            _event(conn, row["id"], row["status"], row.get("message") or "", row.get("created_time"))
            return
        with self.engine.begin() as c:
            self.insert_job(row, c)

    def get_job(self, job_id: str) -> JobRecord:
        with self.engine.connect() as c:
            r = c.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if r is None:
            raise NotFoundError(f"job {job_id} does not exist; `mljobs jobs list` shows the jobs")
        return _job(r)

    def jobs_named(self, name: str, owner: str | None = None) -> list[JobRecord]:
        """Jobs called ``name``, newest first; only ``owner``'s when given."""
        with self.engine.connect() as c:
            q = sa.select(jobs).where(jobs.c.name == name).order_by(jobs.c.created_time.desc())
            if owner is not None:
                q = q.where(jobs.c.owner == owner)
            return [_job(r) for r in c.execute(q)]

    def job_owner_status(self, job_id: str) -> tuple[str, str] | None:
        """A job's owner and status (one small read, for job tokens)."""
        with self.engine.connect() as c:
            r = c.execute(sa.select(jobs.c.owner, jobs.c.status).where(jobs.c.id == job_id)).first()
        return (r[0], r[1]) if r else None

    def job_by_key(self, owner: str, key: str) -> JobRecord | None:
        """The job ``owner`` submitted with idempotency key ``key``, if any."""
        with self.engine.connect() as c:
            r = c.execute(sa.select(jobs).where(jobs.c.owner == owner, jobs.c.idempotency_key == key)).first()
        return _job(r) if r else None

    def list_jobs(self, limit: int, database: str | None = None, schema: str | None = None,
                  statuses: Iterable[str] | None = None, owner: str | None = None,
                  with_spec: bool = True, pool: str | None = None,
                  schedule: str | None = None) -> list[JobRecord]:
        """Newest first; ``with_spec=False`` leaves out the spec (the one large column)."""
        cols = jobs.c if with_spec else [c for c in jobs.c if c.name != "spec"]
        q = sa.select(*cols).order_by(jobs.c.created_time.desc())
        if schedule is not None:
            q = q.where(jobs.c.schedule_name == schedule)
        if owner is not None:
            q = q.where(jobs.c.owner == owner)
        if pool is not None:
            q = q.where(jobs.c.compute_pool == pool)
        if database:
            q = q.where(jobs.c.database_name == database)
        if schema:
            q = q.where(jobs.c.schema_name == schema)
        if statuses:
            q = q.where(jobs.c.status.in_(list(statuses)))
        if limit > 0:
            q = q.limit(limit)
        with self.engine.connect() as c:
            return [_job(r) for r in c.execute(q)]

    def pending_jobs(self, pool: str, limit: int = 0) -> list[JobRecord]:
        """The pool's queue in order (its first ``limit`` jobs when > 0)."""
        q = (sa.select(jobs).where(jobs.c.compute_pool == pool, jobs.c.status == JOB_STATUS.PENDING.value)
             .order_by(jobs.c.created_time, jobs.c.id))
        if limit > 0:
            q = q.limit(limit)
        with self.engine.connect() as c:
            return [_job(r) for r in c.execute(q)]

    def jobs_ahead(self, job: JobRecord) -> int:
        """How many PENDING jobs of the job's pool come before it in the queue."""
        t, i = job.created_time, job.id
        q = (sa.select(sa.func.count()).select_from(jobs)
             .where(jobs.c.compute_pool == job.compute_pool, jobs.c.status == JOB_STATUS.PENDING.value,
                    sa.or_(jobs.c.created_time < t, sa.and_(jobs.c.created_time == t, jobs.c.id < i))))
        with self.engine.connect() as c:
            return int(c.execute(q).scalar_one())

    def transition(self, job_id: str, new: JOB_STATUS, *, expected: Iterable[JOB_STATUS] | None = None,
                   message: str | None = None, **values: Any) -> JobRecord:
        """Move a job to ``new`` if its status is one of ``expected`` (default: any allowed source).

        Raises InvalidTransitionError when the job's current status does not allow it.
        """
        # back to the queue only through requeue_job, which checks it is a retry or a preemption
        sources = {s for s in JOB_STATUS if can_transition(s, new)} if new != JOB_STATUS.PENDING else set()
        if expected is not None:
            sources &= set(expected)
        values = dict(values, status=new.value)
        if message is not None:
            values["message"] = message
        if new in TERMINAL and "completed_time" not in values:
            values["completed_time"] = utcnow()
        with self.engine.begin() as c:
            res = c.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.status.in_([s.value for s in sources]))
                .values(**values)
            )
            if res.rowcount:
                _event(c, job_id, new.value, message or "", values.get("completed_time"))
        current = self.get_job(job_id)
        if res.rowcount == 0:
            raise InvalidTransitionError(job_id, current.status, new.value)
        return current

    def start_job(self, job_id: str, slots: list[int]) -> bool:
        """PENDING -> RUNNING with its instances recorded STARTING, in one transaction, so that a
        crash leaves either a queued job or a running one with instances, never a running job
        without any. False if the job is no longer PENDING (cancelled meanwhile)."""
        now = utcnow()
        with self.engine.begin() as c:
            res = c.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == JOB_STATUS.PENDING.value)
                            .values(status=JOB_STATUS.RUNNING.value, message="", started_time=now,
                                    instances_ran=len(slots)))
            if res.rowcount == 0:
                return False
            _event(c, job_id, JOB_STATUS.RUNNING.value, f"{len(slots)} instance(s) started", now)
            c.execute(instances.insert(), [
                {"job_id": job_id, "instance_id": i, "slot": s, "status": INSTANCE_STATUS.STARTING.value, "started_time": now}
                for i, s in enumerate(slots)])
        return True

    def requeue_job(self, job_id: str, attempt: int, message: str) -> bool:
        """RUNNING (or CANCELLING, preempted) -> PENDING as attempt ``attempt + 1``, its ended
        instances removed, in one transaction (the job waits in the queue again, at its place by
        submit time). False if the job was no longer there on ``attempt`` (another path finished
        or requeued it)."""
        now = utcnow()
        with self.engine.begin() as c:
            res = c.execute(jobs.update().where(
                jobs.c.id == job_id, jobs.c.attempt == attempt, sa.or_(
                    jobs.c.status == JOB_STATUS.RUNNING.value,
                    sa.and_(jobs.c.status == JOB_STATUS.CANCELLING.value, jobs.c.preempted_by.is_not(None))))
                .values(status=JOB_STATUS.PENDING.value, attempt=attempt + 1, message=message, started_time=None,
                        instances_ran=0, preempted_by=None))
            if res.rowcount == 0:
                return False
            _keep_usage(c, job_id, ended=now)  # the attempt's last run (never recorded EXITED) still counts
            c.execute(instances.delete().where(instances.c.job_id == job_id))
            _event(c, job_id, JOB_STATUS.PENDING.value, message, now)
        return True

    def preempt(self, job_id: str, by: str, message: str) -> bool:
        """RUNNING -> CANCELLING for job ``by``, which takes its instances; False if it was no longer
        RUNNING. Its instances are stopped by the caller; it ends CANCELLED or is requeued."""
        now = utcnow()
        with self.engine.begin() as c:
            if c.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == JOB_STATUS.RUNNING.value)
                         .values(status=JOB_STATUS.CANCELLING.value, preempted_by=by, message=message)).rowcount == 0:
                return False
            _event(c, job_id, JOB_STATUS.CANCELLING.value, message, now)
        return True

    def unpreempt(self, job_id: str, message: str) -> None:
        """A preempted job is cancelled as well: it ends CANCELLED rather than being requeued."""
        with self.engine.begin() as c:
            c.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == JOB_STATUS.CANCELLING.value)
                      .values(preempted_by=None, message=message))

    # -- sharing a pool ------------------------------------------------------------------------
    def start_view(self, pool: str, max_nodes: int, preemption: bool = False
                   ) -> tuple[list[tuple[int, str, str]], dict[str, list[QueuedJob]]]:
        """What a start decision reads, on one connection (one checkout and, on PostgreSQL, one
        ping less than two reads): the pool's live instances and, when a slot is free (or the
        pool preempts), each user's first queued jobs, as many as the free slots."""
        with self.engine.connect() as c:
            live = self._pool_instances(c, pool)
            free = max_nodes - len(live)
            heads = self._pending_heads(c, pool, max(1, free)) if free > 0 or preemption else {}
        return live, heads

    def pending_heads(self, pool: str, per_owner: int) -> dict[str, list[QueuedJob]]:
        """Each user's first ``per_owner`` queued jobs on ``pool`` (priority, then submission),
        whatever the length of the queue: the users by one index seek each (a loose index scan),
        then each user's head by another, in one statement of a few columns."""
        with self.engine.connect() as c:
            return self._pending_heads(c, pool, per_owner)

    @staticmethod
    def _pending_heads(c: sa.Connection, pool: str, per_owner: int) -> dict[str, list[QueuedJob]]:
        params: dict[str, Any] = {"pool": pool, "status": JOB_STATUS.PENDING.value, "k": per_owner}
        if c.dialect.name == "postgresql":  # one statement, planned once: each user's head by LATERAL
            rows = c.execute(_QUEUED_HEADS_PG, params).all()
        else:  # SQLite plans a union of one small query a user in well under a millisecond
            owners = [r[0] for r in c.execute(_QUEUED_OWNERS, params)]
            if not owners:
                return {}
            heads = " UNION ALL ".join(f"SELECT * FROM ({_HEAD} AND owner = :o{i} {_HEAD_ORDER}) h{i}"
                                       for i in range(len(owners)))
            rows = c.execute(sa.text(heads), {**params, **{f"o{i}": o for i, o in enumerate(owners)}}).all()
        out: dict[str, list[QueuedJob]] = {}
        for r in rows:
            out.setdefault(r[1], []).append(QueuedJob(*r))
        for queue in out.values():  # a union keeps no order
            queue.sort(key=lambda j: (-j.priority, j.created_time, j.id))
        return out

    def pool_instances(self, pool: str) -> list[tuple[int, str, str]]:
        """The live instances of ``pool``: (slot, owner, job id)."""
        with self.engine.connect() as c:
            return self._pool_instances(c, pool)

    @staticmethod
    def _pool_instances(c: sa.Connection, pool: str) -> list[tuple[int, str, str]]:
        q = (sa.select(instances.c.slot, jobs.c.owner, jobs.c.id).join(jobs, jobs.c.id == instances.c.job_id)
             .where(jobs.c.compute_pool == pool, instances.c.status.in_(sorted(LIVE_INSTANCE))))
        return [(r[0], r[1], r[2]) for r in c.execute(q)]

    def pool_use(self, pool: str, since: dt.datetime) -> list[tuple[str, dt.datetime, dt.datetime | None]]:
        """The instances of ``pool`` that ran at some time since ``since``: (owner, started, ended or None)."""
        q = (sa.select(jobs.c.owner, instances.c.started_time, instances.c.ended_time)
             .join(jobs, jobs.c.id == instances.c.job_id)
             .where(jobs.c.compute_pool == pool, instances.c.started_time.is_not(None),
                    sa.or_(instances.c.ended_time.is_(None), instances.c.ended_time >= since)))
        with self.engine.connect() as c:
            return [(r[0], _aware(r[1]), _aware(r[2]) if r[2] is not None else None) for r in c.execute(q)]

    def running_jobs(self, pool: str) -> list[JobRecord]:
        """RUNNING jobs of ``pool`` (without specs)."""
        cols = [c for c in jobs.c if c.name != "spec"]
        q = sa.select(*cols).where(jobs.c.compute_pool == pool, jobs.c.status == JOB_STATUS.RUNNING.value)
        with self.engine.connect() as c:
            return [_job(r) for r in c.execute(q)]

    def instance_spans(self, since: dt.datetime | None = None, live: bool = False, owner: str | None = None,
                       pool: str | None = None) -> list[dict[str, Any]]:
        """Runs with their owner, pool and family: those ended after ``since`` (from
        ``usage_spans``, which outlive their jobs), or the live instances (only ``owner``'s on
        ``pool`` when given); for usage (fair share) and daily quotas."""
        if live:
            q = (sa.select(jobs.c.owner, jobs.c.compute_pool, pools.c.instance_family, instances.c.started_time,
                           instances.c.ended_time)
                 .join(jobs, jobs.c.id == instances.c.job_id).join(pools, pools.c.name == jobs.c.compute_pool)
                 .where(instances.c.status.in_(sorted(LIVE_INSTANCE))))
            who, where = jobs.c.owner, jobs.c.compute_pool
        else:
            q = sa.select(usage_spans.c.owner, usage_spans.c.compute_pool, usage_spans.c.instance_family,
                          usage_spans.c.started_time, usage_spans.c.ended_time).where(usage_spans.c.ended_time >= since)
            who, where = usage_spans.c.owner, usage_spans.c.compute_pool
        if owner is not None:
            q = q.where(who == owner)
        if pool is not None:
            q = q.where(where == pool)
        with self.engine.connect() as c:
            return [_row(r) for r in c.execute(q)]

    def prune_usage(self, before: dt.datetime) -> int:
        """Forget runs that ended before ``before`` (older than any look back); how many."""
        with self.engine.begin() as c:
            return c.execute(usage_spans.delete().where(usage_spans.c.ended_time < before)).rowcount

    def queued_by_owner(self, pool: str) -> dict[str, int]:
        q = (sa.select(jobs.c.owner, sa.func.count()).where(jobs.c.compute_pool == pool,
                                                           jobs.c.status == JOB_STATUS.PENDING.value)
             .group_by(jobs.c.owner))
        with self.engine.connect() as c:
            return {r[0]: int(r[1]) for r in c.execute(q)}

    def queued_count(self, owner: str, pool: str) -> int:
        q = sa.select(sa.func.count()).select_from(jobs).where(
            jobs.c.owner == owner, jobs.c.compute_pool == pool, jobs.c.status == JOB_STATUS.PENDING.value)
        with self.engine.connect() as c:
            return int(c.execute(q).scalar_one())

    def job_events(self, job_id: str) -> list[dict[str, Any]]:
        """The statuses the job took, oldest first: time, status, message."""
        q = (sa.select(job_events.c.time, job_events.c.status, job_events.c.message)
             .where(job_events.c.job_id == job_id).order_by(job_events.c.id))
        with self.engine.connect() as c:
            return [{"time": _aware(r.time), "status": r.status, "message": r.message} for r in c.execute(q)]

    def set_message(self, job_id: str, message: str) -> None:
        with self.engine.begin() as c:
            c.execute(jobs.update().where(jobs.c.id == job_id).values(message=message))

    def short_jobs(self, pool: str) -> list[JobRecord]:
        """RUNNING multi-node jobs of ``pool`` with fewer instances than their target, oldest first."""
        q = (sa.select(jobs).where(jobs.c.compute_pool == pool, jobs.c.status == JOB_STATUS.RUNNING.value,
                                   jobs.c.target_instances > jobs.c.instances_ran)
             .order_by(jobs.c.created_time))
        with self.engine.connect() as c:
            return [_job(r) for r in c.execute(q)]

    def add_instances(self, job_id: str, slots: list[int]) -> int | None:
        """Late instances for a RUNNING job: their ids follow the last; None if it is not running."""
        with self.engine.begin() as c:
            res = c.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == JOB_STATUS.RUNNING.value)
                            .values(instances_ran=jobs.c.instances_ran + len(slots)))
            if res.rowcount == 0:
                return None
            first = c.execute(sa.select(sa.func.count()).select_from(instances)
                              .where(instances.c.job_id == job_id)).scalar_one()
            now = utcnow()
            c.execute(instances.insert(), [
                {"job_id": job_id, "instance_id": i, "slot": s, "status": INSTANCE_STATUS.STARTING.value, "started_time": now}
                for i, s in enumerate(slots, start=first)])
            return int(first)

    def finished_before(self, before: dt.datetime, limit: int, owner: str | None = None,
                        statuses: Iterable[str] | None = None) -> list[JobRecord]:
        """Terminal jobs completed before ``before``, oldest first, at most ``limit``."""
        terminal = sorted(TERMINAL_VALUES)
        wanted = [s for s in statuses if s in terminal] if statuses else terminal
        q = (sa.select(jobs).where(jobs.c.status.in_(wanted), jobs.c.completed_time < before)
             .order_by(jobs.c.completed_time).limit(limit))
        if owner is not None:
            q = q.where(jobs.c.owner == owner)
        with self.engine.connect() as c:
            return [_job(r) for r in c.execute(q)]

    def delete_job(self, job_id: str) -> None:
        with self.engine.begin() as c:
            c.execute(job_events.delete().where(job_events.c.job_id == job_id))
            c.execute(instances.delete().where(instances.c.job_id == job_id))
            c.execute(jobs.delete().where(jobs.c.id == job_id))

    # -- instances ----------------------------------------------------------------------------
    def insert_instances(self, job_id: str, slots: list[int], first_id: int = 0) -> None:
        now = utcnow()
        with self.engine.begin() as c:
            c.execute(instances.insert(), [
                {"job_id": job_id, "instance_id": i, "slot": s, "status": INSTANCE_STATUS.STARTING.value, "started_time": now}
                for i, s in enumerate(slots, start=first_id)
            ])

    def update_instance(self, job_id: str, instance_id: int, **values: Any) -> None:
        with self.engine.begin() as c:
            c.execute(instances.update().where(
                instances.c.job_id == job_id, instances.c.instance_id == instance_id).values(**values))

    def record_exit(self, job_id: str, instance_id: int, values: dict[str, Any],
                    job_status: JOB_STATUS | None = None, *, expected: Iterable[JOB_STATUS] = (),
                    message: str = "") -> bool:
        """Mark a live instance EXITED with ``values`` and, when ``job_status`` is given (it was the
        job's last), move the job from one of ``expected`` to it in the same transaction, so that
        nobody ever sees an active job whose instances all ended. False (nothing written) if the
        instance had ended already."""
        with self.engine.begin() as c:
            res = c.execute(instances.update().where(
                instances.c.job_id == job_id, instances.c.instance_id == instance_id,
                instances.c.status.in_(sorted(LIVE_INSTANCE))).values(status=INSTANCE_STATUS.EXITED.value, **values))
            if res.rowcount == 0:
                return False
            _keep_usage(c, job_id, instance_id)
            if job_status is not None:
                sources = [s.value for s in expected if can_transition(s, job_status)]
                now = utcnow()
                if c.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status.in_(sources)).values(
                        status=job_status.value, message=message, completed_time=now)).rowcount:
                    _event(c, job_id, job_status.value, message, now)
        return True

    def instances_of(self, job_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            q = sa.select(instances).where(instances.c.job_id == job_id).order_by(instances.c.instance_id)
            return [_row(r) for r in c.execute(q)]

    def live_instances(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            q = sa.select(instances).where(instances.c.status.in_(sorted(LIVE_INSTANCE)))
            return [_row(r) for r in c.execute(q)]

    def used_slots(self, pool: str) -> set[int]:
        q = (sa.select(instances.c.slot).join(jobs, jobs.c.id == instances.c.job_id)
             .where(jobs.c.compute_pool == pool, instances.c.status.in_(sorted(LIVE_INSTANCE))))
        with self.engine.connect() as c:
            return {r[0] for r in c.execute(q)}

    def pool_usage(self) -> dict[str, dict[str, int]]:
        """Per pool: nodes in use, jobs queued, jobs running."""
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as c:
            q = (sa.select(jobs.c.compute_pool, sa.func.count()).join(instances, jobs.c.id == instances.c.job_id)
                 .where(instances.c.status.in_(sorted(LIVE_INSTANCE))).group_by(jobs.c.compute_pool))
            for pool, n in c.execute(q):
                out.setdefault(pool, {"nodes_in_use": 0, "queued": 0, "running": 0})["nodes_in_use"] = n
            q = (sa.select(jobs.c.compute_pool, jobs.c.status, sa.func.count())
                 .where(jobs.c.status.in_([JOB_STATUS.PENDING.value, JOB_STATUS.RUNNING.value,
                                           JOB_STATUS.CANCELLING.value]))
                 .group_by(jobs.c.compute_pool, jobs.c.status))
            for pool, status, n in c.execute(q):
                d = out.setdefault(pool, {"nodes_in_use": 0, "queued": 0, "running": 0})
                d["queued" if status == JOB_STATUS.PENDING.value else "running"] += n
        return out

    # -- users and secrets --------------------------------------------------------------------
    def create_user(self, name: str, token_hash: str, admin: bool) -> None:
        try:
            with self.engine.begin() as c:
                c.execute(users.insert().values(name=name, token_hash=token_hash, admin=admin, created_time=utcnow()))
        except sa.exc.IntegrityError:
            raise ConflictError(f"user {name!r} already exists; `mljobs user delete {name}` first, or pick "
                                "another name") from None

    def user_by_token_hash(self, token_hash: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(sa.select(users).where(users.c.token_hash == token_hash)).first()
        return _row(r) if r else None

    def list_users(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            q = sa.select(users.c.name, users.c.admin, users.c.created_time).order_by(users.c.name)
            return [_row(r) for r in c.execute(q)]

    def has_users(self) -> bool:
        with self.engine.connect() as c:
            return c.execute(sa.select(users.c.name).limit(1)).first() is not None

    def user_uid(self, name: str, first: int, last: int) -> int:
        """The uid ``name``'s sandboxed jobs run as: given on first use, one more than any given
        before (``job_uid_high`` in the secrets table: a deleted user's uid, which may still own
        files on a shared filesystem, is never given to another user), and kept."""
        for _ in range(10):
            with self.engine.connect() as c:
                r = c.execute(sa.select(users.c.uid).where(users.c.name == name)).first()
                if r is None:
                    raise NotFoundError(f"user {name!r} does not exist")
                if r[0] is not None:
                    return int(r[0])
                top = c.execute(sa.select(sa.func.max(users.c.uid))).scalar()
                high = c.execute(sa.select(secrets.c.value).where(secrets.c.name == _UID_HIGH)).scalar()
            uid = max(first, (top or 0) + 1, int(high) + 1 if high is not None else 0)
            if uid > last:
                raise ConflictError(f"no uid is left for user {name!r} in the job uid range {first}-{last}; "
                                    "widen it (MLJOBS_JOB_UIDS=FIRST-LAST)")
            try:
                with self.engine.begin() as c:
                    if high is None:
                        c.execute(secrets.insert().values(name=_UID_HIGH, value=str(uid)))
                    elif c.execute(secrets.update().where(secrets.c.name == _UID_HIGH, secrets.c.value == high)
                                   .values(value=str(uid))).rowcount != 1:
                        raise _Raced()
                    c.execute(users.update().where(users.c.name == name, users.c.uid.is_(None)).values(uid=uid))
            except (sa.exc.IntegrityError, _Raced):  # another server gave a uid meanwhile: look again
                continue
        raise ConflictError(f"could not give user {name!r} a uid; try again")

    def delete_user(self, name: str) -> None:
        with self.engine.begin() as c:
            if c.execute(users.delete().where(users.c.name == name)).rowcount == 0:
                raise NotFoundError(f"user {name!r} does not exist; `mljobs user list` shows the users")

    def secret(self, name: str) -> str:
        """The server's secret called ``name``, made (random) on first use; every server of a
        shared database reads the same one."""
        with self.engine.connect() as c:
            r = c.execute(sa.select(secrets.c.value).where(secrets.c.name == name)).first()
        if r is not None:
            return str(r[0])
        try:
            with self.engine.begin() as c:
                c.execute(secrets.insert().values(name=name, value=pysecrets.token_hex(32)))
        except sa.exc.IntegrityError:  # another server made it first
            pass
        return self.secret(name)
