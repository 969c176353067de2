"""The payload process's entry: from its launch record to the launcher.

The supervisor forks the payload process (ahead of its job, as a spare, or at its start) and it
calls :func:`enter` with its launch record; a sandboxed one is bubblewrap running
``python -m mljobs.runtime.entry`` (:func:`sandboxed`), which reads its record from the go pipe and
calls it too. Only the launcher (and cloudpickle with it) is imported up front: the job
environment's activation, the egress forwarder and the multi-node entry only for the jobs that
need them, and no pathlib, so a sandboxed spare's interpreter starts lean: it is started for every
sandboxed job, so each import here costs every job CPU time (``mljobs.runtime.sandbox`` says what
the sandbox is).
"""

from __future__ import annotations

import io
import json
import os
import sys
import traceback
from typing import Any

import setproctitle

from mljobs import trace
from mljobs.runtime import launcher

__all__ = ["GO_FD", "READY_FD", "enter", "start_failed", "sandboxed", "start_forwarder", "capabilities"]

GO_FD = 3  # where a payload process forked ahead (a spare) reads its launch record
READY_FD = 4  # where a sandboxed spare says its sandbox is made (one byte, then closed)


def start_failed(e: BaseException) -> None:
    """The payload process could not start its payload: say why (and where) on stderr, exit 70."""
    try:
        where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
        at = f" (at {where[0].filename}:{where[0].lineno})" if where else ""
        os.write(2, f"mljobs: the launcher could not start: {e!r}{at}\n".encode())
    finally:
        os._exit(70)


def enter(launch: dict[str, Any]) -> None:
    """In the payload process (forked by the supervisor, or a sandbox's entry), with its launch
    record: working folder, variables, CPUs, the job's interpreter, then the launcher (or the
    multi-node entry). Never returns."""
    try:
        trace.mark(launch.get("job_id", ""), "payload.go")
        setproctitle.setproctitle(f"mljobs-payload {launch.get('title') or launch['run_dir']}")
        os.chdir(launch["work_dir"])
        os.environ.update(launch["env"])
        cpus = launch.get("cpus")
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpus)
        mn = launch.get("multinode")
        python = launch.get("python") or sys.executable
        # Not realpath: a job environment's bin/python links to the same binary, yet its site differs;
        # one layered over this interpreter is activated here instead of started (~50 ms less).
        if os.path.abspath(python) != os.path.abspath(sys.executable):
            from mljobs.runtime import environment

            if not environment.activate_in_process(python):
                module = "mljobs.runtime.multinode" if mn else "mljobs.runtime.launcher"
                if launch.get("sandboxed"):  # inside, the run dir is the instance's out folder
                    with open(os.path.join(launch["run_dir"], "launch.json"), "w") as f:
                        json.dump(launch, f)
                os.execv(python, [python, "-m", module, launch["run_dir"]])
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = io.TextIOWrapper(open(1, "wb", 0, closefd=False), write_through=True, line_buffering=True)
        sys.stderr = io.TextIOWrapper(open(2, "wb", 0, closefd=False), write_through=True, line_buffering=True)
        if mn:
            from mljobs.runtime import multinode

            code = multinode.main(launch)
        else:
            code = launcher.main(launch)
    except BaseException as e:  # noqa: BLE001 - never return into the supervisor's code
        start_failed(e)
    os._exit(code)


def sandboxed() -> None:
    """Inside a sandbox (what bubblewrap runs): read the launch record from the go pipe, take the
    job's identity, start the egress forwarder where the job has one, then :func:`enter`. A spare's
    says first, on :data:`READY_FD`, that its folders are bound (they may be filled)."""
    try:
        if os.environ.pop("MLJOBS_SPARE_READY", None):
            os.write(READY_FD, b"r")
            os.close(READY_FD)
        with os.fdopen(GO_FD, "rb") as go:
            data = go.readline()
        if not data:
            os._exit(0)
        launch = json.loads(data)
        uid = launch.get("uid")
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        elif capabilities():  # a spare made to take a uid, sent a job without one: never run it so
            raise PermissionError("a sandbox that holds capabilities got no uid to run the job as")
        if launch.get("egress_sock"):
            start_forwarder(launch["egress_sock"], launch["egress_url"])
    except BaseException as e:  # noqa: BLE001
        start_failed(e)
    enter(launch)


def capabilities() -> int:
    """This process's effective capabilities (0: none)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def start_forwarder(sock: str, control_url: str) -> None:
    """Fork the process that carries the job's connections out to its supervisor's egress proxy
    (its ports listen before the payload starts)."""
    from mljobs.runtime import egress

    socks = egress.listeners(control_url)
    if os.fork() == 0:
        try:
            setproctitle.setproctitle("mljobs-egress-forwarder")
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            egress.serve_forwarder(socks, sock)
        finally:
            os._exit(0)
    for s, _ in socks:
        s.close()


if __name__ == "__main__":
    sandboxed()
