"""A pre-warmed process that forks instance supervisors, so no job pays for an interpreter start.

The local provider starts one spawner per server (``python -m mljobs.runtime.spawner``) and
talks to it over its stdin/stdout: it writes one JSON line per instance,
``{"run_dir": ..., "stderr": ...}``, and reads back one line, the new supervisor's pid (or
``error <text>``). Before it answers, it writes the supervisor's pid and start time to the run
dir's pid file, so a server killed once its request is sent (the spawner still forks) leaves a
supervisor that the next server finds there. The spawner has already imported the supervisor, the
launcher and cloudpickle; each fork runs :func:`mljobs.runtime.supervisor.main` in a new process session, exactly as
``python -m mljobs.runtime.supervisor RUN_DIR`` would, so supervisors outlive both the spawner
and the server. The spawner ignores SIGCHLD so the kernel reaps finished supervisors; the
server notices their ends through pidfds. It exits when the server closes its stdin.

This is the same idea as multiprocessing's ``forkserver`` start method, kept to one small loop
because a supervisor must be a session leader, not a child of a pool.

Warm supervisors go one step further: the spawner keeps a few supervisors forked ahead (``python
-m mljobs.runtime.spawner HOME``, told how many on its first line), each with its cgroups made and its payload
process already forked and moved inside them (:class:`mljobs.runtime.supervisor.Spare`), so an
instance starts without a fork, a cgroup's creation or the ~12 ms a cgroup migration waits for.
A request goes to the oldest; the spawner forks a replacement after it has answered. A request
marked ``"cold"`` (an instance that needs its own network namespace) gets a fresh fork as before.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import time
from typing import Any

import cloudpickle  # noqa: F401 - imported here so every job's fork has it already
import psutil
import setproctitle

from mljobs import trace
from mljobs.paths import PID_FILE
from mljobs.runtime import containment, launcher, sandbox, supervisor  # noqa: F401 - launcher: a warm import too

__all__ = ["serve"]


def _run_supervisor(run_dir: str, stderr_path: str) -> None:
    """In the fork: become a session leader with fresh stdio, then supervise the instance."""
    code = 70
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(err, 1)
        os.dup2(err, 2)
        os.closerange(3, 256)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        code = supervisor.main([run_dir])
    except BaseException as e:  # noqa: BLE001 - a fork must never return into the spawner's loop
        _say_failed(e)
    finally:
        _exit_fork(code)


def _fork_held() -> int:
    """Fork a supervisor with a cancel or a release held (:data:`mljobs.runtime.supervisor.HELD`)
    from its first instruction: the server may signal it as soon as this process answers."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, supervisor.HELD)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        raise
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return pid


def _say_failed(e: BaseException) -> None:
    try:
        os.write(2, f"mljobs: the supervisor could not start: {e!r}\n".encode())
    except OSError:
        pass


