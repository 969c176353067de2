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
"""

from __future__ import annotations

import json
import os
import signal
import sys

import cloudpickle  # noqa: F401 - imported here so every job's fork has it already
import psutil
import setproctitle

from mljobs import trace
from mljobs.paths import PID_FILE
from mljobs.runtime import launcher, supervisor  # noqa: F401 - the same: warm imports

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
        try:
            os.write(2, f"mljobs: the supervisor could not start: {e!r}\n".encode())
        except OSError:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


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
    setproctitle.setproctitle(f"mljobs-spawner {label}".rstrip())
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our children
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C aimed at the server is not ours
    with os.fdopen(requests, "rb") as rd, os.fdopen(replies, "wb", buffering=0) as wr:
        wr.write(b"ready\n")
        for line in rd:
            try:
                req = json.loads(line)
                pid = os.fork()
            except Exception as e:  # noqa: BLE001
                wr.write(f"error {e!r}\n".encode())
                continue
            if pid == 0:
                _run_supervisor(req["run_dir"], req["stderr"])
            trace.mark(os.path.basename(os.path.dirname(req["run_dir"])), "spawner.forked")
            try:
                _record_pid(req["run_dir"], pid)
            except Exception as e:  # noqa: BLE001 - an instance nobody could find again must not run
                os.kill(pid, signal.SIGKILL)
                wr.write(f"error recording the supervisor's pid: {e!r}\n".encode())
                continue
            wr.write(f"{pid}\n".encode())


if __name__ == "__main__":
    serve(" ".join(sys.argv[1:]))
