"""One supervisor per instance, in its own process session.

It runs the launcher in a child process, captures the child's stdout and stderr line by line
with timestamps into the instance log, and records the exit in ``exit.json`` (written to a
temporary file and renamed). It is a child subreaper, so processes the payload leaves behind
(even ones that call ``setsid``) stay in its tree: on SIGTERM (cancel) or when the payload ends,
it sends SIGTERM to the whole tree, waits a grace period, then SIGKILLs what is left.

Containment (:mod:`mljobs.runtime.containment`): the forked child enters the instance's cgroups
before anything else runs and has a parent-death signal (SIGKILL), so should this supervisor die,
the payload dies with it and the server kills the rest from the cgroup (or by the job's marker).
Memory is limited on resident memory: by the memory cgroup, else by the sampler watching the
tree; an instance over its limit ends with ``oom: {used_bytes, limit_bytes}`` in its exit record.
Resource samples (:mod:`mljobs.runtime.metrics`) are taken in the same select loop.

The server learns of the exit by watching this process (a pidfd), not by a callback, so a
supervisor keeps working across a server restart.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import secrets
import selectors
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import setproctitle

from mljobs import logformat, trace
from mljobs.errors import EnvironmentBuildError
from mljobs.runtime import containment, egress, entry, environment, launcher, multinode, sandbox
from mljobs.paths import CGROUP_FILE, CHECKPOINT_DIR
from mljobs.runtime.containment import descendants
from mljobs.runtime.metrics import Sampler

__all__ = ["main", "supervise", "descendants", "kill_tree", "HELD", "Spare"]

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
_LINE_LIMIT = 64 * 1024
CHECKPOINT_LOOK_S = 2.0  # how often a local instance's checkpoint folder is looked at (runtime.checkpoint)


def _set_subreaper() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: fall back to the process group alone
        pass


# A cancel or a release, held in a supervisor from the spawner's fork until supervise() takes them:
# SIGTERM's default would end the supervisor alone, its payload left to a parent-death signal that
# bubblewrap may not have armed yet (its sandbox init then waits forever)
HELD = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(root: int, grace_s: float, *, include_root: bool = False) -> None:
    """SIGTERM every descendant of ``root``, wait up to ``grace_s``, SIGKILL the rest, reap."""
    pids = descendants(root) + ([root] if include_root else [])
    if not pids:
        return
    # Not bubblewrap's own processes: they would die at once and take the sandbox with them (its
    # init SIGKILLs the rest), so the payload would get no grace period; they end when it does.
    _signal_all([p for p in pids if not _is_bwrap(p)], signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap()
        pids = descendants(root) + ([root] if include_root and _alive(root) else [])
        if not pids:
            return
        time.sleep(0.02)
    _signal_all(descendants(root) + ([root] if include_root else []), signal.SIGKILL)
    for _ in range(100):
        _reap()
        left = descendants(root)
        if not left:
            return
        # again: a process can come to us meanwhile (we are a subreaper), such as bubblewrap's
        # sandbox init when its monitor was killed during set-up (it then waits for it forever)
        _signal_all(left, signal.SIGKILL)
        time.sleep(0.01)


def _is_bwrap(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "bwrap"
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


_REAPED: dict[int, int] = {}  # pid -> wait status of every child this process reaped


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _REAPED[pid] = status


class Spare:
    """A payload process forked ahead of its job, already inside cgroups of its own.

    Moving a process into a cgroup waits for an RCU grace period (about 12 ms here, the largest
    single cost of a trivial job), so a warm supervisor (:mod:`mljobs.runtime.spawner`) makes its
    cgroups and forks its payload process before any job is assigned; the process enters them
    and then waits on a pipe for its launch record. The cgroups are named ``spare-<spawner's
    pid>-<pid>-<random>``; once assigned, the instance's run dir names them (``cgroup`` there), which
    is how the server finds them for :meth:`mljobs.providers.local.LocalProvider.finish_job`.
    """

    def __init__(self, plan: containment.Plan, box: sandbox.Policy | None = None) -> None:
        # the spawner's pid first: a server tells its own spawner's spares from an earlier one's
        self.name = f"{containment.SPARE_PREFIX}{os.getppid()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.cgroup: containment.InstanceCgroup | None = None
        if not (plan.kind == "fallback" and plan.memory == "rss"):
            cgroup = containment.InstanceCgroup(plan, name=self.name)
            try:
                cgroup.create(None)
                self.cgroup = cgroup
            except OSError:
                cgroup.remove()  # the instance then runs as a cold one would without cgroups
        # sandboxed (box): the payload process is bubblewrap running the sandbox's entry, its
        # folders bound to this slot's, its interpreter started and its imports done
        self.box = box
        self.slot = sandbox.spare_slot(box.home, self.name) if box is not None else None
        argv: list[str] = []
        if box is not None and self.slot is not None:
            for d in ("work", "out", "app", "net"):
                (self.slot / d).mkdir(parents=True)
            passwd = self.slot / "passwd" if box.mode == "shared" else None
            if passwd is not None:  # filled in for the job's uid at assignment
                sandbox.write_passwd(passwd, box)
            argv = sandbox.payload_argv(box, work=str(self.slot / "work"), app=str(self.slot / "app"),
                                        out=str(self.slot / "out"), gpus=None, net=str(self.slot / "net"),
                                        passwd=str(passwd) if passwd is not None else None, spare=True)
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        go_r, self.go_w = os.pipe()
        self.ready_r, ready_w = os.pipe() if box is not None else (None, None)
        me = os.getpid()
        # bubblewrap's sandbox init, orphaned when its monitor is killed during set-up (a discard
        # then), is not armed with its parent-death signal yet: it comes to us, and we kill it
        _set_subreaper()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self.out_r), os.close(self.err_r), os.close(self.go_w)
            if self.ready_r is not None:
                os.close(self.ready_r)
            _child_prepare(out_w, err_w, self.cgroup, me, go_r, "spare", ready_w)
            try:
                if box is not None:
                    os.execve(argv[0], argv, {**sandbox.payload_env(box, {}), "MLJOBS_SPARE_READY": "1"})
                with os.fdopen(GO_FD, "rb") as go:
                    data = go.readline()
                if not data:  # the supervisor gave up on this spare
                    os._exit(0)
                entry.enter(json.loads(data))
            except BaseException as e:  # noqa: BLE001 - never return into the supervisor's code
                entry.start_failed(e)
        os.close(out_w), os.close(err_w), os.close(go_r)
        if ready_w is not None:
            os.close(ready_w)

    def wait_sandbox(self) -> bool:
        """Wait until the sandbox's folders are bound (its entry says so); False: it never was
        (bubblewrap failed, or the process died)."""
        if self.ready_r is None:
            return True
        try:
            return os.read(self.ready_r, 1) == b"r"
        finally:
            os.close(self.ready_r)
            self.ready_r = None

    def go(self, launch: dict[str, Any]) -> None:
        """Hand the payload process its launch record: it runs the launcher at once (a payload
        process that died meanwhile ends as any would: its exit status says how)."""
        _send_launch(self.go_w, launch)

    def discard(self) -> None:
        """Stop the unused payload process, and all it started, and remove its cgroups and slot (the
        spawner went away). Its processes are all this (warm) supervisor has started so far."""
        kill_tree(os.getpid(), 0.0)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        if self.cgroup is not None:
            self.cgroup.remove()
        self.remove_slot()

    def takes(self, launch: dict[str, Any], box: sandbox.Policy | None) -> bool:
        """Whether this spare's payload process can run ``launch`` (same sandbox, same network,
        its sandbox made)."""
        if launch.get("netns"):
            return False
        if box is None or self.box is None:
            return box is None and self.box is None
        return self.box.takes(box, launch.get("gpus")) and self.wait_sandbox()

    def fill_slot(self, launch: dict[str, Any], box: sandbox.Policy) -> None:
        """Make the slot's folders the instance's: what the provider put in its work folder moves
        into the slot's, which is then renamed into place (the sandbox's bind follows it); the
        payload is linked into the slot's ``app`` when it lives elsewhere (a stage's folder)."""
        assert self.slot is not None
        work, run_dir = Path(launch["work_dir"]), Path(launch["run_dir"])
        for item in os.scandir(work):
            os.rename(item.path, self.slot / "work" / item.name)
        os.rmdir(work)
        os.rename(self.slot / "work", work)
        os.rename(self.slot / "out", run_dir / "out")
        if launch["app_dir"] != launch["work_dir"]:
            _link_tree(Path(launch["app_dir"]), self.slot / "app")
        if box.mode == "shared":
            sandbox.write_passwd(self.slot / "passwd", box)
        sandbox.own_for(box, work, run_dir / "out")

    def remove_slot(self) -> None:
        if self.slot is not None:
            shutil.rmtree(self.slot, ignore_errors=True)


GO_FD, READY_FD = entry.GO_FD, entry.READY_FD


def _send_launch(fd: int, launch: dict[str, Any]) -> None:
    """Write the launch record on a go pipe and close it; a reader that is gone is not an error here."""
    try:
        with os.fdopen(fd, "wb") as go:
            go.write(json.dumps(launch).encode() + b"\n")
    except BrokenPipeError:
        pass


def _link_tree(src: Path, dst: Path) -> None:
    """``src``'s files in ``dst`` as hard links (a copy where links cannot be made)."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)


