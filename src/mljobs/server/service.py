"""The control plane: one object whose operations the routes in ``app.py`` call.

Its operations live in modules named for their concern, as the bases of :class:`ControlPlane`:
:mod:`.catalog` (pools, stages, integrations, environments), :mod:`.admission` (checks and
recording of a submission), :mod:`.lifecycle` (scheduling, starts, reports),
:mod:`.completion` (exits, outcomes, retries; the provider's exit watcher calls
:meth:`instance_exited`) and :mod:`.queries` (reading and controlling jobs). This module holds
its state, its threads and its users.
One lock serializes scheduling decisions inside this process; the store's compare-and-set
transitions keep state right even across processes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import sys
import threading
import time
from typing import Any

import cloudpickle
import sqlalchemy as sa

from mljobs import __version__
from mljobs.config import Settings
from mljobs.errors import NotFoundError
from mljobs.paths import HomePaths
from mljobs.providers.base import InstanceHandle, Provider, get_provider_class
from mljobs.server.admission import Admission
from mljobs.server.auth import Authenticator, Principal, make_user
from mljobs.server.catalog import PYPI_ACCESS, Catalog
from mljobs.server.completion import Completion
from mljobs.server.definitions import Definitions
from mljobs.server.isolation import Isolation
from mljobs.server.lifecycle import Lifecycle
from mljobs.server.monitor import reconcile_once
from mljobs.server.notify import Notifier
from mljobs.server.queries import Queries
from mljobs.server.quotas import Quotas
from mljobs.server.schedules import Schedules
from mljobs.server.store import Store, utcnow
from mljobs.server.usage import Usage, family_weight
from mljobs.spec import DEFAULT_POOL, REMOTE_FEATURE
from mljobs.status import ACTIVE, INSTANCE_STATUS, JOB_STATUS, LIVE_INSTANCE, TERMINAL_VALUES

__all__ = ["ControlPlane", "SYSTEM"]


log = logging.getLogger("mljobs.server")
SYSTEM = Principal("mljobs", admin=True)  # the server acting on its own (shutdown, TTL)
# what /health tells clients this server does, beyond its version
FEATURES = (REMOTE_FEATURE,)


class ControlPlane(Catalog, Admission, Lifecycle, Completion, Queries):
    """The control plane: its state and life (threads, reconciliation, stop) and its users here;
    each concern's operations in the module named for it (the bases)."""

    def __init__(self, settings: Settings, store: Store, url: str = "", *, loopback: bool = True) -> None:
        # remote nodes reach the control plane here (the address it listens on unless configured)
        self.settings = settings if settings.advertise_url else dataclasses.replace(settings, advertise_url=url)
        self.loopback = loopback
        self.auth: Authenticator  # made by start(), once the store has its tables
        self.home = HomePaths(settings.home)
        self.store = store
        self.url = url
        self.notifier = Notifier()
        self._providers: dict[str, Provider] = {}
        self._lock = threading.RLock()
        self._ending: set[tuple[str, int]] = set()  # instances whose end is being recorded (completion)
        # (job, attempt, instance) -> lost: whose checkpoint its end kept already, outside the lock (completion)
        self._kept_checkpoints: dict[tuple[str, int, int], bool] = {}
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        # pools whose queue may start something: the scheduler thread takes them, so a submission
        # answers once its job is recorded and a start never waits behind the submissions
        self._to_schedule: set[str] = set()
        self._schedule_wake = threading.Condition()
        self._scheduler: threading.Thread | None = None
        self.definitions = Definitions(self)
        self.schedules = Schedules(self)
        self.quotas = Quotas(store)
        self.usage = Usage(settings.fair_half_life_h * 3600.0)
        # Pools that may hold a running job with fewer instances than its target (None: unknown,
        # as after a start), so that scheduling asks the store about late instances only then.
        self._maybe_short: set[str] | None = None

    # -- life ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Migrate, create the default pool, reattach to live instances, start the monitor."""
        self.store.migrate()
        self.auth = Authenticator(self.store, loopback=self.loopback, server_token=self.settings.token)
        self.isolation = Isolation(self.settings, self.store, self.home.root, self.home.root / "envs")
        self.isolation.check_start()
        if self.settings.create_default_pool:
            self.create_pool(DEFAULT_POOL, instance_family="CPU_X64_XS", min_nodes=1,
                             max_nodes=max(1, len(os.sched_getaffinity(0))), if_not_exists=True)
        self.store.create_integration(*PYPI_ACCESS, if_not_exists=True)
        self._load_usage()
        self.reconcile(attach=True)
        self._sweep()
        for pool in self.store.list_pools():
            self.schedule(pool["name"])
        self._scheduler = threading.Thread(target=self._scheduler_loop, name="mljobs-scheduler", daemon=True)
        self._scheduler.start()
        self._monitor = threading.Thread(target=self._monitor_loop, name="mljobs-monitor", daemon=True)
        self._monitor.start()
        self.schedules.start()

    def _has_users(self) -> bool:
        """Whether the server has users (the authenticator's answer, cached, once started)."""
        return self.auth.has_users() if hasattr(self, "auth") else self.store.has_users()

    def _fair_look_back(self) -> dt.timedelta:
        """How far back fair share looks: eight half-lives (what is older counts for < 0.4%)."""
        return dt.timedelta(seconds=8 * self.usage.half_life_s)

    def _usage_look_back(self) -> dt.timedelta:
        """How long a run is kept: for fair share, and at least a day (daily quotas)."""
        return max(self._fair_look_back(), dt.timedelta(days=1))

    def _load_usage(self) -> None:
        """Each user's recent usage from the runs that ended within eight half-lives (kept apart
        from their jobs: a deleted or requeued job's run still counts); older ones are forgotten."""
        self.store.prune_usage(utcnow() - self._usage_look_back())
        since = utcnow() - self._fair_look_back()
        for span in self.store.instance_spans(since):
            if span["started_time"] and span["ended_time"]:
                seconds = (span["ended_time"] - span["started_time"]).total_seconds()
                self.usage.add(span["owner"], family_weight(span["instance_family"]) * max(0.0, seconds),
                               span["ended_time"].timestamp())

    def _usage_now(self) -> dict[str, float]:
        """Every user's usage now: the decayed record plus what their running instances ran so far."""
        now = utcnow()
        out = self.usage.snapshot(now.timestamp())
        for span in self.store.instance_spans(live=True):
            if span["started_time"]:
                ran = max(0.0, (now - span["started_time"]).total_seconds())
                out[span["owner"]] = out.get(span["owner"], 0.0) + family_weight(span["instance_family"]) * ran
        return out

    def request_schedule(self, pool_name: str) -> None:
        """Have the scheduler thread look at ``pool_name``'s queue now (at once, in this thread,
        before :meth:`start` made one)."""
        if self._scheduler is None:
            self.schedule(pool_name)
            return
        with self._schedule_wake:
            self._to_schedule.add(pool_name)
            self._schedule_wake.notify()

    def _scheduler_loop(self) -> None:
        while not self._stop.is_set():
            with self._schedule_wake:
                while not self._to_schedule and not self._stop.is_set():
                    self._schedule_wake.wait(1.0)
                pools, self._to_schedule = self._to_schedule, set()
            for name in sorted(pools):
                try:
                    self.schedule(name)
                except NotFoundError:
                    pass  # the pool was dropped meanwhile
                except Exception:  # noqa: BLE001 - the next request or the monitor tries again
                    log.exception("scheduling pool %s", name)

    def _sweep(self) -> None:
        """Kill what jobs that already ended left behind (a server that died mid-finish)."""
        terminal = TERMINAL_VALUES

        def ended(job_id: str) -> bool:
            try:
                return self.store.get_job(job_id).status in terminal
            except NotFoundError:
                return False  # not this server's job

        for name in {p["provider"] for p in self.store.list_pools()}:
            swept = self.provider_named(name).sweep(ended)
            if swept:
                log.warning("killed processes left behind by ended jobs %s", ", ".join(swept))

    def _monitor_loop(self) -> None:
        next_prune = 0.0
        next_usage_prune = time.monotonic() + 3600.0
        while not self._stop.wait(5.0):
            try:
                self.reconcile(attach=False)
                if time.monotonic() >= next_usage_prune:
                    self.store.prune_usage(utcnow() - self._usage_look_back())
                    next_usage_prune = time.monotonic() + 3600.0
                for pool in self.store.list_pools():  # a start that failed for a while is tried again
                    self.request_schedule(pool["name"])
                ttl_s = self.settings.job_ttl_days * 86400.0
                if ttl_s > 0 and time.monotonic() >= next_prune:
                    # small batches, so a long backlog never holds the store for long; a full
                    # batch means more are due, so the next one comes at the next tick
                    if len(self.prune_jobs(ttl_s, None, None, limit=100)) < 100:
                        next_prune = time.monotonic() + min(600.0, ttl_s / 4)
            except sa.exc.OperationalError as e:  # the store locked or unreachable for a while
                log.warning("monitor: the store did not answer (%s); trying again in 5 s", e.orig)

    def reconcile(self, attach: bool) -> None:
        live = self.store.live_instances()
        reconcile_once(live, self.provider, lambda j: self.store.get_job(j).compute_pool,
                       self.instance_exited, utcnow(), attach=attach, on_found=self._record_found,
                       on_never_started=self._start_again)
        # A job whose instances all ended but that is still active: the server died (or its exit
        # callback failed) between recording the last exit and moving the job. Complete it now,
        # from what the provider's files say, as instance_exited would have.
        for job in self.store.list_jobs(0, statuses=[JOB_STATUS.CANCELLING.value, JOB_STATUS.RUNNING.value]):
            with self._lock:
                job = self.store.get_job(job.id)
                insts = self.store.instances_of(job.id)
                if job.status in (JOB_STATUS.CANCELLING.value, JOB_STATUS.RUNNING.value) and not any(
                        i["status"] in LIVE_INSTANCE for i in insts):
                    self._complete(job, insts, None)
                else:
                    continue
            self.schedule(job.compute_pool)

    def _start_again(self, inst: dict[str, Any]) -> bool:
        """After a restart: start the instance of a one-instance job that the server recorded as
        started but stopped before asking the provider for it (a job RUNNING in the store whose
        payload never ran). True if it was started (or the job is over); False leaves it to the
        usual rule (lost after a grace period)."""
        with self._lock:
            job = self.store.get_job(inst["job_id"])
            if job.status != JOB_STATUS.RUNNING.value or job.target_instances != 1 or inst["instance_id"] != 0:
                return False
            log.warning("job %s: its instance was never started (the server stopped first); starting it now", job.id)
            self._start_instances(job, self.store.get_pool(job.compute_pool), [inst["slot"]])
            return True

    def _record_found(self, handle: InstanceHandle) -> None:
        """reconcile_once found a running instance whose handle was never stored."""
        self.store.update_instance(handle.job_id, handle.instance_id, status=INSTANCE_STATUS.RUNNING.value, handle=handle.to_dict())

    def stop(self, cancel_jobs: bool = False) -> None:
        self._stop.set()
        self.schedules.stop()
        with self._schedule_wake:
            self._schedule_wake.notify()
        if self._scheduler is not None:
            self._scheduler.join(timeout=30)
        if cancel_jobs:
            for job in self.store.list_jobs(0, statuses=[s.value for s in ACTIVE]):
                try:
                    self.cancel(job.id, SYSTEM)
                except Exception:  # noqa: BLE001
                    log.exception("cancel %s on shutdown", job.id)
        for p in self._providers.values():
            p.close()

    def provider(self, pool_name: str) -> Provider:
        return self.provider_named(self.store.get_pool(pool_name)["provider"])

    def provider_named(self, name: str) -> Provider:
        if name not in self._providers:
            self._providers[name] = get_provider_class(name)(self.home, self.settings)
        return self._providers[name]

    def info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "python": "%d.%d.%d" % sys.version_info[:3],
            "cloudpickle": cloudpickle.__version__,
            "pid": os.getpid(),
            "home": str(self.home.root),
            "store": self.store.engine.dialect.name,
            "auth": "local-admin" if self.auth.anonymous_allowed() else "tokens",
            "containment": {name: p.containment() for name, p in self._providers.items()},
            "isolation": self.isolation.describe(),
            "features": list(FEATURES),
        }

    # -- users --------------------------------------------------------------------------------
    def create_user(self, name: str, admin: bool, who: Principal | None) -> dict[str, Any]:
        """Make a user; the answer holds their token, which is shown this once."""
        if who is not None:
            who.require_admin("creating users")
        made = make_user(self.store, name, admin)
        self.auth.forget()
        self.isolation.users_changed()
        return made

    def list_users(self, who: Principal) -> list[dict[str, Any]]:
        who.require_admin("listing users")
        return self.store.list_users()

    def delete_user(self, name: str, who: Principal) -> None:
        who.require_admin("deleting users")
        self.store.delete_user(name)
        self.auth.forget()
        self.isolation.users_changed()
