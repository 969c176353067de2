"""Timeline marks along one job's path, for ``bench/latency.py --timeline``; off unless asked.

Every process on the path (client, server, spawner, supervisor, payload) calls :func:`mark` at
the points of interest. With ``MLJOBS_TRACE`` set to a file, each mark appends one line
``<unix time> <pid> <job id> <point>`` to it (one ``write`` on an ``O_APPEND`` descriptor, so
lines from several processes never mix); without it :func:`mark` returns at once (one global
read), so the marks cost nothing measurable on the job path. The variable reaches the server, its
spawner and supervisors by inheritance; the benchmark sets it for both sides. A leaf module.
"""

from __future__ import annotations

import os
import time

__all__ = ["mark", "enabled", "read"]

_PATH = os.environ.get("MLJOBS_TRACE") or None


def enabled() -> bool:
    return _PATH is not None


def mark(job_id: str, point: str, at: float | None = None) -> None:
    """Note that ``job_id`` reached ``point`` now, or at ``at`` (nothing unless MLJOBS_TRACE is set).

    The file is opened for each mark: a payload closes every descriptor it did not open, and a
    cached one could by then name one of the payload's own files."""
    if _PATH is None:
        return
    line = f"{time.time() if at is None else at:.6f} {os.getpid()} {job_id} {point}\n".encode()
    try:
        fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:  # e.g. a sandboxed job's own uid may not write it: a mark never fails the job
        return
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """A trace file as ``{job id: {point: first time}}``."""
    out: dict[str, dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4:
                out.setdefault(parts[2], {}).setdefault(parts[3], float(parts[0]))
    return out