def _child_prepare(out_w: int, err_w: int, cgroup: containment.InstanceCgroup | None, parent: int,
                   go_r: int | None, title: str, ready_w: int | None = None) -> None:
    """In the forked payload process, before its launch: enter the cgroups, die with the
    supervisor, own process group, default signals, stdio on the supervisor's pipes."""
    try:
        setproctitle.setproctitle(f"mljobs-payload {title}")
        if cgroup is not None:
            cgroup.enter()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before the signal was armed
            os._exit(70)
        os.setpgid(0, 0)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())  # a spare is forked while its supervisor holds some
        signal.set_wakeup_fd(-1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        if go_r is not None:
            os.dup2(go_r, GO_FD)
        if ready_w is not None:
            os.dup2(ready_w, READY_FD)
        os.closerange(READY_FD + 1 if ready_w is not None else 3 if go_r is None else GO_FD + 1, 256)
    except BaseException as e:  # noqa: BLE001
        entry.start_failed(e)


class _LogWriter:
    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
        self.partial: dict[str, bytes] = {}
        self.bwrap_error = ""  # the first line bubblewrap wrote, when it could not make the sandbox
        self.lock = threading.Lock()  # the egress proxy's thread writes system lines too

    def system(self, text: str) -> None:
        with self.lock:
            self.f.write(logformat.format_record(logformat.SYS, text))
            self.f.flush()

    def feed(self, stream: str, data: bytes) -> None:
        with self.lock:
            self._feed(stream, data)

    def _feed(self, stream: str, data: bytes) -> None:
        buf = self.partial.get(stream, b"") + data
        *lines, rest = buf.split(b"\n")
        if len(rest) > _LINE_LIMIT:
            lines.append(rest)
            rest = b""
        self.partial[stream] = rest
        if lines and stream == logformat.ERR and not self.bwrap_error and lines[0].startswith(b"bwrap: "):
            self.bwrap_error = lines[0].decode("utf-8", "backslashreplace").strip()
        if lines:
            now = logformat.now_iso()
            self.f.write("".join(
                logformat.format_record(stream, ln.decode("utf-8", "backslashreplace").rstrip("\r"), now)
                for ln in lines
            ))
            self.f.flush()

    def close(self) -> None:
        for stream, rest in self.partial.items():
            if rest:
                self.f.write(logformat.format_record(stream, rest.decode("utf-8", "backslashreplace")))
        self.partial.clear()
        self.f.close()


def _write_exit(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def supervise(launch: dict[str, Any], spare: Spare | None = None) -> dict[str, Any]:
    """Run one instance to its end; returns (and writes) the exit record. ``spare``: a payload
    process forked ahead (a warm supervisor's), used unless the instance needs its own network."""
    trace.mark(launch.get("job_id", ""), "supervisor.start")
    grace = float(launch.get("grace_period_s", 3.0))
    log = _LogWriter(launch["log_file"])
    _set_subreaper()
    cancelled = released = False
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
        signal.signal(sig, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)  # one held since the fork comes to the wake-up pipe now
    box = sandbox.Policy.from_dict(launch["sandbox"]) if launch.get("sandbox") else None
    if spare is not None and not spare.takes(launch, box):  # not in the job's network, or another sandbox
        spare.discard()
        spare = None
    trace.mark(launch.get("job_id", ""), "supervisor.spare.checked")
    if launch.get("isolation_note"):  # it runs without the sandbox its job would have had: say so
        log.system(launch["isolation_note"])
    log.system(
        f"instance {launch['instance_id']} of job {launch['job_id']} starting "
        f"(cpus {launch.get('cpus')}, memory limit {launch.get('memory_bytes')} bytes)"
    )
    env_lock: environment.Env | None = None
    if launch.get("environment"):
        try:
            env_lock = _prepare_environment(launch, log)
        except _Cancelled:
            log.system("cancel requested while the environment was being prepared")
            if spare is not None:
                spare.discard()
            return _finish(launch, log, {"exit_code": -signal.SIGTERM, "cancelled": True})
        except EnvironmentBuildError as e:
            log.system(str(e))
            launcher.write_envelope(Path(launch["result_file"]), {
                "ok": False, "exc_type": "mljobs.errors.EnvironmentBuildError", "exc_message": str(e),
                "traceback": f"mljobs.errors.EnvironmentBuildError: {e}\n", "exc_pickle": None, "exit_code": 1})
            if spare is not None:
                spare.discard()
            return _finish(launch, log, {"exit_code": 1, "cancelled": False})
    forwarder = None
    host_net = -1  # a bridged instance's proxy reaches out from the machine's network namespace
    if launch.get("netns"):  # after the install, which may need the outside network
        if box is not None and box.net == "bridge":
            host_net = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        forwarder = multinode.enter_netns(launch["netns"], launch["env"].get("MLJOBS_URL"))
    plan = containment.Plan.from_dict(launch.get("containment"))
    me = os.getpid()
    proxy = (_egress_proxy(launch, box, spare, log, host_net)
             if box is not None and box.net in ("proxy", "bridge") else None)
    if spare is not None:  # its payload process is forked, and in its cgroups
        cgroup, limit, watch = _assign_cgroup(launch, spare, log)
        pid, out_r, err_r = spare.pid, spare.out_r, spare.err_r
        if box is not None:
            trace.mark(launch.get("job_id", ""), "supervisor.spare.taken")
            spare.fill_slot(launch, box)
            trace.mark(launch.get("job_id", ""), "supervisor.slot.filled")
        spare.go(_inner_launch(launch, box) if box is not None else launch)
    else:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        cgroup, limit = _make_cgroup(launch, plan, log)
        watch = bool(limit) and (cgroup is None or cgroup.memory_dir is None)
        trace.mark(launch.get("job_id", ""), "supervisor.cgroup.made")
        boxed = _sandboxed(launch, box) if box is not None else None
        go_r, go_w = os.pipe() if boxed is not None else (None, None)
        pid = os.fork()
        if pid == 0:
            os.close(out_r), os.close(err_r)
            if go_w is not None:
                os.close(go_w)
            _child_prepare(out_w, err_w, cgroup, me, go_r, launch["run_dir"])
            if boxed is not None:
                try:
                    os.execve(boxed[0][0], boxed[0], boxed[1])
                except BaseException as e:  # noqa: BLE001
                    entry.start_failed(e)
            entry.enter(launch)
        os.close(out_w), os.close(err_w)
        if boxed is not None and go_r is not None and go_w is not None:
            os.close(go_r)
            _send_launch(go_w, boxed[2])  # bubblewrap may have failed already: its stderr says why
    trace.mark(launch.get("job_id", ""), "supervisor.forked")
    if proxy is not None:  # after the fork: the payload process gets no thread
        proxy.start()
    if forwarder is not None:  # started after the fork: the child gets no thread
        forwarder.start()
    sampler = Sampler(launch["metrics_file"], me, cgroup, limit_bytes=limit, watch_memory=watch,
                      record=bool(launch.get("metrics", True)), gpus=launch.get("gpus"), now=time.time())
    oom: dict[str, int] | None = None
    keeper = None
    if launch.get("settle_checkpoint"):  # a local instance whose job has attempts left: see runtime.checkpoint
        from mljobs.runtime import checkpoint

        copies = checkpoint.LocalFolder(Path(launch["run_dir"]) / checkpoint.SETTLED, box.uid if box else None,
                                        _REAPED)
        keeper = checkpoint.Keeper(Path(launch["work_dir"]) / CHECKPOINT_DIR, copies, "mljobs supervisor")
    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ, logformat.OUT)
    sel.register(err_r, selectors.EVENT_READ, logformat.ERR)
    sel.register(wake_r, selectors.EVENT_READ, None)
    open_streams = 2
    drain_deadline: float | None = None
    while open_streams and (drain_deadline is None or time.monotonic() < drain_deadline):
        timeout = sampler.timeout(time.time())
        if keeper is not None:
            timeout = CHECKPOINT_LOOK_S if timeout is None else min(timeout, CHECKPOINT_LOOK_S)
        if drain_deadline is not None:
            timeout = max(0.0, min(drain_deadline - time.monotonic(), timeout if timeout is not None else 1.0))
        for key, _ in sel.select(timeout):
            if key.data is None:
                sigs = os.read(wake_r, 512)
                if not cancelled and any(s in sigs for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)):
                    cancelled = True
                    log.system(f"cancel requested: stopping the process tree (grace {grace:g} s)")
                    kill_tree(os.getpid(), grace)
                elif not (cancelled or released) and signal.SIGUSR1 in sigs:
                    released = True  # a worker node whose head has finished
                    log.system("released: the job's head has finished; stopping this Ray node")
                    kill_tree(os.getpid(), grace)
                _reap()
                if pid in _REAPED and drain_deadline is None:
                    drain_deadline = time.monotonic() + 0.5
                continue
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fd)
                os.close(key.fd)
                open_streams -= 1
            else:
                log.feed(key.data, data)
        used = sampler.tick(time.time())
        if keeper is not None:
            keeper.keep(every_s=CHECKPOINT_LOOK_S)
        if used is not None and oom is None and limit:
            oom = {"used_bytes": used, "limit_bytes": limit}
            log.system(f"out of memory: the instance's processes use {used} bytes, over its limit of {limit}; "
                       "stopping them")
            _kill_now(cgroup)
    trace.mark(launch.get("job_id", ""), "supervisor.streams.closed")
    if keeper is not None:
        keeper.close()
    if pid not in _REAPED:
        try:
            _REAPED[pid] = os.waitpid(pid, 0)[1]
        except ChildProcessError:
            pass
    status = _REAPED.get(pid)
    trace.mark(launch.get("job_id", ""), "supervisor.reaped")
    leftover = descendants(os.getpid())
    if box is not None:  # bubblewrap leaves its namespace's init to us (a subreaper), exiting or a zombie
        settle = time.monotonic() + 0.1
        while leftover and time.monotonic() < settle:
            _reap()
            leftover = descendants(os.getpid())
            if leftover:
                time.sleep(0.001)
    if leftover:
        what = "this instance's Ray node" if launch.get("multinode") else "the payload left running"
        log.system(f"stopping {len(leftover)} process(es): {what}")
        kill_tree(os.getpid(), grace)
    trace.mark(launch.get("job_id", ""), "supervisor.tree.checked")
    if proxy is not None:
        proxy.close()
    emptied = False
    if cgroup is not None:  # emptied, not removed: removing waits ~10 ms; the server does it later
        oom = oom or _cgroup_oom(cgroup, sampler)
        emptied = cgroup.kill()
        if not emptied:
            log.system(f"processes are left in the instance's cgroups {cgroup.dirs}; the server kills them")
        _reap()
    trace.mark(launch.get("job_id", ""), "supervisor.cgroup.emptied")
    code = os.waitstatus_to_exitcode(status) if status is not None else None
    if box is not None and code is not None and 128 < code < 128 + signal.NSIG:
        code = 128 - code  # bubblewrap exits 128 + N for a payload killed by signal N: say the signal
    if box is not None:
        _sandbox_result(launch, log, code)
    trace.mark(launch.get("job_id", ""), "supervisor.sandbox.done")
    if env_lock is not None:
        env_lock.release()
    record = {"exit_code": 0 if released else code, "cancelled": cancelled, "released": released,
              "usage": sampler.finish(), "emptied": emptied, "isolation": box.describe() if box else "none"}
    if oom is not None and not cancelled:
        record["oom"] = oom
    record = _finish(launch, log, record)
    if spare is not None:  # after the exit record: the job does not wait for it
        spare.remove_slot()
    return record


