"""The payload process's entry: from its launch record to the launcher.

The supervisor forks the payload process (ahead of its job, as a spare, or at its start) and it
calls :func:`enter` with its launch record; a sandboxed one is bubblewrap running
:mod:`mljobs.runtime.sandbox`, which calls it too. Only the launcher (and cloudpickle with it) is
imported up front: the job environment's activation and the multi-node entry only for the jobs
that need them, so a sandboxed spare's interpreter starts lean.
"""

from __future__ import annotations

import io
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import setproctitle

from mljobs import trace
from mljobs.runtime import launcher

__all__ = ["GO_FD", "READY_FD", "enter", "start_failed"]

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
                    Path(launch["run_dir"], "launch.json").write_text(json.dumps(launch))
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