def _exit_fork(code: int) -> None:
    """End a forked supervisor with ``code``, its output flushed, never returning."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _run_spare(cmd_r: int, plan: containment.Plan, box: sandbox.Policy | None) -> None:
    """In the fork: a warm supervisor. It makes its cgroups and forks its payload process now,
    then waits for an instance (one JSON line on ``cmd_r``); EOF means the spawner is gone."""
    code = 70
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)  # stderr stays the spawner's log until an instance is assigned
        os.dup2(cmd_r, _CMD_FD)
        os.closerange(_CMD_FD + 1, 256)
        setproctitle.setproctitle("mljobs-supervisor (spare)")
        spare = supervisor.Spare(plan, box)
        with os.fdopen(_CMD_FD, "rb") as cmd:
            line = cmd.readline()
        if not line:
            spare.discard()
            code = 0
            return
        req = json.loads(line)
        _stdio_to(req["stderr"])
        code = supervisor.main([req["run_dir"]], spare)
    except BaseException as e:  # noqa: BLE001 - a fork must never return into the spawner's loop
        _say_failed(e)
    finally:
        _exit_fork(code)


_CMD_FD = 3  # where a warm supervisor reads its instance from


def _stdio_to(stderr_path: str) -> None:
    err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(err, 1)
    os.dup2(err, 2)
    os.close(err)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115


class _Spares:
    """The warm supervisors: ``count`` of them ready at any time, each with its pipe."""

    def __init__(self, plan: containment.Plan, count: int, box: dict[str, Any] | None) -> None:
        self.plan, self.count = plan, count
        self.box = box  # the sandbox template spares are made in (the latest request's)
        self.ready: collections.deque[tuple[int, int]] = collections.deque()  # (pid, pipe's write end)

    def fill(self) -> None:
        while len(self.ready) < self.count:
            cmd_r, cmd_w = os.pipe()
            pid = _fork_held()
            if pid == 0:
                os.close(cmd_w)
                _run_spare(cmd_r, self.plan, sandbox.Policy.from_dict(self.box) if self.box else None)
            os.close(cmd_r)
            self.ready.append((pid, cmd_w))

    def assign(self, req: dict[str, Any]) -> int | None:
        """Hand ``req`` to a warm supervisor; its pid, or None when none took it."""
        line = json.dumps(req).encode() + b"\n"
        while self.ready:
            pid, cmd_w = self.ready.popleft()
            try:
                os.write(cmd_w, line)
                return pid
            except OSError:  # it died meanwhile
                continue
            finally:
                os.close(cmd_w)
        return None

    def close(self, timeout: float = 5.0) -> None:
        """Let every warm supervisor go (each removes its cgroups and ends) and wait for them."""
        pids = [pid for pid, _ in self.ready]
        for _, cmd_w in self.ready:
            os.close(cmd_w)
        self.ready.clear()
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _record_pid(run_dir: str, pid: int) -> None:
    """Write ``<pid> <start time>`` (psutil's create_time, as the server compares it) atomically."""
    try:
        started: float | None = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:  # ended already (the kernel reaps our children): its exit record tells
        started = None
    path = os.path.join(run_dir, PID_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(f"{pid} {started}")
    os.replace(path + ".tmp", path)


def serve(label: str = "", requests: int = 0, replies: int = 1) -> None:
    """Answer spawn requests until ``requests`` closes. Its first line is the configuration,
    ``{"plan": containment plan, "spares": N}``: with N > 0, that many warm supervisors wait
    ready (cgroups made, payload process forked and inside them, see
    :class:`mljobs.runtime.supervisor.Spare`); a request goes to one unless it says ``"cold"``."""
    setproctitle.setproctitle(f"mljobs-spawner {label}".rstrip())
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C aimed at the server is not ours
    with os.fdopen(requests, "rb") as rd, os.fdopen(replies, "wb", buffering=0) as wr:
        config = json.loads(rd.readline() or b"{}")
        warm = _Spares(containment.Plan.from_dict(config.get("plan")), int(config.get("spares", 0)), config.get("box"))
        try:
            warm.fill()
            wr.write(b"ready\n")
            for line in rd:
                try:
                    req = json.loads(line)
                    if req.get("box") != warm.box:  # the server's isolation changed: spares made for it
                        warm.close(timeout=0)
                        warm.box = req.get("box")
                    pid = None if req.get("cold") else warm.assign(req)
                    if pid is None:
                        pid = _fork_held()
                        if pid == 0:
                            _run_supervisor(req["run_dir"], req["stderr"])
                except Exception as e:  # noqa: BLE001
                    wr.write(f"error {e!r}\n".encode())
                    continue
                trace.mark(os.path.basename(os.path.dirname(req["run_dir"])), "spawner.forked")
                try:
                    _record_pid(req["run_dir"], pid)
                except Exception as e:  # noqa: BLE001 - an instance nobody could find again must not run
                    os.kill(pid, signal.SIGKILL)
                    wr.write(f"error recording the supervisor's pid: {e!r}\n".encode())
                    continue
                wr.write(f"{pid}\n".encode())
                warm.fill()  # after the answer: the server does not wait for it
        finally:
            warm.close()


if __name__ == "__main__":
    serve(" ".join(sys.argv[1:]))