def _egress_proxy(launch: dict[str, Any], box: sandbox.Policy, spare: Spare | None,
                  log: _LogWriter, host_net: int = -1) -> egress.Proxy:
    """The instance's way out (its socket in the folder bound at the sandbox's ``job/net``). A
    bridged instance (``host_net``: the machine's network namespace, which the proxy's thread
    enters) reaches the control plane by its namespace's own forwarder, not through the proxy."""
    net = spare.slot / "net" if spare is not None and spare.slot is not None else Path(launch["run_dir"]) / "net"
    net.mkdir(exist_ok=True)
    if box.net == "bridge":
        def leave_namespace() -> None:
            try:
                multinode.setns(host_net, "the machine's network namespace")
            finally:
                os.close(host_net)

        return egress.Proxy(str(net / egress.SOCKET), list(box.allowed), "", log.system, in_thread=leave_namespace)
    return egress.Proxy(str(net / egress.SOCKET), list(box.allowed), launch["env"].get("MLJOBS_URL", ""), log.system)


def _sandboxed(launch: dict[str, Any], box: sandbox.Policy) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """A cold sandbox's command line, environment and launch record."""
    run_dir, work = Path(launch["run_dir"]), Path(launch["work_dir"])
    out = run_dir / "out"
    out.mkdir(exist_ok=True)
    sandbox.own_for(box, work, out)
    app = launch["app_dir"] if launch["app_dir"] != launch["work_dir"] else None
    passwd = run_dir / "passwd" if box.mode == "shared" else None
    if passwd is not None:
        sandbox.write_passwd(passwd, box)
    argv = sandbox.payload_argv(box, work=str(work), app=app, out=str(out), gpus=launch.get("gpus"),
                                net=str(run_dir / "net"), passwd=str(passwd) if passwd is not None else None)
    return argv, sandbox.payload_env(box, {}), _inner_launch(launch, box)


