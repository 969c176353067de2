"""Containment: every process an instance starts stays findable, so none outlives its job.

The server picks a mechanism once (:func:`detect`) and hands it to each supervisor in the
instance's launch record:

- ``cgroup2``: a per-instance cgroup on the cgroup v2 hierarchy (wherever it is mounted), ended
  with ``cgroup.kill``;
- ``cgroup1``: a per-instance cgroup in the v1 freezer hierarchy, ended by freezing it, killing
  every task in it and thawing, until it is empty;
- ``fallback``: no writable cgroup; the payload gets a parent-death signal (SIGKILL) and the server
  sweeps processes that carry the job's marker (``MLJOBS_JOB_ID`` in their environment).

Memory is limited on resident memory, independently of the kill mechanism: a per-instance v1
memory cgroup under the process's own one (``memory.limit_in_bytes``), or ``memory.max`` on the v2
cgroup when the memory controller is delegated there; else (``rss``) the supervisor watches the
resident memory of the instance's tree and ends it at the limit.

Per-instance cgroups live under one folder per server home, ``mlj-<tag>``, named
``<job_id>.<instance>`` (or ``spare-<spawner pid>-<pid>-<hex>`` when a warm supervisor made them ahead; the
instance's run dir then names them), so a server finds what its own jobs left behind after a
restart and never touches another server's. The payload process enters them before the launcher
runs, so every descendant is inside. When the instance ends its supervisor empties them and the
server removes them in the background (a removal waits for an RCU grace period, as does a move
into a cgroup: both are kept off the path of a job's result).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

__all__ = ["Plan", "InstanceCgroup", "detect", "home_tag", "parse_mountinfo", "parse_proc_cgroup",
           "candidates", "descendants", "marked_processes", "kill_marked", "MECHANISMS", "THREAD_VARS", "SPARE_PREFIX"]

# Thread-pool sizes of the numeric libraries, set to an instance's CPU count so that a payload
# does not start a thread per CPU of the whole machine.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")

MECHANISMS = ("auto", "cgroup2", "cgroup1", "fallback")
_PREFIX = "mlj-"
SPARE_PREFIX = "spare-"  # cgroups a warm supervisor made ahead (``spare-<spawner pid>-<pid>-<hex>``)


def home_tag(home: str | os.PathLike[str]) -> str:
    """The name of a server's folder of cgroups: ``mlj-`` and a hash of its home."""
    return _PREFIX + hashlib.sha1(str(Path(home).resolve()).encode()).hexdigest()[:10]


