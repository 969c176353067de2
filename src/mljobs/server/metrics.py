"""Per-job resource metrics on the server: kept when an instance ends, served while it runs.

The supervisor samples (mljobs.runtime.metrics) into the instance's run folder. When the instance
ends, :func:`instance_values` turns those rows and the exit record's totals into three columns of
its ``instances`` row, written by the same UPDATE that records the exit (no extra transaction on
a job's path): ``cpu_seconds``, ``peak_rss_bytes`` and ``metrics``, the samples as compact columns
``{"t": [...], "cpu": [...], "rss": [...], "peak": [...][, "gpu", "gmem"]}``, at most
``MAX_STORED_ROWS`` rows (resolution halved until they fit). The messages for a job over its
memory are made here too, in one place.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from mljobs.server.store import Store
from mljobs.server.tables import instances
from mljobs.spec import InstanceFamily

__all__ = ["MAX_STORED_ROWS", "COLUMNS", "GPU_COLUMNS", "bound_rows", "encode", "decode", "instance_values",
           "frame_rows", "summarize", "usage_by_job", "oom_message", "memory_hint", "fmt_bytes"]

MAX_STORED_ROWS = 1024
COLUMNS = ["time", "instance", "cpu_percent", "cpu_seconds", "rss_bytes", "peak_rss_bytes"]
GPU_COLUMNS = ["gpu_util", "gpu_memory_bytes"]
_KEYS = ("t", "cpu", "rss", "peak", "gpu", "gmem")


def bound_rows(rows: list[dict[str, Any]], limit: int = MAX_STORED_ROWS) -> list[dict[str, Any]]:
    """At most ``limit`` rows: every other row dropped until they fit; the first and last kept."""
    if limit < 2:
        raise ValueError("limit must be at least 2")
    while len(rows) > limit:
        last = rows[-1]
        rows = rows[::2]
        rows[-1] = last
    return rows


def encode(rows: list[dict[str, Any]]) -> dict[str, list[Any]] | None:
    """Rows as columns (the stored form); None when there are none."""
    if not rows:
        return None
    keys = [k for k in _KEYS if any(k in r for r in rows)]
    return {k: [r.get(k) for r in rows] for k in keys}


def decode(columns: dict[str, list[Any]] | None) -> list[dict[str, Any]]:
    if not columns:
        return []
    n = len(columns.get("t", []))
    return [{k: v[i] for k, v in columns.items() if v[i] is not None} for i in range(n)]


def instance_values(rows: list[dict[str, Any]], usage: dict[str, Any] | None, ended: float | None) -> dict[str, Any]:
    """The ``instances`` columns for an instance that ended: totals and its bounded samples.
    ``usage`` (the exit record's totals) adds a last row at ``ended`` when it says more."""
    rows = list(rows)
    if usage and ended is not None:
        last = rows[-1] if rows else {}
        if not rows or usage["cpu_seconds"] > last.get("cpu", 0) or usage["peak_rss_bytes"] > last.get("peak", 0):
            rows.append({"t": max(ended, last.get("t", ended)), "cpu": usage["cpu_seconds"], "rss": 0,
                         "peak": max(usage["peak_rss_bytes"], last.get("peak", 0))})
    return {"cpu_seconds": usage["cpu_seconds"] if usage else (rows[-1]["cpu"] if rows else None),
            "peak_rss_bytes": usage["peak_rss_bytes"] if usage else (max(r["peak"] for r in rows) if rows else None),
            "metrics": encode(bound_rows(rows))}


def frame_rows(instance_id: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as the API serves them (the client's DataFrame columns), with CPU % between samples."""
    out = []
    prev: dict[str, Any] | None = None
    for r in rows:
        dt = r["t"] - prev["t"] if prev else 0.0
        pct = 100.0 * (r["cpu"] - prev["cpu"]) / dt if prev and dt > 0 else None
        row = {"time": r["t"], "instance": instance_id, "cpu_percent": pct, "cpu_seconds": r["cpu"],
               "rss_bytes": r["rss"], "peak_rss_bytes": r["peak"]}
        if "gpu" in r:
            row.update(gpu_util=r["gpu"], gpu_memory_bytes=r.get("gmem"))
        out.append(row)
        prev = r
    return out


def summarize(insts: list[dict[str, Any]]) -> dict[str, Any]:
    """A job's ``peak_rss_bytes`` (the largest instance's) and ``cpu_seconds`` (all instances')."""
    peaks = [i["peak_rss_bytes"] for i in insts if i.get("peak_rss_bytes") is not None]
    cpus = [i["cpu_seconds"] for i in insts if i.get("cpu_seconds") is not None]
    return {"peak_rss_bytes": max(peaks) if peaks else None, "cpu_seconds": sum(cpus) if cpus else None}


def usage_by_job(store: Store, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """``{job_id: {"peak_rss_bytes": max over instances, "cpu_seconds": sum}}`` for ended instances."""
    if not job_ids:
        return {}
    q = (sa.select(instances.c.job_id, sa.func.max(instances.c.peak_rss_bytes), sa.func.sum(instances.c.cpu_seconds))
         .where(instances.c.job_id.in_(job_ids)).group_by(instances.c.job_id))
    with store.engine.connect() as c:
        return {j: {"peak_rss_bytes": peak, "cpu_seconds": cpu} for j, peak, cpu in c.execute(q)}


def fmt_bytes(n: float) -> str:
    """``2.3 GiB``, ``512 MiB``: binary units, at most one decimal, no trailing ``.0``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{int(n)} bytes"


def memory_hint(pool: str) -> str:
    """What to do about a job that needs more memory than its pool's family gives."""
    return f"the limit is per node of pool {pool}; use a pool of a larger family, e.g. a HIGHMEM_* one"


def oom_message(family: InstanceFamily | None, pool: str, used_bytes: int | None, limit_bytes: int | None) -> str:
    """``out of memory: 2.3 GiB used, CPU_X64_XS allows 2 GiB; ...`` (also for a MemoryError)."""
    limit = limit_bytes or (family.memory_bytes if family else None)
    used = f"{fmt_bytes(used_bytes)} used" if used_bytes else "more than allowed used"
    allows = f"{family.name if family else 'the family'} allows {fmt_bytes(limit)}" if limit else "over the limit"
    return f"out of memory: {used}, {allows}; {memory_hint(pool)}"