def _inner_launch(launch: dict[str, Any], box: sandbox.Policy) -> dict[str, Any]:
    """The launch record a sandboxed payload gets: its paths as it sees them (its folders under
    MLJOBS_HOME/job), the uid to take; the job's variables are applied inside."""
    into = sandbox.inside(box.home)
    app = into["app"] if launch["app_dir"] != launch["work_dir"] else into["work"]
    env = launch["env"]
    if box.uid is not None:  # a uid the system's user database does not know: say who it is
        env = {"USER": box.user or "mljobs", "LOGNAME": box.user or "mljobs", **env}
    net: dict[str, Any] = {}
    if box.net == "proxy":  # out only through the supervisor's proxy, which the forwarder inside reaches
        url = env.get("MLJOBS_URL", "")
        env = {**env, **egress.job_env(url)}
        net = {"egress_sock": os.path.join(into["net"], egress.SOCKET), "egress_url": url}
    elif box.net == "bridge":  # its peers directly (Ray's gRPC reads these too), the rest through the proxy;
        # the control plane by the namespace's own forwarder, on this loopback already
        env = {**env, **egress.job_env(""), **_peers_bypass(launch, "")}
        net = {"egress_sock": os.path.join(into["net"], egress.SOCKET), "egress_url": ""}
    elif launch.get("multinode") and any(os.environ.get(k) for k in sandbox.PROXY_VARS if "no_" not in k.lower()):
        # a personal job keeps the person's proxy: never for its Ray's traffic to its peers
        env = {**env, **_peers_bypass(launch, os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "")}
    return {**launch, "env": env, "work_dir": into["work"], "app_dir": app, "run_dir": into["out"], "log_file": None,
            "result_file": os.path.join(into["out"], "result.pkl"), "uid": box.uid, "sandboxed": True,
            "title": launch["run_dir"], **net}  # `ps` names the instance by its run dir outside