# -- what the machine offers (pure parsing: unit-tested on sample text) ---------------------------
def parse_mountinfo(text: str) -> dict[str, tuple[str, str]]:
    """Cgroup mounts from ``/proc/self/mountinfo``: ``{"": (mountpoint, root)}`` for v2 and
    ``{controller: (mountpoint, root)}`` for each v1 controller (first mount wins)."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
        fstype, superopts = tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            out.setdefault("", (mountpoint, root))
        elif fstype == "cgroup":
            for opt in superopts:
                if opt not in ("rw", "ro") and "=" not in opt:
                    out.setdefault(opt, (mountpoint, root))
    return out


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as ``{"": v2 path, controller: v1 path}``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def candidates(mountinfo: str, proc_cgroup: str) -> dict[str, str]:
    """This process's own cgroup folders, by hierarchy: ``cgroup2``, ``freezer``, ``pids``, ``memory``."""
    mounts, own = parse_mountinfo(mountinfo), parse_proc_cgroup(proc_cgroup)
    out: dict[str, str] = {}
    for key, name in (("", "cgroup2"), ("freezer", "freezer"), ("pids", "pids"), ("memory", "memory")):
        if key not in mounts:
            continue
        mountpoint, root = mounts[key]
        path = own.get(key, "/")
        if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
            path = path[len(root.rstrip("/")):] or "/"
        elif root != "/":
            path = "/"  # our cgroup is outside what this mount shows (a container): use its root
        out[name] = os.path.normpath(mountpoint + "/" + path.lstrip("/"))
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """The mechanism in force, and where each server's instance cgroups go."""

    kind: str  # cgroup2 | cgroup1 | fallback
    kill_dir: str | None  # the server's folder of per-instance kill cgroups (v2, or v1 freezer)
    memory: str  # cgroup2 | cgroup1 | rss
    memory_dir: str | None  # the server's folder of per-instance memory cgroups (v1 memory, or = kill_dir)
    reason: str = ""  # why not a better mechanism

    def describe(self) -> str:
        kill = {"cgroup2": f"cgroup v2 (cgroup.kill) under {self.kill_dir}",
                "cgroup1": f"cgroup v1 freezer under {self.kill_dir}",
                "fallback": "fallback: parent-death signal and a sweep of processes by the job's marker"}[self.kind]
        mem = {"cgroup2": "memory.max (cgroup v2)", "cgroup1": f"cgroup v1 memory under {self.memory_dir}",
               "rss": "the supervisor watches resident memory every 250 ms"}[self.memory]
        return f"{kill}; memory limit: {mem}" + (f" ({self.reason})" if self.reason else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Plan:
        return cls(**d) if d else cls("fallback", None, "rss", None, "no containment in the launch record")


def _writable_child(parent: str, name: str, probe_file: str) -> str | None:
    """Make ``parent/name`` (a cgroup folder) if we may; None if not, or if it lacks ``probe_file``."""
    path = os.path.join(parent, name)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if not os.path.exists(os.path.join(path, probe_file)):
        _rmdir(path)
        return None
    return path


def detect(home: str | os.PathLike[str], setting: str = "auto") -> Plan:
    """Pick the best mechanism this machine lets us write (``setting`` forces one)."""
    if setting not in MECHANISMS:
        raise ValueError(f"containment must be one of {', '.join(MECHANISMS)}, got {setting!r}")
    if setting == "fallback":
        return Plan("fallback", None, "rss", None, "forced by MLJOBS_CONTAINMENT=fallback")
    try:
        own = candidates(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
    except OSError as e:
        return Plan("fallback", None, "rss", None, f"cannot read /proc: {e}")
    tag = home_tag(home)
    kind, kill_dir, reasons = "fallback", None, []
    if setting in ("auto", "cgroup2"):
        if "cgroup2" in own and (kill_dir := _writable_child(own["cgroup2"], tag, "cgroup.kill")):
            kind = "cgroup2"
        else:
            reasons.append("no writable cgroup v2 with cgroup.kill" if "cgroup2" in own else "no cgroup v2 mounted")
    if kind == "fallback" and setting in ("auto", "cgroup1"):
        if "freezer" in own and (kill_dir := _writable_child(own["freezer"], tag, "freezer.state")):
            kind = "cgroup1"
        else:
            reasons.append("no writable cgroup v1 freezer")
    memory, memory_dir = "rss", None
    if kind == "cgroup2" and kill_dir and _enable_memory(kill_dir):
        memory, memory_dir = "cgroup2", kill_dir
    elif kind != "fallback" and "memory" in own and (
            memory_dir := _writable_child(own["memory"], tag, "memory.limit_in_bytes")):
        memory = "cgroup1"
    return Plan(kind, kill_dir, memory, memory_dir, "; ".join(reasons) if kind == "fallback" else "")


def _enable_memory(folder: str) -> bool:
    """Delegate the v2 memory controller to ``folder``'s children, if its parent offers it."""
    try:
        if "memory" not in Path(folder, "cgroup.controllers").read_text().split():
            return False
        Path(folder, "cgroup.subtree_control").write_text("+memory")
        return True
    except OSError:
        return False


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


class InstanceCgroup:
    """One instance's cgroups (kill and memory), made by its supervisor, ended by either side."""

    def __init__(self, plan: Plan, job_id: str = "", instance_id: int | str = "", *, name: str | None = None) -> None:
        self.plan = plan
        self.name = name = name or f"{job_id}.{instance_id}"
        self.kill_dir = os.path.join(plan.kill_dir, name) if plan.kill_dir else None
        self.memory_dir = os.path.join(plan.memory_dir, name) if plan.memory_dir else None
        if self.memory_dir == self.kill_dir:
            self.memory_dir = None if plan.memory != "cgroup2" else self.kill_dir

    @property
    def dirs(self) -> list[str]:
        return [d for d in dict.fromkeys([self.kill_dir, self.memory_dir]) if d]

    def create(self, memory_bytes: int | None) -> None:
        """Make the folders and set the memory limit (raises OSError if the machine refuses)."""
        for d in self.dirs:
            os.makedirs(d, exist_ok=True)
        self.set_memory_limit(memory_bytes)

    def set_memory_limit(self, memory_bytes: int | None) -> None:
        """Limit the resident memory of what is inside (raises OSError if the machine refuses)."""
        if memory_bytes and self.memory_dir:
            if self.plan.memory == "cgroup2":
                Path(self.memory_dir, "memory.max").write_text(str(memory_bytes))
                try:
                    Path(self.memory_dir, "memory.swap.max").write_text("0")
                except OSError:
                    pass  # no swap accounting: nothing to limit
            else:
                Path(self.memory_dir, "memory.limit_in_bytes").write_text(str(memory_bytes))

    def enter(self, pid: int = 0) -> None:
        """Move ``pid`` (this process by default) into every cgroup of the instance."""
        text = str(pid or os.getpid())
        for d in self.dirs:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(text)

    def pids(self) -> list[int]:
        for d in self.dirs:
            text = _read(os.path.join(d, "cgroup.procs"))
            return [int(p) for p in text.split()]
        return []

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.dirs)

    def kill(self, timeout: float = 5.0) -> bool:
        """SIGKILL everything inside and wait until it is empty; True if it is."""
        deadline = time.monotonic() + timeout
        if not self.pids():  # writing cgroup.kill waits for an RCU grace period (~10 ms): only when needed
            return True
        if self.kill_dir and self.plan.kind == "cgroup2":
            try:
                Path(self.kill_dir, "cgroup.kill").write_text("1")
            except FileNotFoundError:
                return True
            except OSError:
                pass  # an old kernel without cgroup.kill: the loop below does it
        freezer = self.kill_dir if self.plan.kind == "cgroup1" else None
        pause = 0.0005  # a task that just exited stays listed for a few ms: look again soon, then less often
        while True:
            pids = self.pids()
            if not pids:
                return True
            if time.monotonic() > deadline:
                return False
            if freezer:
                _write_quiet(os.path.join(freezer, "freezer.state"), "FROZEN")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if freezer:
                _write_quiet(os.path.join(freezer, "freezer.state"), "THAWED")
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def remove(self) -> bool:
        """Kill what is left and remove the folders; True when none is left."""
        if not self.exists():
            return True
        self.kill()
        ok = True
        for d in self.dirs:
            deadline, pause = time.monotonic() + 1.0, 0.0005
            while not _rmdir(d):  # the kernel lets go of a cgroup shortly after its last task
                if time.monotonic() > deadline:
                    ok = False
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
        return ok

    # -- statistics --------------------------------------------------------------------------
    def memory_state(self) -> dict[str, int]:
        """``{"oom_kills", "peak_bytes", "current_bytes", "limit_bytes"}`` from the memory cgroup
        (empty when the limit is not a cgroup's)."""
        d = self.memory_dir
        if not d:
            return {}
        if self.plan.memory == "cgroup2":
            events = _keyed(_read(os.path.join(d, "memory.events")))
            return {"oom_kills": events.get("oom_kill", 0), "peak_bytes": _int(os.path.join(d, "memory.peak")),
                    "current_bytes": _int(os.path.join(d, "memory.current")),
                    "limit_bytes": _int(os.path.join(d, "memory.max"))}
        oom = _keyed(_read(os.path.join(d, "memory.oom_control")))
        return {"oom_kills": oom.get("oom_kill", 0), "peak_bytes": _int(os.path.join(d, "memory.max_usage_in_bytes")),
                "current_bytes": _int(os.path.join(d, "memory.usage_in_bytes")),
                "limit_bytes": _int(os.path.join(d, "memory.limit_in_bytes")),
                "failcnt": _int(os.path.join(d, "memory.failcnt"))}


def _int(path: str) -> int:
    text = _read(path).strip()
    return int(text) if text.isdigit() else 0


def _write_quiet(path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError:
        pass


_CHILDREN_FILES = os.path.exists(f"/proc/self/task/{os.getpid()}/children")  # CONFIG_PROC_CHILDREN


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root``, parents before their children. Walks the tree itself
    (/proc/PID/task/TID/children), so the cost follows the tree's size, not the machine's process
    count: a node running many instances samples each one's tree several times a second."""
    if not _CHILDREN_FILES:
        return _descendants_by_scan(root)
    out: list[int] = []
    seen, stack = {root}, [root]
    while stack:
        pid = stack.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    kids = f.read().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in seen:
                    seen.add(k)
                    out.append(k)
                    stack.append(k)
    return out


def _descendants_by_scan(root: int) -> list[int]:
    """The same from every process's parent id (kernels without the children files)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out: list[int] = []
    stack = [root]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


# -- the fallback: processes by marker ------------------------------------------------------------
def marked_processes(job_id: str | None = None) -> dict[int, str]:
    """Live processes whose environment has ``MLJOBS_JOB_ID`` (only ``job_id``'s when given): pid -> id."""
    out: dict[int, str] = {}
    me = os.getpid()
    want = f"MLJOBS_JOB_ID={job_id}\0".encode() if job_id else None
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if want is not None:
            if want in env or env.endswith(want[:-1]):
                out[int(name)] = job_id or ""
            continue
        at = env.find(b"MLJOBS_JOB_ID=")
        if at >= 0:
            end = env.find(b"\0", at)
            out[int(name)] = env[at + 14: end if end >= 0 else None].decode("ascii", "replace")
    return out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X")


def kill_marked(job_id: str, timeout: float = 5.0) -> int:
    """SIGKILL every process carrying ``job_id``'s marker until none is left; how many were killed."""
    deadline = time.monotonic() + timeout
    killed: set[int] = set()
    while True:
        pids = [p for p in marked_processes(job_id) if not _gone(p)]
        if not pids or time.monotonic() > deadline:
            return len(killed)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
