"""A job's life after admission: the scheduling decision (start, top up, preempt) and the start
of its instances, and the reports its instances send while they run."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from mljobs import trace
from mljobs.errors import NotFoundError, PermissionDeniedError, SandboxError
from mljobs.providers.base import InstanceHandle, InstanceLaunch, InstanceReport
from mljobs.server.auth import Principal
from mljobs.server.records import JobRecord, QueuedJob
from mljobs.server.scheduler import choose_victims, plan, plan_top_ups
from mljobs.server.store import utcnow
from mljobs.server.usage import is_fair
from mljobs.spec import INSTANCE_FAMILIES, PoolSpec
from mljobs.status import INSTANCE_STATUS, JOB_STATUS, LIVE_INSTANCE, TERMINAL_VALUES

__all__ = ["Lifecycle"]

log = logging.getLogger("mljobs.server")


class Lifecycle:
    """Part of :class:`mljobs.server.service.ControlPlane` (a mixin: its state is the plane's)."""

    # -- scheduling and exits -----------------------------------------------------------------
    def schedule(self, pool_name: str) -> None:
        with self._lock:
            pool = self.store.get_pool(pool_name)
            # every start takes a slot, so no user can start more than the free slots now
            live, heads = self.store.start_view(pool["name"], pool["max_nodes"], bool(pool["preemption"]))
            if heads:
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