def _peers_bypass(launch: dict[str, Any], no_proxy: str) -> dict[str, str]:
    """NO_PROXY for a multi-node instance: ``no_proxy``, the loopback and the job's nodes (each
    address, and their /24, the job's bridge, for those that read CIDR: gRPC, curl, requests)."""
    addresses = (launch.get("multinode") or {}).get("addresses", [])
    nets = sorted({a.rsplit(".", 1)[0] + ".0/24" for a in addresses if a.count(".") == 3 and not a.startswith("127.")})
    entries = [e for e in no_proxy.split(",") if e.strip()]
    for e in ["127.0.0.1", "localhost", "::1", *addresses, *nets]:
        if e not in entries:
            entries.append(e)
    value = ",".join(entries)
    return {"NO_PROXY": value, "no_proxy": value}


def _sandbox_result(launch: dict[str, Any], log: _LogWriter, code: int | None) -> None:
    """After a sandboxed payload: its result to where the server reads it; a sandbox that never
    started (bubblewrap said why on stderr) becomes the job's error, naming the cause and the fix."""
    run_dir = Path(launch["run_dir"])
    for name in ("result.pkl", "error.json"):  # the envelope, and a failure's summary beside it
        why = sandbox.take_result(run_dir / "out", run_dir / name)
        if why:
            log.system(why)
    if code in (None, 0) or (run_dir / "result.pkl").exists() or not log.bwrap_error:
        return
    msg = (f"the job's sandbox could not start: {log.bwrap_error}. Check that what it names exists and that "
           "bubblewrap can run here (`bwrap --ro-bind / / true`), or run the server without isolation "
           "(`mljobs server start --no-isolation`, MLJOBS_ISOLATION=none)")
    log.system(msg)
    launcher.write_envelope(run_dir / "result.pkl", {
        "ok": False, "exc_type": "mljobs.errors.SandboxError", "exc_message": msg,
        "traceback": f"mljobs.errors.SandboxError: {msg}\n", "exc_pickle": None, "exit_code": code})


