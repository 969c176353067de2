"""Which queued jobs start now on a pool, within its max_nodes.

Every start decision orders the queue the same way on every provider (mljobs decides; an engine
never holds more than mljobs started):

1. priority, higher first;
2. on a ``fair`` pool, the user with the least recent usage (:mod:`mljobs.server.usage`), and
   within one decision the user who started fewer jobs in it, so equal users alternate; on a
   ``fifo`` pool, neither;
3. submission order (FIFO within a user).

A user at their ``max_instances`` quota is passed over (their pending reason says so). When the
job that comes first does not fit in the free slots nothing behind it starts, so a big job is
never starved by small ones; on a pool with preemption it may take lower-priority jobs' instances
(:func:`choose_victims`). A job starts when at least its ``min_instances`` slots are free and takes
up to ``target_instances``; it never holds slots while it waits.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from typing import Any

from mljobs.server.records import JobRecord, QueuedJob

__all__ = ["Plan", "plan", "choose_victims", "plan_top_ups", "pending_reason"]


@dataclasses.dataclass
class Plan:
    starts: list[tuple[QueuedJob | JobRecord, list[int]]] = dataclasses.field(default_factory=list)
    held: dict[str, str] = dataclasses.field(default_factory=dict)  # owner -> why their jobs wait
    blocked: QueuedJob | JobRecord | None = None  # the job that comes first but does not fit (none start behind it)
    free: int = 0  # slots left free after the starts


def plan(pool: dict[str, Any], used_slots: set[int], heads: dict[str, list[QueuedJob]] | dict[str, list[JobRecord]],
         *, fair: bool,
         usage: dict[str, float] | None = None, running: dict[str, int] | None = None,
         max_instances: dict[str, int | None] | None = None) -> Plan:
    """Jobs to start now on ``pool``, each with the slots it gets.

    ``heads``: each user's first queued jobs, in their own order (priority, then submission).
    ``usage``: each user's recent usage (fair pools). ``running``: each user's running instances
    on this pool, for ``max_instances`` (None or absent: no limit).
    """
    out = Plan()
    free = [s for s in range(pool["max_nodes"]) if s not in used_slots]
    if pool["suspended"]:
        out.free = len(free)
        return out
    usage, running = usage or {}, Counter(running or {})
    limits = max_instances or {}
    queues = {owner: deque(jobs) for owner, jobs in heads.items() if jobs}
    started: Counter[str] = Counter()

    def key(job: QueuedJob | JobRecord) -> tuple[Any, ...]:
        order = (job.created_time, job.id)
        if fair:
            return (-job.priority, started[job.owner], usage.get(job.owner, 0.0), *order)
        return (-job.priority, *order)

    while queues:
        candidates = []
        for owner in list(queues):
            job = queues[owner][0]
            limit = limits.get(owner)
            if limit is not None and running[owner] + job.min_instances > limit:
                out.held[owner] = (f"user {owner} has {running[owner]} of their max_instances={limit} instance(s) "
                                   f"running on pool {pool['name']}")
                del queues[owner]
                continue
            candidates.append(job)
        if not candidates:
            break
        best = min(candidates, key=key)
        room = len(free)
        if room < best.min_instances:
            out.blocked = best
            break
        take = min(best.target_instances, room)
        limit = limits.get(best.owner)
        if limit is not None:
            take = min(take, limit - running[best.owner])
        out.starts.append((best, free[:take]))
        free = free[take:]
        running[best.owner] += take
        started[best.owner] += 1
        queues[best.owner].popleft()
        if not queues[best.owner]:
            del queues[best.owner]
    out.free = len(free)
    return out


def choose_victims(waiting: QueuedJob | JobRecord, free: int, running_jobs: list[JobRecord]) -> list[JobRecord]:
    """The running jobs ``waiting`` takes the instances of to start: of lower priority only, the
    lowest first and, among equals, the most recently started; just enough to free
    ``waiting.min_instances`` with the ``free`` slots there are. None if they would not be enough."""
    need = waiting.min_instances - free
    if need <= 0:
        return []
    lower = sorted((j for j in running_jobs if j.priority < waiting.priority),
                   key=lambda j: (j.priority, -(j.started_time or j.created_time).timestamp()))
    chosen, freed = [], 0
    for job in lower:
        chosen.append(job)
        freed += job.instances_ran
        if freed >= need:
            return chosen
    return []


def plan_top_ups(pool: dict[str, Any], used_slots: set[int], pending: list[JobRecord],
                 short: list[JobRecord]) -> list[tuple[JobRecord, list[int]]]:
    """Late instances for running multi-node jobs that started with fewer than their target.

    ``short`` are such jobs, oldest first, each with ``instances_ran``. Only slots nobody queues
    for are used: a pending job always comes first, so topping up never delays the queue.
    """
    if pool["suspended"] or pending:
        return []
    free = [s for s in range(pool["max_nodes"]) if s not in used_slots]
    plan = []
    for job in short:
        take = min(job.target_instances - job.instances_ran, len(free))
        if take > 0:
            plan.append((job, free[:take]))
            free = free[take:]
    return plan


def pending_reason(pool: dict[str, Any], nodes_in_use: int, ahead: int) -> str:
    """Why a PENDING job has not started, in words a user can act on."""
    name = pool["name"]
    if pool["suspended"]:
        return (f"pool {name} is SUSPENDED: resume it with `mljobs pool resume {name}` or "
                f"alter_compute_pool({name!r}, resume=True)")
    msg = f"pool busy: {nodes_in_use}/{pool['max_nodes']} nodes in use"
    if ahead:
        msg += f", {ahead} job(s) ahead in the queue"
    return msg
