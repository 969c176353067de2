"""The end of an instance and of its job: exits recorded, results and checkpoints kept, the
job's final status and message (multi-node rules included), retries as the next attempt."""

from __future__ import annotations

import datetime as dt
import logging
import os
from typing import Any

from mljobs import logformat, trace
from mljobs.errors import InvalidTransitionError, NotFoundError
from mljobs.paths import StagePaths
from mljobs.providers.base import InstanceExit, InstanceHandle
from mljobs.runtime import checkpoint
from mljobs.server import metrics
from mljobs.server.records import JobRecord
from mljobs.server.store import utcnow
from mljobs.server.usage import family_weight
from mljobs.spec import INSTANCE_FAMILIES
from mljobs.status import JOB_STATUS, LIVE_INSTANCE

__all__ = ["Completion"]

log = logging.getLogger("mljobs.server")
_SIGNALS = {9: "SIGKILL: out of memory, or killed", 15: "SIGTERM", 11: "SIGSEGV: crashed", 6: "SIGABRT"}


class Completion:
    """Part of :class:`mljobs.server.service.ControlPlane` (a mixin: its state is the plane's)."""

    def instance_exited(self, handle: InstanceHandle) -> None:
        """Record an instance's end (once: the exit watcher and the monitor may both report it);
        when it was the job's last, finish the job in the same store transaction. Whether to is
        decided under the plane's lock; the stage I/O (the result, a checkpoint) happens outside
        it, with the instance claimed meanwhile, so a slow stage holds up no other decision."""
        trace.mark(handle.job_id, "server.exit.seen")
        key = (handle.job_id, handle.instance_id)
        with self._lock:
            if key in self._ending:
                return  # being recorded by the other report
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
            self._ending.add(key)
        try:
            trace.mark(job.id, "server.exit.polled")
            self._keep_result(job, handle.instance_id, exit_)  # on the stage before the row says EXITED
            kept_key = (job.id, job.attempt, handle.instance_id)
            if job.attempt <= job.max_retries:  # another attempt may resume from it
                lost = exit_.lost or exit_.exit_code in (-9, -15)
                if self._keep_checkpoint(job, handle, lost):
                    self._kept_checkpoints[kept_key] = lost
            samples = provider.metrics(handle)
            trace.mark(job.id, "server.result.kept")
            with self._lock:
                try:  # as it is now: a cancel, another instance's end may have come meanwhile
                    job = self.store.get_job(handle.job_id)
                except NotFoundError:
                    self._kept_checkpoints.pop(kept_key, None)
                    return
                insts = self.store.instances_of(job.id)
                if not any(i["instance_id"] == handle.instance_id and i["status"] in LIVE_INSTANCE for i in insts):
                    self._kept_checkpoints.pop(kept_key, None)
                    return
                now = utcnow()
                values = {"exit_code": exit_.exit_code, "ended_time": now, "exit_record": exit_.to_record(),
                          **metrics.instance_values(samples, exit_.usage, now.timestamp())}
                self._account(job, next(i for i in insts if i["instance_id"] == handle.instance_id), now)
                live = [i for i in insts if i["status"] in LIVE_INSTANCE and i["instance_id"] != handle.instance_id]
                if live:
                    if self.store.record_exit(job.id, handle.instance_id, values) and (
                            job.target_instances > 1 and job.status == JOB_STATUS.RUNNING.value):
                        self._multinode_exit(job, handle.instance_id, exit_, live)
                    return
                self._complete(job, insts, (handle.instance_id, values, exit_))
        finally:
            with self._lock:
                self._ending.discard(key)
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
        kept = {i["instance_id"]: self._kept_checkpoints.pop((job.id, job.attempt, i["instance_id"]), None)
                for i in insts}
        if self._retry(job, insts, exit_, new, msg, kept):
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
               msg: str, kept: dict[int, bool | None] | None = None) -> bool:
        """Requeue a job that ended ``new`` as its next attempt, if that is what it asked for: its
        instance was lost (node lost, supervisor killed, our own error) or killed from outside, or it
        failed and said ``retry_on_failure``; a cancel never is. True if it was requeued. ``kept``:
        the instances whose end kept their checkpoint already (outside the lock), and how."""
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
        lost = new == JOB_STATUS.INTERNAL_ERROR or killed or preempted
        for h in handles:  # a lost or stopped one's too: its last settled copy, not what it was writing
            if (kept or {}).get(h.instance_id) != lost:  # not kept so by its end (found ended by the monitor)
                self._keep_checkpoint(job, h, lost=lost)
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

    def _keep_checkpoint(self, job: JobRecord, handle: InstanceHandle, lost: bool = False) -> bool:
        """Save an ended instance's checkpoint folder on the job's stage for its next attempt
        (``lost``: it did not end by itself; see ``Provider.checkpoint_dir``). False: it could not."""
        local = self.provider(job.compute_pool).checkpoint_dir(handle, lost)
        if local is None or not os.path.isdir(local):
            return True  # nothing to keep
        try:
            # links: the instance has ended, nothing writes its folder any more
            checkpoint.StageFolder(self.stage(job.stage_name), StagePaths(job.id).checkpoint(handle.instance_id),
                                   job.attempt).keep(local, link=True)
            return True
        except (OSError, NotFoundError) as e:
            log.warning("job %s: could not keep instance %d's checkpoint folder: %s", job.id, handle.instance_id, e)
            return False

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


def _signal_hint(code: int | None) -> str:
    return f" (killed by signal {-code}: {_SIGNALS.get(-code, '')})" if code is not None and code < 0 else ""
