"""Reading jobs (views, metrics, events, lists, results) and a user's control of them (cancel,
delete, prune), with the ownership checks every one of them makes."""

from __future__ import annotations

import datetime as dt
import logging
import re
import shutil
from collections.abc import Generator
from typing import Any

from mljobs.errors import InvalidArgumentError, InvalidTransitionError, NotFoundError
from mljobs.paths import StagePaths
from mljobs.providers.base import InstanceHandle
from mljobs.server import metrics
from mljobs.server.auth import Principal
from mljobs.server.records import JobRecord
from mljobs.server.scheduler import pending_reason
from mljobs.server.store import utcnow
from mljobs.server.usage import is_fair
from mljobs.spec import check_identifier, is_job_id
from mljobs.status import ACTIVE_VALUES, INSTANCE_STATUS, JOB_STATUS, LIVE_INSTANCE, TERMINAL, TERMINAL_VALUES

__all__ = ["Queries", "safe_ray_info"]

log = logging.getLogger("mljobs.server")


_HTTP_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/\-]*)?")
_HOST_PORT = re.compile(r"[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}")


def safe_ray_info(info: Any) -> dict[str, str | None]:
    """The Ray addresses a job's own head wrote, passed on only as an http(s) URL and a host:port:
    never something a browser would run (a ``javascript:`` link on the dashboard) or a client
    would trip on."""
    info = info if isinstance(info, dict) else {}
    url, gcs = info.get("dashboard_url"), info.get("gcs_address")
    return {"gcs_address": gcs if isinstance(gcs, str) and _HOST_PORT.fullmatch(gcs) else None,
            "dashboard_url": url if isinstance(url, str) and _HTTP_URL.fullmatch(url) else None}


class Queries:
    """Part of :class:`mljobs.server.service.ControlPlane` (a mixin: its state is the plane's)."""

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

    def job_view(self, job: JobRecord, instances: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """What the API shows of ``job``, with its instances (read here unless given: a job just
        recorded has none)."""
        view = job.to_dict()
        view.pop("spec", None)
        view["payload_kind"] = (job.spec or {}).get("payload_kind")
        if job.status == JOB_STATUS.PENDING.value:
            view["message"] = view["pending_reason"] = self._why_pending(job.compute_pool, job.owner,
                                                                         self.store.jobs_ahead(job), job.message)
        view["instances"] = [
            {**{k: i[k] for k in ("instance_id", "status", "exit_code", "started_time", "ended_time", "cpu_seconds",
                                  "peak_rss_bytes")}, "isolation": _isolation_of(i)}
            for i in (self.store.instances_of(job.id) if instances is None else instances)
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
        to_stop: list[InstanceHandle] = []
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
                to_stop = [InstanceHandle.from_dict(inst["handle"]) for inst in self.store.instances_of(job.id)
                           if inst["status"] in LIVE_INSTANCE and inst["handle"]]
        # decided under the lock (CANCELLING); the stopping itself (signals, scancel, Ray's API) outside it
        provider = self.provider(job.compute_pool)
        for handle in to_stop:
            if provider.cancel(handle, self.settings.grace_period_s):
                self.instance_exited(handle)  # it had not started: it ended now, no exit report will come
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


def _isolation_of(inst: dict[str, Any]) -> str | None:
    """The sandbox an instance ran in: its supervisor's exit record says (a node agent's too), else
    what its provider said at the start; None before it started."""
    said = (inst.get("exit_record") or {}).get("isolation")
    if said:
        return str(said)
    if not inst["handle"]:
        return None
    return (inst["handle"].get("extra") or {}).get("isolation") or ("none" if inst["status"] == "EXITED" else None)