def _make_cgroup(launch: dict[str, Any], plan: containment.Plan,
                 log: _LogWriter) -> tuple[containment.InstanceCgroup | None, int | None]:
    """The instance's cgroups with its memory limit (None where the machine has none)."""
    limit = launch.get("memory_bytes")
    if plan.kind == "fallback" and plan.memory == "rss":
        return None, limit
    cgroup = containment.InstanceCgroup(plan, launch["job_id"], launch["instance_id"])
    try:
        cgroup.create(limit)
    except OSError as e:
        log.system(f"could not make the instance's cgroups ({e}); the server sweeps its processes by marker")
        cgroup.remove()
        return None, limit
    return cgroup, limit


def _assign_cgroup(launch: dict[str, Any], spare: Spare,
                   log: _LogWriter) -> tuple[containment.InstanceCgroup | None, int | None, bool]:
    """Make a spare's cgroups the instance's: its run dir names them (before the payload runs,
    so the server can always find them), and they get the instance's memory limit. The flag:
    whether the supervisor must watch resident memory itself (no memory cgroup limits it)."""
    limit = launch.get("memory_bytes")
    cgroup = spare.cgroup
    if cgroup is None:
        return None, limit, bool(limit)
    path = Path(launch["run_dir"]) / CGROUP_FILE
    path.with_name(CGROUP_FILE + ".tmp").write_text(spare.name)
    os.replace(path.with_name(CGROUP_FILE + ".tmp"), path)
    try:
        cgroup.set_memory_limit(limit)
    except OSError as e:
        log.system(f"could not set the memory limit on the instance's cgroups ({e}); the supervisor watches "
                   "resident memory instead")
        return cgroup, limit, bool(limit)
    return cgroup, limit, bool(limit) and cgroup.memory_dir is None


