"""Each user's recent usage of the pools, for fair share (:func:`mljobs.server.scheduler.plan`).

Usage is instance-seconds weighted by the family's size (its CPUs, a GPU as 8), decayed with a
half-life (``MLJOBS_FAIR_HALF_LIFE_H``, 24 h by default): what a user ran a half-life ago counts
half. It is summed over every pool (as Slurm's fair share is over partitions), kept in memory and
rebuilt from the store's instance records when the server starts.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from mljobs.spec import INSTANCE_FAMILIES

__all__ = ["Usage", "family_weight", "is_fair", "GPU_WEIGHT"]

GPU_WEIGHT = 8  # one GPU counts as this many CPUs in a family's size


def family_weight(family: str) -> float:
    """How much one instance-second of ``family`` counts: its CPUs, GPUs weighted more."""
    fam = INSTANCE_FAMILIES.get(family)
    return float(fam.cpus + GPU_WEIGHT * fam.gpus) if fam is not None else 1.0


def is_fair(pool: dict[str, Any], has_users: bool) -> bool:
    """A pool's queue is fair-shared when it says so, or says nothing and the server has users."""
    mode = pool.get("scheduling")
    return mode == "fair" or (mode is None and has_users)


class Usage:
    """Each user's recent usage of every pool: weighted instance-seconds of ended instances,
    decayed with a half-life (what a user ran a half-life ago counts half); running instances
    add their elapsed time at decision time. Kept in memory, rebuilt from the store at start."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = max(1.0, float(half_life_s))
        self._lock = threading.Lock()
        self._values: dict[str, tuple[float, float]] = {}  # owner -> (value, as of epoch seconds)

    def _decayed(self, value: float, since: float, now: float) -> float:
        return value * math.pow(0.5, max(0.0, now - since) / self.half_life_s)

    def add(self, owner: str, amount: float, at: float) -> None:
        with self._lock:
            value, since = self._values.get(owner, (0.0, at))
            if at >= since:
                self._values[owner] = (self._decayed(value, since, at) + amount, at)
            else:  # an older record (rebuilding): decay it to the value's time
                self._values[owner] = (value + self._decayed(amount, at, since), since)

    def get(self, owner: str, now: float) -> float:
        with self._lock:
            value, since = self._values.get(owner, (0.0, now))
        return self._decayed(value, since, now)

    def snapshot(self, now: float) -> dict[str, float]:
        with self._lock:
            items = list(self._values.items())
        return {o: self._decayed(v, s, now) for o, (v, s) in items}
