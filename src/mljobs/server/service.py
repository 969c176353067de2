"""The control plane's operations: submit, schedule, finish, cancel, delete, pools, stages.

Routes in ``app.py`` call these; the provider's exit watcher calls :meth:`instance_exited`.
One lock serializes scheduling decisions inside this process; the store's compare-and-set
transitions keep state right even across processes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import importlib.util
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Generator
from typing import IO, Any
from urllib.parse import urlsplit

import cloudpickle
import sqlalchemy as sa

from mljobs import __version__, logformat, trace
from mljobs.config import Settings
from mljobs.errors import (ConflictError, InvalidArgumentError, InvalidTransitionError, NotFoundError, SandboxError,
                           PermissionDeniedError, VersionMismatchError)
from mljobs.paths import HomePaths, StagePaths
from mljobs.providers.base import (InstanceExit, InstanceHandle, InstanceLaunch, InstanceReport, Provider,
                                   UnsupportedError, get_provider_class)
from mljobs.runtime import environment as envs
from mljobs.runtime.launcher import check_versions
from mljobs.server import metrics
from mljobs.server.auth import Authenticator, Principal, make_user
from mljobs.server.definitions import Definitions
from mljobs.server.isolation import Isolation
from mljobs.server.monitor import reconcile_once
from mljobs.server.notify import Notifier
from mljobs.server.records import JobRecord, QueuedJob
from mljobs.server.quotas import Quotas
from mljobs.server.scheduler import choose_victims, pending_reason, plan, plan_top_ups
from mljobs.server.schedules import Schedules
from mljobs.server.store import Store, utcnow
from mljobs.server.usage import Usage, family_weight, is_fair
from mljobs.spec import DEFAULT_POOL, INSTANCE_FAMILIES, JobSpec, PayloadKind, PoolSpec, PoolState, check_identifier, check_stage_name, is_job_id, new_job_id
from mljobs.stages import Stage, parse_stage_path
from mljobs.status import (ACTIVE, ACTIVE_VALUES, INSTANCE_STATUS, JOB_STATUS, LIVE_INSTANCE, TERMINAL,
                           TERMINAL_VALUES)

__all__ = ["ControlPlane", "safe_ray_info"]


_HTTP_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/\-]*)?")
_HOST_PORT = re.compile(r"[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}")
log = logging.getLogger("mljobs.server")


def safe_ray_info(info: Any) -> dict[str, str | None]:
    """The Ray addresses a job's own head wrote, passed on only as an http(s) URL and a host:port:
    never something a browser would run (a ``javascript:`` link on the dashboard) or a client
    would trip on."""
    info = info if isinstance(info, dict) else {}
    url, gcs = info.get("dashboard_url"), info.get("gcs_address")
    return {"gcs_address": gcs if isinstance(gcs, str) and _HOST_PORT.fullmatch(gcs) else None,
            "dashboard_url": url if isinstance(url, str) and _HTTP_URL.fullmatch(url) else None}
# Built in: the public package index (the simple API and the file host).
PYPI_ACCESS = ("PYPI_ACCESS", ["pypi.org", "files.pythonhosted.org"])
DEFAULT_INDEX = "https://pypi.org/simple"
SYSTEM = Principal("mljobs", admin=True)  # the server acting on its own (shutdown, TTL)
_SIGNALS = {9: "SIGKILL: out of memory, or killed", 15: "SIGTERM", 11: "SIGSEGV: crashed", 6: "SIGABRT"}


class ControlPlane:
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

    def _load_usage(self) -> None:
        """Each user's recent usage from the instances that ended within eight half-lives."""
        since = utcnow() - dt.timedelta(seconds=8 * self.usage.half_life_s)
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
        while not self._stop.wait(5.0):
            try:
                self.reconcile(attach=False)
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
        }

    # -- pools --------------------------------------------------------------------------------
    def create_pool(self, name: str, *, instance_family: str, min_nodes: int = 1, max_nodes: int = 1,
                    provider: str = "local", provider_options: dict[str, Any] | None = None,
                    if_not_exists: bool = False, who: Principal | None = None, scheduling: str | None = None,
                    preemption: bool = False, max_priority: int = 0) -> dict[str, Any]:
        """Make a pool; ``who`` becomes its owner (None: the server's own, managed by admins).
        The provider checks the pool (its options, that its engine answers and its nodes fit the
        family) before anything is recorded."""
        spec = PoolSpec(name, instance_family, min_nodes, max_nodes, provider, provider_options or {},
                        scheduling=scheduling, preemption=preemption, max_priority=max_priority)
        if spec.provider_options.get("mounts") and who is not None and not who.admin:
            raise PermissionDeniedError(f"compute pool {name}: only an admin names the host folders jobs may see "
                                        "(the mounts option)")
        cls = get_provider_class(spec.provider)
        if spec.provider not in self._providers:
            self._providers[spec.provider] = cls(self.home, self.settings)
        self._providers[spec.provider].validate_pool(spec)
        self.store.create_pool(spec, if_not_exists=if_not_exists, owner=who.name if who else None)
        return self.describe_pool(spec.name)

    def _check_pool_owner(self, pool: dict[str, Any], who: Principal | None, what: str) -> None:
        """Only a pool's owner or an admin changes it; the server's own pools only admins."""
        if who is None or who.admin or (pool["owner"] is not None and pool["owner"] == who.name):
            return
        owner = f"user {pool['owner']!r}" if pool["owner"] else "the server (its admins)"
        raise PermissionDeniedError(f"compute pool {pool['name']} belongs to {owner}: only they or an admin "
                                    f"may {what} it")

    def describe_pool(self, name: str, with_users: bool = True) -> dict[str, Any]:
        pool = self.store.get_pool(check_identifier("compute pool", name))
        usage = self.store.pool_usage().get(pool["name"], {"nodes_in_use": 0, "queued": 0, "running": 0})
        state = PoolState.SUSPENDED if pool["suspended"] else (
            PoolState.ACTIVE if usage["nodes_in_use"] else PoolState.IDLE)
        fam = INSTANCE_FAMILIES[pool["instance_family"]]
        fair = is_fair(pool, self._has_users())
        return {**pool, "state": state.value, **usage, "family": fam.describe(),
                "cpus_per_node": fam.cpus, "memory_bytes_per_node": fam.memory_bytes, "gpus_per_node": fam.gpus,
                "scheduling": "fair" if fair else "fifo", "users": self._pool_users(pool) if with_users else []}

    def _pool_users(self, pool: dict[str, Any]) -> list[dict[str, Any]]:
        """Who holds the pool now: each user's running instances, queued jobs, recent usage (every
        pool's, weighted and decayed: what fair share orders by) and share of that usage."""
        running = Counter(owner for _, owner, _ in self.store.pool_instances(pool["name"]))
        queued = self.store.queued_by_owner(pool["name"])
        owners = sorted(set(running) | set(queued))
        usage = self._usage_now() if owners else {}
        total = sum(usage.get(o, 0.0) for o in owners)
        return [{"user": o, "running_instances": running.get(o, 0), "queued_jobs": queued.get(o, 0),
                 "usage": round(usage.get(o, 0.0), 3), "share": round(usage.get(o, 0.0) / total, 4) if total else 0.0,
                 "max_instances": self.quotas.limits(o, pool["name"])["max_instances"]} for o in owners]

    def list_pools(self) -> list[dict[str, Any]]:
        return [self.describe_pool(p["name"], with_users=False) for p in self.store.list_pools()]

    def alter_pool(self, name: str, *, suspend: bool | None = None, resume: bool | None = None,
                   max_nodes: int | None = None, who: Principal | None = None, scheduling: str | None = None,
                   preemption: bool | None = None, max_priority: int | None = None) -> dict[str, Any]:
        name = check_identifier("compute pool", name)
        self._check_pool_owner(self.store.get_pool(name), who, "alter")
        if suspend and resume:
            raise InvalidArgumentError("alter_compute_pool: give suspend=True or resume=True, not both")
        values: dict[str, Any] = {}
        if suspend:
            values["suspended"] = True
        if resume:
            values["suspended"] = False
        if max_nodes is not None:
            pool = self.store.get_pool(name)
            spec = PoolSpec(name, pool["instance_family"], min(pool["min_nodes"], max_nodes), max_nodes,
                            pool["provider"], pool["provider_options"])
            self.provider(name).validate_pool(spec)
            values.update(max_nodes=max_nodes, min_nodes=spec.min_nodes)
        if scheduling is not None:
            PoolSpec(name, "CPU_X64_XS", scheduling=scheduling)  # says what is wrong with it
            values["scheduling"] = scheduling
        if preemption is not None:
            values["preemption"] = bool(preemption)
        if max_priority is not None:
            values["max_priority"] = int(max_priority)
        if values:
            self.store.update_pool(name, **values)
        else:
            self.store.get_pool(name)
        self.schedule(name)
        return self.describe_pool(name)

    def drop_pool(self, name: str, who: Principal | None = None) -> None:
        name = check_identifier("compute pool", name)
        self._check_pool_owner(self.store.get_pool(name), who, "drop")
        self.store.drop_pool(name)

    # -- stages -------------------------------------------------------------------------------
    def stage(self, name: str, create: bool = True, who: Principal | None = None) -> Stage:
        """A stage by name, made on first use (owned by ``who``); ``who`` must be allowed to use it
        (None: the server itself)."""
        name = check_stage_name(name)
        row = self.store.get_stage(name)
        if row is None:
            if not create:
                raise NotFoundError(f"stage @{name} does not exist; stages are created when a job or "
                                    "`mljobs stage put` first uses them")
            row = self.store.create_stage(name, str(self.home.stage_root(name)), owner=who.name if who else None)
        if who is not None and not who.may_use(row["owner"]):
            raise PermissionDeniedError(f"stage @{name} belongs to user {row['owner']!r}; use a stage of your own "
                                        "(another stage_name) or ask them to share results another way")
        stage = Stage(row["name"], row["url"])
        stage.ensure()
        return stage

    def create_stage(self, name: str, url: str | None = None, who: Principal | None = None) -> dict[str, Any]:
        name = check_stage_name(name)
        if url is not None and who is not None:  # any fsspec URL reaches the server's files and credentials
            who.require_admin(f"a stage on {url!r}")
        row = self.store.create_stage(name, url or str(self.home.stage_root(name)), if_not_exists=False,
                                      owner=who.name if who else None)
        Stage(row["name"], row["url"]).ensure()
        return row

    # -- external access integrations and environments ---------------------------------------
    def create_integration(self, name: str, allowed_hosts: list[str], *, replace: bool = False,
                           if_not_exists: bool = False, who: Principal | None = None) -> dict[str, Any]:
        if who is not None:
            who.require_admin("creating an external access integration")
        name = check_identifier("external access integration", name)
        if not isinstance(allowed_hosts, list) or not allowed_hosts or not all(
                isinstance(h, str) and h.strip() and "/" not in h for h in allowed_hosts):
            raise InvalidArgumentError(
                f"allowed_hosts must be a non-empty list of host names or patterns like 'pypi.org' or "
                f"'*.example.com' (no scheme or path), got {allowed_hosts!r}")
        if name == PYPI_ACCESS[0] and not if_not_exists:
            raise ConflictError(f"{name} is built in; create an integration with another name")
        self.store.create_integration(name, [h.strip().lower() for h in allowed_hosts], replace=replace,
                                      if_not_exists=if_not_exists)
        return next(i for i in self.store.list_integrations() if i["name"] == name)

    def list_integrations(self) -> list[dict[str, Any]]:
        return self.store.list_integrations()

    def drop_integration(self, name: str, who: Principal | None = None) -> None:
        if who is not None:
            who.require_admin("dropping an external access integration")
        name = check_identifier("external access integration", name)
        if name == PYPI_ACCESS[0]:
            raise ConflictError(f"{name} is built in and cannot be dropped")
        self.store.drop_integration(name)

    def env_cache(self) -> envs.EnvCache:
        return envs.EnvCache(self.home.root / "envs", self.settings.env_cache_max_bytes)

    def list_envs(self) -> list[dict[str, Any]]:
        return self.env_cache().entries()

    def prune_envs(self, max_bytes: int | None = None, who: Principal | None = None) -> list[dict[str, Any]]:
        """Evict idle environments, least recently used first, down to ``max_bytes`` (0: all idle)."""
        if who is not None:
            who.require_admin("pruning the server's environments")
        return self.env_cache().prune(max_bytes, recent_s=0.0)

    def _allowed_hosts(self, names: list[str]) -> list[str]:
        """The hosts a job's external access integrations allow (its sandbox's only way out)."""
        if not names:
            return []
        known = {i["name"]: i["allowed_hosts"] for i in self.store.list_integrations()}
        return [h for n in names for h in known.get(n.upper(), [])]

    def _check_egress(self, spec: JobSpec) -> None:
        """Unknown integrations are refused; in strict mode so are installs no integration allows."""
        known = {i["name"]: i["allowed_hosts"] for i in self.store.list_integrations()}
        names = [n.upper() for n in spec.external_access_integrations]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InvalidArgumentError(
                f"unknown external access integration(s) {unknown}; known: {sorted(known)}. Create one with "
                "create_external_access_integration(name, allowed_hosts=[...])")
        if not (spec.pip_requirements and (self.settings.strict_egress or self.isolation.filters_egress())):
            return  # installs follow the job's integrations too where its payload's network does
        allowed = [h for n in names for h in known[n]]
        hosts = _index_hosts(spec)
        denied = [h for h in hosts if not any(fnmatch.fnmatch(h, pat) for pat in allowed)]
        if denied:
            hint = ("external_access_integrations=['PYPI_ACCESS']" if set(denied) <= set(PYPI_ACCESS[1]) else
                    f"an integration that allows them: create_external_access_integration('MY_INDEX', "
                    f"allowed_hosts={denied!r}), then external_access_integrations=['MY_INDEX']")
            raise InvalidArgumentError(
                f"this server requires an external access integration to install packages: pip_requirements "
                f"{spec.pip_requirements} need host(s) {denied}, which none of the job's integrations "
                f"{names or '(none)'} allow; add {hint}")

    def _check_ray(self, spec: JobSpec) -> None:
        """A multi-node job (not parallel) runs a Ray cluster: its runtime needs Ray."""
        if importlib.util.find_spec("ray") is None:
            raise InvalidArgumentError(
                f"target_instances={spec.target_instances} runs the job on a Ray cluster, but Ray is not "
                "installed on the server; install it there with pip install 'mljobs[multinode]', or submit a "
                "file or directory with parallel=True, which runs the entrypoint on every instance without Ray")

    def _choose_interpreter(self, spec: JobSpec) -> None:
        """Fill in ``spec.runtime_python`` from ``runtime_environment`` and the client's Python."""
        want = (spec.runtime_environment or "").strip()
        client_mm = ".".join(spec.client_python.split(".")[:2])
        if want.lower() == "server":
            python = sys.executable
        elif want and os.sep in want:
            if not (os.path.isfile(want) and os.access(want, os.X_OK)):
                raise InvalidArgumentError(f"runtime_environment {want!r} is not an executable interpreter "
                                           "on the server")
            python = want
        elif want:
            found = envs.find_interpreter(want)
            if found is None:
                raise InvalidArgumentError(
                    f"runtime_environment={want!r}: the server has no Python {want} (mljobs runs on 3.10 and later); it has "
                    f"{envs.available_versions()} (or pass 'server' or an interpreter path)")
            python = found
        else:  # the client's major.minor when the server has it, else the server's own
            python = (envs.find_interpreter(client_mm) if client_mm else None) or sys.executable
        spec.runtime_python = python

    def _environment_for(self, spec: JobSpec) -> dict[str, Any] | None:
        same = envs.is_server_python(spec.runtime_python or sys.executable)
        if same and not spec.pip_requirements:
            return None
        cache = self.env_cache()
        req = envs.EnvRequest(
            requirements=envs.normalize_requirements(spec.pip_requirements),
            python=spec.runtime_python or sys.executable,
            index=envs.index_settings(spec.env_vars),
            # another interpreter gets mljobs' runtime and the client's cloudpickle, nothing else of ours
            runtime_packages=[] if same else [f"cloudpickle=={spec.client_cloudpickle or cloudpickle.__version__}"],
            ship_runtime=not same,
        )
        return {"request": req.to_dict(), "cache_dir": str(cache.root), "max_bytes": cache.max_bytes,
                "timeout_s": self.settings.install_timeout_s}

    # -- jobs: submit -------------------------------------------------------------------------
    def check_submission(self, spec: JobSpec, who: Principal | None = None) -> dict[str, Any]:
        """Refuse what cannot run (naming why and the fix); the job's pool. ``who``: the submitter
        (None: the server, a schedule's tick, already checked when the schedule was made)."""
        pool = self.store.get_pool(spec.compute_pool)
        provider = self.provider(pool["name"])
        if who is not None and not who.admin and spec.priority > pool["max_priority"]:
            raise PermissionDeniedError(
                f"priority={spec.priority} is above pool {pool['name']}'s max_priority={pool['max_priority']}, the "
                "highest a user may ask for; only an admin goes higher (or raises it: alter_compute_pool("
                f"{pool['name']!r}, max_priority=...))")
        if spec.owner:
            self.quotas.check_submit(spec.owner, pool["name"], spec.effective_min_instances)
        if spec.effective_min_instances > pool["max_nodes"]:
            raise InvalidArgumentError(
                f"the job needs at least {spec.effective_min_instances} instance(s) but pool {pool['name']} "
                f"has max_nodes={pool['max_nodes']}; lower min_instances/target_instances or raise max_nodes "
                f"with alter_compute_pool({pool['name']!r}, max_nodes=...)"
            )
        if spec.target_instances > 1 and not provider.supports_multinode:
            raise UnsupportedError(
                f"target_instances={spec.target_instances}: the {provider.name} provider does not run "
                "multi-node jobs yet; use target_instances=1"
            )
        if spec.target_instances > 1 and not spec.parallel:
            self._check_ray(spec)
        if provider.remote:  # its nodes read the stage themselves: is it one they can reach?
            stage = self.store.get_stage(check_stage_name(spec.stage_name))
            provider.check_job(spec, PoolSpec.from_dict(pool), stage["url"] if stage else str(
                self.home.stage_root(spec.stage_name)))
        if not all(isinstance(r, str) and r.strip() for r in spec.pip_requirements):
            raise InvalidArgumentError(f"pip_requirements must be requirement strings like 'humanize==4.9.0', "
                                       f"got {spec.pip_requirements!r}")
        self._check_egress(spec)
        self._choose_interpreter(spec)
        if spec.payload_kind == PayloadKind.FUNCTION:
            runtime = envs.interpreter_version(spec.runtime_python)
            problem = check_versions(
                spec.client_python, spec.client_cloudpickle, runtime_python=runtime,
                # another interpreter's environment is given the client's cloudpickle
                runtime_cloudpickle=None if envs.is_server_python(spec.runtime_python) else spec.client_cloudpickle)
            if problem:
                raise VersionMismatchError(problem)
        if not spec.entrypoint:
            raise InvalidArgumentError("the job has no entrypoint")
        return pool

    def submit(self, spec: JobSpec, payload: IO[bytes] | None, who: Principal,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Check, store the payload on its stage, record the job PENDING, and schedule it.

        The job belongs to ``who``. A second submission with the same ``idempotency_key`` (a
        client retrying after a lost response) returns the job the first one made.
        """
        began = time.time()
        spec.owner = who.name
        if idempotency_key:
            done = self.store.job_by_key(who.name, idempotency_key)
            if done is not None:
                return self.job_view(done)
        pool = self.check_submission(spec, who)
        stage = self.stage(spec.stage_name, who=who)
        job_id = new_job_id()
        trace.mark(job_id, "server.submit.begin", began)
        paths = StagePaths(job_id)
        try:
            self.stage_payload(spec, stage, paths.app, payload, who)
            trace.mark(job_id, "server.payload.staged")
            self.store.insert_job(self.job_row(job_id, spec, pool, stage, idempotency_key))
        except BaseException:
            stage.remove(paths.prefix)
            first = self.store.job_by_key(who.name, idempotency_key) if idempotency_key else None
            if first is not None:  # the same submission raced itself: the first one stands
                return self.job_view(first)
            raise
        trace.mark(job_id, "server.job.inserted")
        self.request_schedule(pool["name"])
        view = self.job_view(self.store.get_job(job_id))
        trace.mark(job_id, "server.submit.end")
        return view

    def job_row(self, job_id: str, spec: JobSpec, pool: dict[str, Any], stage: Stage,
                idempotency_key: str | None = None, **extra: Any) -> dict[str, Any]:
        """The ``jobs`` row of a new PENDING job (``extra``: its definition, schedule and tick)."""
        return {
            "id": job_id, "name": spec.name or job_id, "status": JOB_STATUS.PENDING.value, "message": "",
            "database_name": spec.database, "schema_name": spec.schema, "owner": spec.owner,
            "compute_pool": pool["name"], "stage_name": stage.name,
            "target_instances": spec.target_instances, "min_instances": spec.effective_min_instances,
            "instances_ran": 0, "spec": spec.to_dict(), "created_time": utcnow(), "priority": spec.priority,
            "idempotency_key": idempotency_key or None, **extra,
        }

    def stage_payload(self, spec: JobSpec, stage: Stage, app_prefix: str, payload: IO[bytes] | None,
                      who: Principal) -> None:
        """Put a submission's payload under ``app_prefix`` on ``stage``: the uploaded tar, or a copy
        of the stage folder it names; a directory's ``requirements.txt`` joins its requirements."""
        if spec.payload_kind == PayloadKind.STAGE:
            self._copy_stage_payload(spec, stage, app_prefix, who)
            return
        if payload is None:
            raise InvalidArgumentError("the submission carries no payload")
        names = stage.extract_tar(payload, app_prefix, self.settings.max_payload_bytes)
        entry = spec.entrypoint[0]
        if len(spec.entrypoint) == 1 and entry.endswith(".py") and entry not in names:
            raise InvalidArgumentError(
                f"entrypoint {entry!r} is not in the uploaded payload ({len(names)} files)")
        if spec.payload_kind == PayloadKind.DIRECTORY and "requirements.txt" in names:
            self._add_requirements_file(spec, stage, f"{app_prefix}requirements.txt")

    def _copy_stage_payload(self, spec: JobSpec, dst: Stage, app_prefix: str, who: Principal) -> None:
        if not spec.source:
            raise InvalidArgumentError("submit_from_stage needs a source like '@stage/path/'")
        src_name, src_path = parse_stage_path(spec.source)
        src = self.stage(src_name, create=False, who=who)
        if not src_path or not src.isdir(src_path):
            raise NotFoundError(f"source {spec.source} does not exist (or is not a folder) on stage @{src_name}; "
                                f"`mljobs stage ls @{src_name}/` lists what is there")
        entry = spec.entrypoint[0]
        if len(spec.entrypoint) == 1 and entry.startswith("@"):
            e_stage, e_path = parse_stage_path(entry)
            base = src_path.rstrip("/") + "/"
            if e_stage != src_name or not e_path.startswith(base):
                raise InvalidArgumentError(f"entrypoint {entry} is outside the source folder {spec.source}")
            spec.entrypoint = [e_path[len(base):]]
        if len(spec.entrypoint) == 1 and spec.entrypoint[0].endswith(".py") and not src.exists(
                f"{src_path.rstrip('/')}/{spec.entrypoint[0]}"):
            raise NotFoundError(f"entrypoint {spec.entrypoint[0]!r} does not exist in {spec.source}")
        src.copy_dir(src_path, dst, app_prefix)
        if dst.exists(f"{app_prefix}requirements.txt"):
            self._add_requirements_file(spec, dst, f"{app_prefix}requirements.txt")

    def _add_requirements_file(self, spec: JobSpec, stage: Stage, path: str) -> None:
        """A ``requirements.txt`` at the payload's root adds to ``pip_requirements`` (checked again)."""
        lines = stage.get_bytes(path).decode("utf-8", "replace").splitlines()
        reqs = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if reqs:
            spec.pip_requirements = [*spec.pip_requirements, *reqs]
            self._check_egress(spec)

    # -- scheduling and exits -----------------------------------------------------------------
    def schedule(self, pool_name: str) -> None:
        with self._lock:
            pool = self.store.get_pool(pool_name)
            live = self.store.pool_instances(pool["name"])
            free = pool["max_nodes"] - len(live)
            if free > 0 or pool["preemption"]:
                # every start takes a slot, so no user can start more than the free slots now
                heads = self.store.pending_heads(pool["name"], per_owner=max(1, free))
                fair = is_fair(pool, self._has_users())
                decision = plan(pool, {slot for slot, _, _ in live}, heads, fair=fair,
                                usage=self._usage_now() if fair and len(heads) > 1 else None,
                                running=Counter(owner for _, owner, _ in live),
                                max_instances=self.quotas.max_instances(list(heads), pool["name"]))
                for head, slots in decision.starts:
                    if not self.store.start_job(head.id, slots):
                        continue  # cancelled meanwhile
                    job = self.store.get_job(head.id)
                    trace.mark(job.id, "server.job.started")
                    if len(slots) < job.target_instances and self._maybe_short is not None:
                        self._maybe_short.add(pool["name"])
                    self._start_instances(job, pool, slots)
                    self.notifier.notify(job.id)
                if decision.blocked is not None and pool["preemption"]:
                    self._preempt(pool, decision.blocked, decision.free)
            if self._maybe_short is None or pool["name"] in self._maybe_short:
                self._top_up(pool)

    def _preempt(self, pool: dict[str, Any], waiting: QueuedJob, free: int) -> None:
        """``waiting`` comes first but does not fit: take the instances of lower-priority jobs
        (preempted jobs go back to the queue as their next attempt, or end CANCELLED)."""
        leaving = [j for j in self.store.list_jobs(0, statuses=[JOB_STATUS.CANCELLING.value], pool=pool["name"],
                                                   with_spec=False) if j.preempted_by]
        if leaving:
            return  # instances are being freed for a job already: it starts once they are
        provider = self.provider(pool["name"])
        for victim in choose_victims(waiting, free, self.store.running_jobs(pool["name"])):
            note = (f"preempted by job {waiting.id} (priority {waiting.priority} over {victim.priority}) of user "
                    f"{waiting.owner} on pool {pool['name']}")
            if not self.store.preempt(victim.id, waiting.id, note):
                continue
            log.info("job %s: %s", victim.id, note)
            self._log_line(victim.id, 0, note)
            for inst in self.store.instances_of(victim.id):
                if inst["status"] in LIVE_INSTANCE and inst["handle"]:
                    provider.cancel(InstanceHandle.from_dict(inst["handle"]), self.settings.grace_period_s)
            self.notifier.notify(victim.id)

    def _top_up(self, pool: dict[str, Any]) -> None:
        """Late instances join running multi-node jobs that started with fewer than their target."""
        short = [j for j in self.store.short_jobs(pool["name"]) if not j.parallel and any(
            i["instance_id"] == 0 and i["status"] == INSTANCE_STATUS.RUNNING.value for i in self.store.instances_of(j.id))]
        if not short:
            if self._maybe_short is None:
                self._maybe_short = {p["name"] for p in self.store.list_pools() if self.store.short_jobs(p["name"])}
            self._maybe_short.discard(pool["name"])
            return
        plan = plan_top_ups(pool, self.store.used_slots(pool["name"]), self.store.pending_jobs(pool["name"], limit=1),
                            short)
        for job, slots in plan:
            first = self.store.add_instances(job.id, slots)
            if first is not None:
                self._start_instances(job, pool, slots, first_id=first)
                self.notifier.notify(job.id)

    def _start_instances(self, job: JobRecord, pool: dict[str, Any], slots: list[int],
                         first_id: int = 0) -> None:
        spec = job.job_spec()
        provider = self.provider(pool["name"])
        family = INSTANCE_FAMILIES[pool["instance_family"]]
        stage = self.stage(job.stage_name)
        environment = self._environment_for(spec)
        count = first_id + len(slots)
        for i, slot in enumerate(slots, start=first_id):
            env = {"MLJOBS_URL": self.settings.advertise_url if provider.remote else self.url,
                   "MLJOBS_JOB_ID": job.id, "MLJOBS_INSTANCE_ID": str(i),
                   "MLJOBS_INSTANCE_COUNT": str(count), "MLJOBS_DATABASE": job.database_name,
                   "MLJOBS_SCHEMA": job.schema_name, "MLJOBS_COMPUTE_POOL": pool["name"],
                   "MLJOBS_ATTEMPT": str(job.attempt)}
            env["MLJOBS_TOKEN"] = self.auth.job_token(job.id)  # acts for the owner, never as an admin
            launch = InstanceLaunch(job.id, i, count, spec, family, slot, stage, env,
                                    self.settings.grace_period_s, environment, PoolSpec.from_dict(pool),
                                    attempt=job.attempt)
            try:
                if provider.sandboxes_payload:
                    launch.sandbox = self.isolation.policy(
                        job.owner, (pool["provider_options"] or {}).get("mounts"), pool["name"],
                        self._allowed_hosts(spec.external_access_integrations), spec.target_instances > 1,
                        provider.remote)
                handle = provider.start(launch)
            except Exception as e:  # noqa: BLE001
                log.exception("start %s/%d", job.id, i)
                if first_id > 0:  # a late instance: the running job goes on without it
                    self.store.update_instance(job.id, i, status=INSTANCE_STATUS.EXITED.value, ended_time=utcnow())
                    self._append_note(job, f"late instance {i} could not start: {e}")
                    continue
                for inst in self.store.instances_of(job.id):  # the ones started already stop too
                    if inst["handle"]:
                        provider.cancel(InstanceHandle.from_dict(inst["handle"]), self.settings.grace_period_s)
                    else:
                        self.store.update_instance(job.id, inst["instance_id"], status=INSTANCE_STATUS.EXITED.value,
                                                   ended_time=utcnow())
                self._finish(self.store.get_job(job.id), None,
                             f"could not start instance {i} on pool {pool['name']}: {e}", isinstance(e, SandboxError))
                if not any(inst["handle"] for inst in self.store.instances_of(job.id)):
                    provider.finish_job(job.id)
                return
            self.store.update_instance(job.id, i, status=INSTANCE_STATUS.RUNNING.value, handle=handle.to_dict())
            trace.mark(job.id, "server.instance.recorded")
            if not provider.watch(handle, self.instance_exited):
                self.instance_exited(handle)

    def instance_report(self, job_id: str, instance_id: int, report: InstanceReport,
                        who: Principal) -> dict[str, Any]:
        """A remote instance's report (its agent, with the job's own token); the reply says what
        the server wants of it. An instance whose job or own run is over is told to stop."""
        if who.job_id != job_id and not who.admin:
            raise PermissionDeniedError(f"only job {job_id}'s own token reports for its instances")
        job = self.store.get_job(job_id)
        inst = next((i for i in self.store.instances_of(job_id) if i["instance_id"] == instance_id), None)
        if inst is None:
            raise NotFoundError(f"job {job_id} has no instance {instance_id}")
        if job.status in TERMINAL_VALUES or inst["status"] == INSTANCE_STATUS.EXITED.value:
            return {"action": "stop"}
        provider = self.provider(job.compute_pool)
        # the agent may report before the server stored the handle its start returned
        handle = InstanceHandle.from_dict(inst["handle"]) if inst["handle"] else InstanceHandle(
            job_id, instance_id, extra={"count": job.target_instances})
        return provider.report(handle, report)

    def instance_exited(self, handle: InstanceHandle) -> None:
        """Record an instance's end (once: the exit watcher and the monitor may both report it);
        when it was the job's last, finish the job in the same store transaction."""
        trace.mark(handle.job_id, "server.exit.seen")
        with self._lock:
            try:
                job = self.store.get_job(handle.job_id)
            except NotFoundError:
                return
            insts = self.store.instances_of(job.id)
            if not any(i["instance_id"] == handle.instance_id and i["status"] in LIVE_INSTANCE for i in insts):
                return  # recorded already
            pool = job.compute_pool
            provider = self.provider(pool)
            exit_ = provider.poll(handle)  # without a pid too: the provider reads any exit record first
            if exit_ is None:  # still running after all (spurious wake-up)
                return
            trace.mark(job.id, "server.exit.polled")
            self._keep_result(job, handle.instance_id, exit_)  # on the stage before the row says EXITED
            if job.attempt <= job.max_retries:  # another attempt may resume from it
                self._keep_checkpoint(job, handle)
            trace.mark(job.id, "server.result.kept")
            now = utcnow()
            values = {"exit_code": exit_.exit_code, "ended_time": now, "exit_record": exit_.to_record(),
                      **metrics.instance_values(provider.metrics(handle), exit_.usage, now.timestamp())}
            self._account(job, next(i for i in insts if i["instance_id"] == handle.instance_id), now)
            live = [i for i in insts if i["status"] in LIVE_INSTANCE and i["instance_id"] != handle.instance_id]
            if live:
                if self.store.record_exit(job.id, handle.instance_id, values) and (
                        job.target_instances > 1 and job.status == JOB_STATUS.RUNNING.value):
                    self._multinode_exit(job, handle.instance_id, exit_, live)
                return
            self._complete(job, insts, (handle.instance_id, values, exit_))
        self.request_schedule(pool)

    def _account(self, job: JobRecord, inst: dict[str, Any], ended: dt.datetime) -> None:
        """Add an ended instance's run to its owner's usage (fair share)."""
        if inst["started_time"] is None:
            return
        try:
            family = self.store.get_pool(job.compute_pool)["instance_family"]
        except NotFoundError:
            return
        seconds = max(0.0, (ended - inst["started_time"]).total_seconds())
        self.usage.add(job.owner, family_weight(family) * seconds, ended.timestamp())

    def _complete(self, job: JobRecord, insts: list[dict[str, Any]],
                  last: tuple[int, dict[str, Any], InstanceExit] | None) -> None:
        """Every instance of ``job`` has ended: decide its status from their exits and finish it.
        ``last`` (instance id, row values, exit): the instance that just ended, recorded EXITED
        in the transaction that moves the job, so an active job whose instances all ended is
        never seen. Without it (an older server, or a job whose start failed) the exits come from
        the rows' exit records, else from the provider, whose files stay until the job is terminal."""
        provider = self.provider(job.compute_pool)
        exit_ = self._outcome(job, self._exits(job, insts, last))
        # Processes and namespaces go first, so that a job seen ended runs nothing any more;
        # its local files after, off the path to the user's result.
        provider.finish_job(job.id)
        trace.mark(job.id, "server.job.finished")
        new, msg = self._status_for(job, exit_, None)
        if self._retry(job, insts, exit_, new, msg):
            return
        active = [JOB_STATUS(job.status)] if job.status in (
            JOB_STATUS.RUNNING.value, JOB_STATUS.CANCELLING.value) else []
        if last is not None:
            self.store.record_exit(job.id, last[0], last[1], new, expected=active, message=msg)
        elif active:
            try:
                self.store.transition(job.id, new, expected=active, message=msg)
            except InvalidTransitionError:
                pass  # already finished by another path
        trace.mark(job.id, "server.job.recorded")
        self.notifier.notify(job.id)
        handles = [InstanceHandle.from_dict(i["handle"]) for i in insts if i["handle"]]
        for h in handles or [InstanceHandle(job.id, 0)]:
            provider.cleanup(h)
        trace.mark(job.id, "server.job.cleaned")

    def _retry(self, job: JobRecord, insts: list[dict[str, Any]], exit_: InstanceExit, new: JOB_STATUS,
               msg: str) -> bool:
        """Requeue a job that ended ``new`` as its next attempt, if that is what it asked for: its
        instance was lost (node lost, supervisor killed, our own error) or killed from outside, or it
        failed and said ``retry_on_failure``; a cancel never is. True if it was requeued."""
        preempted = job.status == JOB_STATUS.CANCELLING.value and bool(job.preempted_by)
        if not (job.status == JOB_STATUS.RUNNING.value or preempted) or job.attempt > job.max_retries:
            return False
        killed = (new == JOB_STATUS.FAILED and exit_.error is None and exit_.oom is None and not exit_.cancelled
                  and exit_.exit_code in (-9, -15))
        own = new == JOB_STATUS.FAILED and bool((job.spec or {}).get("retry_on_failure"))
        if not (new == JOB_STATUS.INTERNAL_ERROR or killed or own or preempted):
            return False
        provider = self.provider(job.compute_pool)
        handles = [InstanceHandle.from_dict(i["handle"]) for i in insts if i["handle"]]
        for h in handles:
            self._keep_checkpoint(job, h)  # a lost instance's too: what it wrote before it was lost
            provider.cleanup(h, now=True)  # the next attempt's instances reuse the folders
        why = msg.splitlines()[0] if msg else new.value
        note = (f"attempt {job.attempt} of {job.max_retries + 1} ended {new.value} ({why}); queued again as "
                f"attempt {job.attempt + 1}")
        try:  # what this attempt left is not the job's result
            stage = self.stage(job.stage_name, create=False)
            stage.remove(StagePaths(job.id).result)
            stage.remove(f"{job.id}/results/")
        except NotFoundError:
            pass
        if not self.store.requeue_job(job.id, job.attempt, note):
            return False
        log.warning("job %s: %s", job.id, note)
        for i in insts:
            self._log_line(job.id, i["instance_id"], note)
        self.notifier.notify(job.id)
        return True

    def _keep_checkpoint(self, job: JobRecord, handle: InstanceHandle) -> None:
        """Save an ended instance's checkpoint folder on the job's stage for its next attempt."""
        local = self.provider(job.compute_pool).checkpoint_dir(handle)
        if local is None or not os.path.isdir(local):
            return
        try:
            # links: the instance has ended, nothing writes its folder any more
            self.stage(job.stage_name).upload_dir(local, StagePaths(job.id).checkpoint(handle.instance_id), link=True)
        except (OSError, NotFoundError) as e:
            log.warning("job %s: could not keep instance %d's checkpoint folder: %s", job.id, handle.instance_id, e)

    def _log_line(self, job_id: str, instance_id: int, text: str) -> None:
        """A system line in an instance's log."""
        log_file = self.home.log_file(job_id, instance_id)
        if log_file.parent.is_dir():
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(logformat.format_record(logformat.SYS, f"mljobs: {text}"))

    def _exits(self, job: JobRecord, insts: list[dict[str, Any]],
               last: tuple[int, dict[str, Any], InstanceExit] | None) -> dict[int, tuple[InstanceExit, bool]]:
        """Every instance's exit and whether its result is kept: the one that just ended, the
        stored exit records, and for rows without one what the provider still has."""
        provider = self.provider(job.compute_pool)
        out: dict[int, tuple[InstanceExit, bool]] = {}
        for inst in insts:
            i, record = inst["instance_id"], inst["exit_record"]
            if last is not None and i == last[0]:
                out[i] = (last[2], last[2].result is not None)
            elif record:
                out[i] = (InstanceExit.from_record(record), bool(record.get("has_result")))
            else:
                h = InstanceHandle.from_dict(inst["handle"]) if inst["handle"] else None
                e = provider.poll(h or InstanceHandle(job.id, i)) or InstanceExit(None, lost=True)
                self._keep_result(job, i, e)
                out[i] = (e, e.result is not None)
        return out

    def _result_path(self, job: JobRecord, instance_id: int) -> str | None:
        """Where an instance's result envelope is kept: each instance's own for a parallel
        multi-node job, the job's for instance 0 of any other (a Ray worker's is not kept)."""
        paths = StagePaths(job.id)
        if job.target_instances > 1 and job.parallel:
            return paths.instance_result(instance_id)
        return paths.result if instance_id == 0 else None

    def _keep_result(self, job: JobRecord, instance_id: int, exit_: InstanceExit) -> None:
        path = self._result_path(job, instance_id)
        if exit_.result is not None and path is not None:
            self.stage(job.stage_name).put_bytes(path, exit_.result)

    # -- multi-node ---------------------------------------------------------------------------
    def _multinode_exit(self, job: JobRecord, instance_id: int, exit_: InstanceExit,
                        live: list[dict[str, Any]]) -> None:
        """One instance of a running multi-node job ended while others still run."""
        provider = self.provider(job.compute_pool)
        parallel = bool(job.parallel)
        failed = exit_.lost or exit_.error is not None or exit_.exit_code not in (0, None)
        if not parallel and instance_id == 0:  # the head is done (its result is written): workers leave
            for inst in live:
                if inst["handle"]:
                    provider.release(InstanceHandle.from_dict(inst["handle"]), self.settings.grace_period_s)
            return
        if not failed or exit_.released:
            return
        how = "was lost (its supervisor ended without an exit record)" if exit_.lost else (
            f"exited with code {exit_.exit_code}" + _signal_hint(exit_.exit_code))
        if parallel:  # fail fast: the others would wait for it forever
            note = f"instance {instance_id} {how}; stopping the other {len(live)} instance(s)"
            for inst in live:
                if inst["handle"]:
                    provider.cancel(InstanceHandle.from_dict(inst["handle"]), self.settings.grace_period_s)
        else:
            note = (f"instance {instance_id} (a worker node) {how} at {utcnow():%H:%M:%S} UTC; the job goes on "
                    f"with {len(live)} of {job.instances_ran} node(s)")
        self._append_note(job, note)

    def _append_note(self, job: JobRecord, note: str) -> None:
        """Add ``note`` to the running job's message and to the head's log."""
        current = self.store.get_job(job.id).message
        self.store.set_message(job.id, f"{current}; {note}" if current else note)
        self._log_line(job.id, 0, note)
        self.notifier.notify(job.id)

    def _outcome(self, job: JobRecord, exits: dict[int, tuple[InstanceExit, bool]]) -> InstanceExit:
        """The exit that decides a finished job: the head's (instance 0); for a parallel multi-node
        job the first failed instance's (else instance 0's), whose result becomes the job's."""
        lost = InstanceExit(None, lost=True)
        if not (job.target_instances > 1 and job.parallel):
            return exits[0][0] if 0 in exits else lost
        failed = [i for i, (e, _) in sorted(exits.items()) if not e.cancelled and (
            e.lost or e.error is not None or e.exit_code != 0)]
        first = failed[0] if failed else 0
        if first not in exits:
            return lost
        if exits[first][1]:
            stage, paths = self.stage(job.stage_name), StagePaths(job.id)
            stage.put_bytes(paths.result, stage.get_bytes(paths.instance_result(first)))
        return exits[first][0]

    def _finish(self, job: JobRecord, exit_: InstanceExit | None, platform_error: str | None,
                its_own: bool = False) -> None:
        """Move ``job`` to the status ``exit_`` or ``platform_error`` gives it (``its_own``: the error
        is the job's or its pool's, e.g. a sandbox it cannot have: FAILED, not INTERNAL_ERROR)."""
        new, msg = self._status_for(job, exit_, platform_error)
        if its_own and platform_error is not None and new == JOB_STATUS.INTERNAL_ERROR:
            new = JOB_STATUS.FAILED
        try:
            self.store.transition(job.id, new, expected=[JOB_STATUS(job.status)] if job.status in (
                JOB_STATUS.RUNNING.value, JOB_STATUS.CANCELLING.value) else None, message=msg)
        except InvalidTransitionError:
            pass  # already finished by another path
        self.notifier.notify(job.id)

    def _status_for(self, job: JobRecord, exit_: InstanceExit | None,
                    platform_error: str | None) -> tuple[JOB_STATUS, str]:
        job_id = job.id
        logs_hint = f"`mljobs logs {job_id}` or job.get_logs() shows the full log"
        if job.status == JOB_STATUS.CANCELLING.value and job.preempted_by:
            new, msg = JOB_STATUS.CANCELLED, (f"{job.message}; it had no retries left (max_retries="
                                              f"{job.max_retries}): resubmit it, or give it max_retries")
        elif job.status == JOB_STATUS.CANCELLING.value:
            new, msg = JOB_STATUS.CANCELLED, "cancelled by request"
        elif platform_error is not None:
            new, msg = JOB_STATUS.INTERNAL_ERROR, platform_error
        elif exit_ is not None and exit_.oom is not None:
            new = JOB_STATUS.FAILED
            msg = f"{self._memory_message(job, exit_.oom)} ({logs_hint})"
        elif exit_ is None or exit_.lost:
            tail = "\n".join(exit_.log_tail if exit_ else [])
            new = JOB_STATUS.INTERNAL_ERROR
            msg = f"the supervisor of job {job_id} ended without recording an exit (node lost); {logs_hint}"
            if tail:
                msg += f"\nlast log lines:\n{tail}"
        elif exit_.exit_code == 0 and exit_.error is None:
            new, msg = JOB_STATUS.DONE, job.message if job.target_instances > 1 else ""
        elif exit_.error is not None:
            new = JOB_STATUS.FAILED
            exc_type = exit_.error["exc_type"].removeprefix("builtins.")
            msg = f"{exc_type}: {exit_.error['exc_message']} ({logs_hint})"
            if exc_type == "MemoryError":
                msg = f"MemoryError: {self._memory_message(job, None)} ({logs_hint})"
        else:
            code = exit_.exit_code
            why = _signal_hint(code)
            tail = "\n".join(exit_.log_tail)
            new = JOB_STATUS.FAILED
            msg = f"instance exited with code {code}{why}; {logs_hint}" + (f"\nlast log lines:\n{tail}" if tail else "")
        notes = job.message if job.target_instances > 1 and job.status == JOB_STATUS.RUNNING.value else ""
        if notes and new != JOB_STATUS.DONE:
            msg = f"{msg}\n{notes}"
        return new, msg

    def _memory_message(self, job: JobRecord, oom: dict[str, int] | None) -> str:
        try:
            fam = INSTANCE_FAMILIES.get(self.store.get_pool(job.compute_pool)["instance_family"])
        except NotFoundError:
            fam = None
        oom = oom or {}
        return metrics.oom_message(fam, job.compute_pool, oom.get("used_bytes"), oom.get("limit_bytes"))

    # -- jobs: queries and control ------------------------------------------------------------
    def resolve(self, ref: str, who: Principal) -> JobRecord:
        """A job of ``who``'s (any job for an admin) by id or by name (the newest of that name).

        Someone else's job is reported as missing, so ids do not leak who runs what.
        """
        if is_job_id(ref):
            try:
                job = self.store.get_job(ref.upper())
            except NotFoundError:
                job = None
            if job is not None and who.may_use(job.owner):
                return job
            raise NotFoundError(f"job {ref.upper()} does not exist (or is not yours); `mljobs jobs list` shows "
                                "your jobs")
        named = self.store.jobs_named(ref, owner=who.owner_filter)
        if not named:
            raise NotFoundError(f"no job of yours has the id or name {ref!r}; ids look like MLJOB_<uuid>; "
                                "`mljobs jobs list` shows your jobs")
        return named[0]

    def job_view(self, job: JobRecord) -> dict[str, Any]:
        view = job.to_dict()
        view.pop("spec", None)
        view["payload_kind"] = (job.spec or {}).get("payload_kind")
        if job.status == JOB_STATUS.PENDING.value:
            view["message"] = view["pending_reason"] = self._why_pending(job.compute_pool, job.owner,
                                                                         self.store.jobs_ahead(job), job.message)
        view["instances"] = [
            {**{k: i[k] for k in ("instance_id", "status", "exit_code", "started_time", "ended_time", "cpu_seconds",
                                  "peak_rss_bytes")}, "isolation": _isolation_of(i)}
            for i in self.store.instances_of(job.id)
        ]
        view["parallel"] = job.parallel
        view["max_retries"] = job.max_retries
        view.update(metrics.summarize(view["instances"]))
        return view

    def job_metrics(self, ref: str, who: Principal) -> list[dict[str, Any]]:
        """Every instance's resource samples: stored for ended instances, live from the provider."""
        job = self.resolve(ref, who)
        out: list[dict[str, Any]] = []
        for inst in self.store.instances_of(job.id):
            if inst["status"] == INSTANCE_STATUS.EXITED.value or not inst["handle"]:
                rows = metrics.decode(inst["metrics"])
            else:
                rows = self.provider(job.compute_pool).metrics(InstanceHandle.from_dict(inst["handle"]))
            out += metrics.frame_rows(inst["instance_id"], rows)
        return out

    def ray_info(self, ref: str, who: Principal) -> dict[str, Any]:
        """A running multi-node job's Ray addresses (GCS, dashboard) as its head wrote them."""
        job = self.resolve(ref, who)
        head = next((i for i in self.store.instances_of(job.id) if i["instance_id"] == 0), None)
        if job.target_instances < 2 or job.parallel:
            raise InvalidArgumentError(f"job {job.id} runs no Ray cluster (only multi-node jobs without "
                                       "parallel=True do)")
        info: Any = None
        if head and head["handle"] and head["status"] in LIVE_INSTANCE:
            info = self.provider(job.compute_pool).ray_info(InstanceHandle.from_dict(head["handle"]))
        return {"job_id": job.id, "status": job.status, **safe_ray_info(info)}

    def get_job(self, ref: str, who: Principal) -> dict[str, Any]:
        return self.job_view(self.resolve(ref, who))

    def job_events(self, ref: str, who: Principal) -> list[dict[str, Any]]:
        """The statuses the job took, oldest first (none for jobs made before the store kept them)."""
        return self.store.job_events(self.resolve(ref, who).id)

    def list_jobs(self, limit: int, database: str | None, schema: str | None, who: Principal, *,
                  statuses: list[str] | None = None, pool: str | None = None,
                  owner: str | None = None, schedule: str | None = None) -> list[dict[str, Any]]:
        """Newest first: ``who``'s jobs, or everyone's for an admin, with their resource use;
        only those in ``statuses``, on ``pool`` or of ``owner`` when given."""
        if owner is not None and who.owner_filter is not None and owner != who.owner_filter:
            return []  # a user sees only their own jobs, whoever they ask for
        rows = self.store.list_jobs(limit, database, schema, statuses=statuses, owner=who.owner_filter or owner,
                                    with_spec=False, pool=pool,
                                    schedule=check_identifier("schedule", schedule) if schedule else None)
        usage = metrics.usage_by_job(self.store, [r.id for r in rows])
        reasons: dict[tuple[str, str], str] = {}
        out = []
        for r in rows:
            row = {**r.to_dict(), **usage.get(r.id, {"peak_rss_bytes": None, "cpu_seconds": None})}
            if r.status == JOB_STATUS.PENDING.value:
                key = (r.compute_pool, r.owner)
                if key not in reasons:
                    reasons[key] = self._why_pending(r.compute_pool, r.owner, None, "")
                row["pending_reason"] = reasons[key] if not r.message else f"{reasons[key]}; {r.message}"
            out.append(row)
        return out

    def _why_pending(self, pool_name: str, owner: str, ahead: int | None, note: str) -> str:
        """Why a queued job of ``owner`` has not started, in words a user can act on (``note``: what
        the job's record says, e.g. that it is a retry)."""
        try:
            pool = self.store.get_pool(pool_name)
        except NotFoundError:
            return f"pool {pool_name} no longer exists"
        live = self.store.pool_instances(pool_name)
        limit = self.quotas.limits(owner, pool_name)["max_instances"]
        mine = sum(1 for _, o, _ in live if o == owner)
        if limit is not None and mine >= limit and not pool["suspended"]:
            why = (f"user {owner} has {mine} of their max_instances={limit} instance(s) running on pool {pool_name}; "
                   "it starts when one of them ends")
        else:
            why = pending_reason(pool, len(live), ahead or 0)
            if ahead is None and not pool["suspended"] and is_fair(pool, self._has_users()):
                why += " (fair share: the user with the least recent usage starts next)"
        return f"{why}; {note}" if note else why

    def cancel(self, ref: str, who: Principal) -> dict[str, Any]:
        job = self.resolve(ref, who)
        with self._lock:
            job = self.store.get_job(job.id)
            if job.status == JOB_STATUS.PENDING.value:
                try:
                    self.store.transition(job.id, JOB_STATUS.CANCELLED, expected=[JOB_STATUS.PENDING],
                                          message="cancelled before it started")
                except InvalidTransitionError:
                    return self.cancel(ref, who)  # it started meanwhile
            elif job.status == JOB_STATUS.CANCELLING.value and job.preempted_by:
                # being preempted, and now cancelled: it ends CANCELLED instead of going back to the queue
                self.store.unpreempt(job.id, "cancelled by request while it was being preempted")
            elif job.status == JOB_STATUS.RUNNING.value:
                try:
                    self.store.transition(job.id, JOB_STATUS.CANCELLING, expected=[JOB_STATUS.RUNNING],
                                          message="cancelling: stopping every process of the job")
                except InvalidTransitionError:
                    return self.job_view(self.store.get_job(job.id))
                provider = self.provider(job.compute_pool)
                for inst in self.store.instances_of(job.id):
                    if inst["status"] in LIVE_INSTANCE and inst["handle"]:
                        provider.cancel(InstanceHandle.from_dict(inst["handle"]), self.settings.grace_period_s)
        self.notifier.notify(job.id)
        return self.job_view(self.store.get_job(job.id))

    def result(self, ref: str, who: Principal,
               instance_id: int | None = None) -> Generator[bytes, None, None] | None:
        """The job's result envelope, or one instance's (parallel multi-node jobs), in chunks."""
        job = self.resolve(ref, who)
        if job.status not in TERMINAL_VALUES:
            raise InvalidTransitionError(job.id, job.status, "a result (the job has not finished)")
        try:
            stage = self.stage(job.stage_name, create=False)  # reading must not make a dropped stage anew
        except NotFoundError:
            return None  # its stage was dropped, and the result with it
        paths = StagePaths(job.id)
        path = paths.result if instance_id is None else paths.instance_result(instance_id)
        return stage.iter_chunks(path) if stage.exists(path) else None

    def small_result(self, job_id: str, stage_name: str, max_bytes: int = 1 << 20) -> bytes | None:
        """An ended job's result envelope when it has one of at most ``max_bytes`` (a wait brings
        it along), else None. The caller has resolved the job for its user."""
        try:
            stage = self.stage(stage_name, create=False)
        except NotFoundError:
            return None
        path = StagePaths(job_id).result
        try:
            if stage.size(path) > max_bytes:
                return None
            return stage.get_bytes(path)
        except (FileNotFoundError, NotFoundError):
            return None

    def delete(self, ref: str, who: Principal, wait_s: float = 30.0) -> None:
        """Stop the job if it runs, then remove it, its logs and its stage files."""
        job = self.resolve(ref, who)
        if job.status in ACTIVE_VALUES:
            self.cancel(job.id, who)
            deadline = utcnow().timestamp() + wait_s
            while self.store.get_job(job.id).status not in TERMINAL_VALUES:
                if utcnow().timestamp() > deadline:
                    raise InvalidTransitionError(job.id, "CANCELLING", "DELETED (still stopping; try again)")
                self._stop.wait(0.05)
        self._remove(job)

    def _remove(self, job: JobRecord) -> None:
        """Remove a finished job: its stage files, logs and local folders, then its record."""
        try:
            self.stage(job.stage_name, create=False).remove(StagePaths(job.id).prefix)
        except NotFoundError:  # its stage is gone already
            pass
        shutil.rmtree(self.home.job_logs(job.id), ignore_errors=True)
        shutil.rmtree(self.home.job_run(job.id), ignore_errors=True)
        shutil.rmtree(self.home.job_work(job.id), ignore_errors=True)
        self.store.delete_job(job.id)
        self.notifier.notify(job.id)

    def prune_jobs(self, older_than_s: float, statuses: list[str] | None, who: Principal | None,
                   limit: int = 1000) -> list[str]:
        """Remove up to ``limit`` finished jobs that ended more than ``older_than_s`` ago (only
        ``who``'s unless an admin or the server itself); returns their ids."""
        if not older_than_s >= 0:
            raise InvalidArgumentError(f"older_than must be a duration >= 0, got {older_than_s!r}")
        bad = [s for s in statuses or [] if s not in {t.value for t in TERMINAL} - {JOB_STATUS.DELETED.value}]
        if bad:
            raise InvalidArgumentError(f"status {bad} is not a finished status; use DONE, FAILED, CANCELLED or "
                                       "INTERNAL_ERROR")
        before = utcnow() - dt.timedelta(seconds=min(older_than_s, 36500 * 86400.0))
        owner = who.owner_filter if who is not None else None
        gone = []
        for job in self.store.finished_before(before, limit, owner, statuses):
            self._remove(job)
            gone.append(job.id)
        if gone:
            log.info("pruned %d finished job(s)", len(gone))
        return gone

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


def _isolation_of(inst: dict[str, Any]) -> str | None:
    """The sandbox an instance ran in: its supervisor's exit record says (a node agent's too), else
    what its provider said at the start; None before it started."""
    said = (inst.get("exit_record") or {}).get("isolation")
    if said:
        return str(said)
    if not inst["handle"]:
        return None
    return (inst["handle"].get("extra") or {}).get("isolation") or ("none" if inst["status"] == "EXITED" else None)


def _signal_hint(code: int | None) -> str:
    return f" (killed by signal {-code}: {_SIGNALS.get(-code, '')})" if code is not None and code < 0 else ""


def _index_hosts(spec: JobSpec) -> list[str]:
    """The hosts an install for ``spec`` would reach: its indexes and any direct-URL requirements."""
    env = spec.env_vars
    urls = [env.get("UV_DEFAULT_INDEX") or env.get("UV_INDEX_URL") or env.get("PIP_INDEX_URL") or DEFAULT_INDEX]
    for var in ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_INDEX", "PIP_FIND_LINKS", "UV_FIND_LINKS"):
        urls += env.get(var, "").split()
    for req in spec.pip_requirements:
        r = req.strip()
        if r.startswith(("--index-url", "-i ", "--extra-index-url", "--find-links", "-f ")):
            urls.append(r.split(None, 1)[-1].lstrip("=").strip())
        elif "@" in r and "://" in r:
            urls.append(r.split("@", 1)[1].strip())
    hosts = []
    for u in urls:
        host = urlsplit(u if "://" in u else f"https://{u}").hostname
        if host and host not in hosts:
            hosts.append(host)
        if host == "pypi.org" and "files.pythonhosted.org" not in hosts:
            hosts.append("files.pythonhosted.org")  # where pypi.org's files live
    return hosts