def _kill_now(cgroup: containment.InstanceCgroup | None) -> None:
    """SIGKILL the whole tree at once (memory is the emergency: no grace period)."""
    if cgroup is not None and cgroup.kill_dir:
        cgroup.kill()
    _signal_all(descendants(os.getpid()), signal.SIGKILL)


def _cgroup_oom(cgroup: containment.InstanceCgroup, sampler: Sampler) -> dict[str, int] | None:
    """The kernel's OOM kill inside the instance's memory cgroup, if there was one."""
    state = cgroup.memory_state()
    if not state.get("oom_kills"):
        return None
    return {"used_bytes": max(state["peak_bytes"], sampler.peak), "limit_bytes": state["limit_bytes"]}


def _finish(launch: dict[str, Any], log: _LogWriter, record: dict[str, Any]) -> dict[str, Any]:
    run_dir = Path(launch["run_dir"])
    record = {**record, "ended": logformat.now_iso(), "has_result": (run_dir / "result.pkl").exists()}
    log.system(f"instance {launch['instance_id']} exited with code {record['exit_code']}"
               + (" (cancelled)" if record["cancelled"] else ""))
    log.close()
    _write_exit(run_dir / "exit.json", record)
    trace.mark(launch.get("job_id", ""), "supervisor.exit.written")
    return record


class _Cancelled(BaseException):
    pass


def _raise_cancelled(*_: Any) -> None:
    raise _Cancelled()


