"""Job statuses, their groups, and the one table of allowed transitions."""

from __future__ import annotations

import enum

__all__ = ["JOB_STATUS", "TERMINAL", "ACTIVE", "CANCELABLE", "TERMINAL_VALUES", "ACTIVE_VALUES", "CANCELABLE_VALUES",
           "TRANSITIONS", "can_transition", "INSTANCE_STATUS", "LIVE_INSTANCE"]


class JOB_STATUS(str, enum.Enum):  # noqa: N801 - mirrors the reference API's name
    """The life of a job: PENDING -> RUNNING -> DONE | FAILED, with cancel and platform failure."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    DELETED = "DELETED"

    def __str__(self) -> str:
        return self.value


S = JOB_STATUS
TERMINAL: frozenset[JOB_STATUS] = frozenset({S.DONE, S.FAILED, S.CANCELLED, S.INTERNAL_ERROR, S.DELETED})
ACTIVE: frozenset[JOB_STATUS] = frozenset({S.PENDING, S.RUNNING, S.CANCELLING})
CANCELABLE: frozenset[JOB_STATUS] = frozenset({S.PENDING, S.RUNNING})
# the same groups as the strings the store and the API hold
TERMINAL_VALUES: frozenset[str] = frozenset(s.value for s in TERMINAL)
ACTIVE_VALUES: frozenset[str] = frozenset(s.value for s in ACTIVE)
CANCELABLE_VALUES: frozenset[str] = frozenset(s.value for s in CANCELABLE)

# from -> the states it may move to. Terminal states move nowhere (DELETED is a tombstone that
# only the delete path writes, and it is terminal too). RUNNING -> PENDING is a retry: the job's
# instances were lost and it is queued again as its next attempt (Store.requeue_job); so is
# CANCELLING -> PENDING for a job another one preempted (only then: a cancel is never retried).
TRANSITIONS: dict[JOB_STATUS, frozenset[JOB_STATUS]] = {
    S.PENDING: frozenset({S.RUNNING, S.CANCELLING, S.CANCELLED, S.INTERNAL_ERROR, S.FAILED}),
    S.RUNNING: frozenset({S.DONE, S.FAILED, S.CANCELLING, S.INTERNAL_ERROR, S.PENDING}),
    S.CANCELLING: frozenset({S.CANCELLED, S.INTERNAL_ERROR, S.PENDING}),
    S.DONE: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.INTERNAL_ERROR: frozenset(),
    S.DELETED: frozenset(),
}


def can_transition(old: JOB_STATUS, new: JOB_STATUS) -> bool:
    """Whether a job in ``old`` may move to ``new``."""
    return new in TRANSITIONS[old]


class INSTANCE_STATUS(str, enum.Enum):  # noqa: N801 - named like JOB_STATUS
    """One instance's share of a job: STARTING (asked of the provider) -> RUNNING (its handle known)
    -> EXITED (its exit recorded, once)."""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    EXITED = "EXITED"

    def __str__(self) -> str:
        return self.value


# the statuses of an instance before its exit is recorded, as the store holds them
LIVE_INSTANCE: frozenset[str] = frozenset({INSTANCE_STATUS.STARTING.value, INSTANCE_STATUS.RUNNING.value})
