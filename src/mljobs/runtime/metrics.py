"""Per-instance resource sampling, driven by the supervisor's select loop (no thread of its own).

Every tick reads the instance's processes (from its cgroup, else the supervisor's tree in /proc):
CPU time (utime + stime, with what exited children already handed up), resident memory now and
its peak, and on an instance with GPUs their utilisation and memory (NVML, when ``nvidia-ml-py``
is installed). Rows go to ``metrics.jsonl`` in the run folder, one compact JSON object a line:
``{"t": epoch s, "cpu": s, "rss": bytes, "peak": bytes[, "gpu": %, "gmem": bytes]}``.

Bounded per instance: a row a second for the first ``ROWS_PER_LEVEL`` rows, then the interval
doubles every ``ROWS_PER_LEVEL`` rows (log growth: a week-long job writes ~6,600 rows). When the
supervisor watches memory itself (no memory cgroup), it also checks the tree's resident memory
every ``WATCH_INTERVAL_S`` and reports it once it is over the limit.
"""

from __future__ import annotations

import json
import os
import resource
from typing import IO, Any

from mljobs.runtime.containment import InstanceCgroup, descendants

try:  # optional extra `gpu`: only instances with GPUs ever initialise NVML
    import pynvml
except ImportError:  # no NVML bindings: no GPU metrics
    pynvml = None

__all__ = ["Sampler", "row_interval", "tree_usage", "read_samples", "ROWS_PER_LEVEL", "WATCH_INTERVAL_S"]

ROWS_PER_LEVEL = 600
FIRST_INTERVAL_S = 1.0
WATCH_INTERVAL_S = 0.25
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def read_samples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The samples in a metrics file so far (a line still being written is read next time)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def row_interval(rows_written: int) -> float:
    """Seconds between metric rows once ``rows_written`` rows exist: 1 s, doubling every 600 rows."""
    return FIRST_INTERVAL_S * 2 ** (rows_written // ROWS_PER_LEVEL)


def tree_usage(pids: list[int]) -> tuple[float, int, int]:
    """CPU seconds (own and reaped children's), resident bytes now, and the largest single-process
    peak resident size over ``pids``."""
    cpu, rss, hwm = 0.0, 0, 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{pid}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        cpu += sum(int(x) for x in fields[11:15]) / _TICK  # utime stime cutime cstime
        for line in status.split(b"\n"):
            if line.startswith(b"VmRSS:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith(b"VmHWM:"):
                hwm = max(hwm, int(line.split()[1]) * 1024)
    return cpu, rss, hwm


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Sampler:
    """The supervisor's clock for metric rows and memory checks."""

    def __init__(self, path: str, root: int, cgroup: InstanceCgroup | None, *, limit_bytes: int | None,
                 watch_memory: bool, record: bool, gpus: list[int] | None, now: float) -> None:
        self.path, self.root, self.cgroup = path, root, cgroup
        self.limit = limit_bytes if watch_memory else None
        self.record = record
        self.gpus = list(gpus or []) if pynvml is not None else []
        self._nvml: list[Any] | None = None
        self.rows = 0
        self.peak = 0
        self.cpu = 0.0
        self._out: IO[str] | None = None
        self._base_cpu = _children_cpu()  # an environment build's installers are not the job's
        self._next_row = now + FIRST_INTERVAL_S if record else None
        self._next_watch = now + WATCH_INTERVAL_S if self.limit else None

    def timeout(self, now: float) -> float | None:
        """Seconds until the next tick (None: no tick at all)."""
        due = [t for t in (self._next_row, self._next_watch) if t is not None]
        return max(0.0, min(due) - now) if due else None

    def _pids(self) -> list[int]:
        if self.cgroup is not None:
            return self.cgroup.pids()
        return descendants(self.root)

    def _cgroup_cpu(self) -> float:
        if self.cgroup is None or not self.cgroup.kill_dir or self.cgroup.plan.kind != "cgroup2":
            return 0.0
        try:
            with open(os.path.join(self.cgroup.kill_dir, "cpu.stat")) as f:
                for line in f:
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
        except OSError:
            pass
        return 0.0

    def tick(self, now: float) -> int | None:
        """Sample if due; returns the tree's resident bytes when it is over the watched limit."""
        due_row = self._next_row is not None and now >= self._next_row
        due_watch = self._next_watch is not None and now >= self._next_watch
        if not (due_row or due_watch):
            return None
        cpu, rss, hwm = tree_usage(self._pids())
        self.cpu = max(self.cpu, cpu + _children_cpu() - self._base_cpu, self._cgroup_cpu())
        self.peak = max(self.peak, rss, hwm)
        if due_watch:
            self._next_watch = now + WATCH_INTERVAL_S
        if due_row:
            row: dict[str, Any] = {"t": round(now, 2), "cpu": round(self.cpu, 3), "rss": rss, "peak": self.peak}
            row.update(self._gpu())
            self._write(row)
            self._next_row = now + row_interval(self.rows)
        if self.limit is not None and rss > self.limit:
            return rss
        return None

    def _gpu(self) -> dict[str, Any]:
        if not self.gpus:
            return {}
        try:
            if self._nvml is None:
                pynvml.nvmlInit()
                self._nvml = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.gpus]
            util = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._nvml]
            mem = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self._nvml)
        except pynvml.NVMLError:
            self.gpus = []  # no driver after all: stop asking
            return {}
        return {"gpu": sum(util) / len(util), "gmem": int(mem)}

    def _write(self, row: dict[str, Any]) -> None:
        if self._out is None:
            self._out = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self._out.write(json.dumps(row, separators=(",", ":")) + "\n")
        self._out.flush()
        self.rows += 1

    def finish(self) -> dict[str, Any]:
        """The instance's totals once every process is reaped: ``{"cpu_seconds", "peak_rss_bytes"}``."""
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu = max(self.cpu, ru.ru_utime + ru.ru_stime - self._base_cpu, self._cgroup_cpu())
        self.peak = max(self.peak, ru.ru_maxrss * 1024)
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._nvml is not None:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass  # the driver went away: nothing left to release
        return {"cpu_seconds": round(self.cpu, 3), "peak_rss_bytes": int(self.peak), "rows": self.rows}