def _prepare_environment(launch: dict[str, Any], log: _LogWriter) -> environment.Env:
    """Build or reuse the job's environment (a cancel interrupts it); point the launch at it."""
    spec = launch["environment"]
    req = environment.EnvRequest(**spec["request"])
    cache = environment.EnvCache(spec["cache_dir"], int(spec["max_bytes"]))
    old = {sig: signal.signal(sig, _raise_cancelled) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    box = sandbox.Policy.from_dict(launch["sandbox"]) if launch.get("sandbox") else None
    build = None
    if box is not None and box.mode == "shared":
        if box.uid is not None:  # the owner's own environment, built as their uid
            req = dataclasses.replace(req, uid=box.uid)
        build = _BuildSandbox(box, req, cache.root, Path(launch["run_dir"]), log)
    try:
        env = cache.ensure(req, lambda text: log.feed(logformat.SYS, (text + "\n").encode()),
                           float(spec["timeout_s"]), build.wrap if build is not None else None)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if build is not None:
            build.close()
    log.system(f"environment {env.key} " + ("reused from the cache" if env.cached else "built")
               + f" in {env.seconds:.2f} s")
    launch["python"] = env.python
    return env


class _BuildSandbox:
    """How a shared job's environment is built (sandbox.build_argv): a package's build code sees
    neither the server's state nor its variables, runs as the job's uid (where it has one), writes
    only the environment being built and its owner's own uv cache, and (``build_net == "proxy"``)
    reaches only the hosts the job's integrations and the server's own index settings name, through
    a proxy started at the first step. The index folders on this machine (``find-links`` or
    ``file://`` indexes of the server's settings) are readable. Made at the first step: a job whose
    environment is cached pays nothing for it."""

    def __init__(self, box: sandbox.Policy, req: environment.EnvRequest, cache_root: Path, run_dir: Path,
                 log: _LogWriter) -> None:
        self.box, self.req, self.cache_root, self.run_dir, self.log = box, req, cache_root, run_dir, log
        self.policy: sandbox.Policy | None = None
        self.uv_cache, self.uv_cache_fd = "", -1
        self.net = run_dir / "build-net"  # the build proxy's socket folder (build_net "proxy")
        self.proxy: egress.Proxy | None = None
        self.config_env: dict[str, str] = {}  # where the build's uv finds the server's uv configuration
        self.hidden: list[str] = []  # configuration files it would see and cannot read: read as empty
        self.unset: set[str] = set()  # the server's variables the build must not get (a file it cannot read)

    def _prepare(self) -> sandbox.Policy:
        box = self.box
        self.uv_cache, self.uv_cache_fd = user_uv_cache(self.cache_root, box)
        uv = environment.uv_binary()
        # the index folders are the server's own settings, never a job's variables (a job naming "/"
        # or "/proc" would have them bound); and never / itself, the kernel's folders or MLJOBS_HOME
        home = os.path.realpath(box.home)
        refused = ("/proc", "/sys", "/dev", home)

        def allowed(path: str) -> bool:  # judged by where it leads; bound by its name (uv is given the name)
            real = os.path.realpath(path)
            return os.path.isdir(real) and real != "/" and not home.startswith(real.rstrip("/") + "/") and not any(
                real == r or real.startswith(r.rstrip("/") + "/") for r in refused)

        urls = environment.server_index_urls()
        local = {os.path.normpath(v.removeprefix("file://")) for v in urls if v.startswith(("/", "file:///"))}
        extra = tuple((p, False) for p in sorted(local) if allowed(p))
        extra += ((os.path.dirname(os.path.realpath(uv)), False),)  # uv itself, wherever it is installed
        # the server's uv configuration files, read where the build's uv looks for them (its HOME is
        # its own): the indexes they name are the server's, which its proxy lets through. One the
        # build cannot use is left out as a whole: not named to it, and where the build would see it
        # anyway (under /etc), read as empty (uv fails on a system file it cannot read)
        for kind, path in environment.uv_config_files():
            why = None
            if not allowed(os.path.dirname(path)):
                why = "lies where no sandbox may look"
            elif box.uid is not None and not os.stat(path).st_mode & 0o004:
                why = f"is not readable by the job's uid (to share it: chmod a+r {path})"
            if why is not None:
                self.log.system(f"the server's uv configuration {path} {why}, so this build does not use it "
                                "(its indexes included)")
                if kind == "file":
                    self.unset.add("UV_CONFIG_FILE")  # uv would fail on a file it cannot read
                if path.startswith("/etc/"):
                    self.hidden.append(path)
                continue
            if kind == "user":
                self.config_env["XDG_CONFIG_HOME"] = os.path.dirname(os.path.dirname(path))
            elif kind == "system" and path not in ("/etc/xdg/uv/uv.toml", "/etc/uv/uv.toml"):  # else seen as it is
                self.config_env["XDG_CONFIG_DIRS"] = os.path.dirname(os.path.dirname(path))
            extra += ((path, False),)
        policy = dataclasses.replace(box, mounts=box.mounts + extra)
        if policy.build_net == "proxy":
            self.net.mkdir(exist_ok=True)
            hosts = [*policy.allowed, *egress.with_addresses(environment.server_index_hosts(urls=urls))]
            self.proxy = egress.Proxy(str(self.net / sandbox.BUILD_SOCKET), hosts, "",
                                      lambda text: self.log.system(text + " (environment build)"))
            self.proxy.start()
        return policy

    def wrap(self, cmd: list[str], env: dict[str, str], build_dir: str) -> tuple[list[str], dict[str, str]]:
        if self.policy is None:
            try:
                self.policy = self._prepare()
            except (OSError, ValueError) as e:  # the job's build cannot be made: its error, not a lost instance
                raise EnvironmentBuildError(f"the environment's build sandbox could not be made: {e}") from e
        net = str(self.net) if self.proxy is not None else None
        argv = sandbox.build_argv(self.policy, build_dir=build_dir, caches=[self.uv_cache], python=self.req.python,
                                  net=net, hidden=self.hidden)
        out = {**sandbox.build_env(env, self.uv_cache), **self.config_env}
        return argv + cmd, {k: v for k, v in out.items() if k not in self.unset}

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close(wait_s=5.0)  # its threads end before the supervisor forks the payload
            shutil.rmtree(self.net, ignore_errors=True)
        if self.uv_cache_fd >= 0:
            os.close(self.uv_cache_fd)
            self.uv_cache_fd = -1


def user_uv_cache(cache_root: Path, box: sandbox.Policy) -> tuple[str, int]:
    """The uv cache a shared job's build writes: its owner's own, beside the environment cache
    (under no folder a job sees), so that one user's build cannot plant a wheel that another
    user's build installs. On a root server it is the owner uid's, and no other uid may enter it.
    With the descriptor that holds it for the build (:func:`mljobs.runtime.environment.hold_user_cache`:
    an idle one is pruned)."""
    top = environment.user_caches(cache_root)
    top.mkdir(mode=0o711, parents=True, exist_ok=True)
    # by uid; else by the user's name, hex-encoded (a name is the users table's: "..", "a/b")
    name = str(box.uid) if box.uid is not None else "user-" + (box.user or "").encode().hex()
    path = top / name
    fd = environment.hold_user_cache(path)  # made under its lock
    try:
        if box.uid is not None and path.stat().st_uid != box.uid:
            os.chown(path, box.uid, box.uid)
    except BaseException:
        os.close(fd)
        raise
    return str(path), fd


def main(argv: list[str] | None = None, spare: Spare | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = Path(argv[0])
    setproctitle.setproctitle(f"mljobs-supervisor {run_dir}")  # `ps` names the instance
    with open(run_dir / "launch.json") as f:
        launch = json.load(f)
    supervise(launch, spare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
