"""Which pending jobs start now: first come, first served, within each pool's max_nodes."""

from __future__ import annotations

from typing import Any

from mljobs.server.records import JobRecord

__all__ = ["plan_starts", "plan_top_ups", "pending_reason"]


def plan_starts(pool: dict[str, Any], used_slots: set[int],
                pending: list[JobRecord]) -> list[tuple[JobRecord, list[int]]]:
    """Jobs to start now, each with the pool slots it gets.

    A job starts when at least its ``min_instances`` slots are free and takes up to
    ``target_instances``. The queue is strict FIFO: when the oldest job does not fit, nothing
    behind it starts (no starvation of big jobs), and a job never holds slots while it waits.
    A suspended pool starts nothing.
    """
    if pool["suspended"]:
        return []
    free = [s for s in range(pool["max_nodes"]) if s not in used_slots]
    plan = []
    for job in pending:
        if len(free) < job.min_instances:
            break
        take = min(job.target_instances, len(free))
        plan.append((job, free[:take]))
        free = free[take:]
    return plan


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
