"""The local provider: every instance is a supervised process tree on this machine.

Each instance gets a slice of the machine: its family's CPU count as a CPU affinity set (and
thread-count variables), its memory as a limit on resident memory (a memory cgroup, else the
supervisor's watch), and its GPUs via CUDA_VISIBLE_DEVICES. Its processes are contained as
:mod:`mljobs.runtime.containment` describes; :meth:`LocalProvider.finish_job` kills whatever of a
job is left before the server marks it ended. The supervisor runs in a new process session; the server notices its exit through a pidfd, so no
polling sits on the hot path, and finds it again after a restart from its pid and start time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import selectors
import shutil
import socket
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from mljobs import logformat, trace
from mljobs.config import Settings
from mljobs.errors import InvalidArgumentError
from mljobs.paths import CGROUP_FILE, CHECKPOINT_DIR, HomePaths, InstancePaths, StagePaths
from mljobs.providers import netns
from mljobs.runtime import checkpoint, containment, multinode, sandbox
from mljobs.runtime.metrics import read_samples
from mljobs.providers.base import (ExitCallback, InstanceExit, InstanceHandle, InstanceLaunch, Provider,
                                   launch_document)
from mljobs.spec import PayloadKind, PoolSpec

log = logging.getLogger("mljobs.server")

__all__ = ["LocalProvider", "detect_gpus", "read_log_tail", "free_ports", "ray_temp_dir"]


def detect_gpus() -> int:
    """NVIDIA GPUs on this machine (0 when nvidia-smi is missing or fails)."""
    if os.environ.get("MLJOBS_LOCAL_GPUS"):
        return int(os.environ["MLJOBS_LOCAL_GPUS"])
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def ray_temp_dir(run_dir: Path) -> str:
    """A short per-instance folder for Ray (its socket paths must stay under 107 characters)."""
    return os.path.join("/tmp", "mljr-" + hashlib.sha1(str(run_dir).encode()).hexdigest()[:12])


def _text_tail(path: os.PathLike[str] | str, lines: int) -> list[str]:
    """The last ``lines`` lines of a plain text file (empty when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return [line for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()][-lines:]
    except OSError:
        return []


def read_log_tail(path: os.PathLike[str] | str, lines: int = 10, *, verbose: bool = False) -> list[str]:
    """The last ``lines`` rendered lines of a log file, reading only its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            block, data = 8192, b""
            while size > 0 and data.count(b"\n") <= lines * 4 + 1:
                step = min(block, size)
                size -= step
                f.seek(size)
                data = f.read(step) + data
                block *= 2
    except FileNotFoundError:
        return []
    out = []
    for raw in data.decode("utf-8", "backslashreplace").splitlines():
        text = logformat.render(logformat.parse_record(raw), verbose)
        if text is not None:
            out.append(text)
    return out[-lines:]


class _ExitWatcher:
    """One thread that waits on the pidfds of every watched supervisor."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mljobs-exit-watcher", daemon=True)
        self._thread.start()

    def add(self, pid: int, callback: Any) -> bool:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        with self._lock:
            self._sel.register(fd, selectors.EVENT_READ, callback)
        os.write(self._wake_w, b"x")
        return True

    def _run(self) -> None:
        while not self._closed:
            for key, _ in self._sel.select():
                if key.data is None:
                    os.read(self._wake_r, 4096)
                    continue
                with self._lock:
                    self._sel.unregister(key.fd)
                os.close(key.fd)
                try:
                    key.data()
                except Exception:  # noqa: BLE001 - one bad callback must not stop the watcher
                    logging.getLogger("mljobs.server").exception("exit callback failed")

    def close(self) -> None:
        self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)


class _Spawner:
    """The provider's side of :mod:`mljobs.runtime.spawner`: start it lazily, ask it for forks."""

    def __init__(self, home: HomePaths, plan: containment.Plan, spares: int) -> None:
        self._home = home
        self._plan, self._spares = plan, spares
        self._box: dict[str, Any] | None = None  # the sandbox template of the latest instance
        self._stderr_path = str(home.root / "spawner.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        with open(self._stderr_path, "ab") as err:
            proc = subprocess.Popen([sys.executable, "-m", "mljobs.runtime.spawner", str(self._home.root)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err, start_new_session=True, close_fds=True)
        assert proc.stdout is not None and proc.stdin is not None
        try:
            # sent as the first line, not as arguments: a supervisor's title replaces the spawner's
            # argv in place, and `ps` shows it whole only when it is longer than that argv was
            proc.stdin.write(json.dumps({"plan": self._plan.to_dict(), "spares": self._spares,
                                         "box": self._box}).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            pass  # it exited: said below
        if proc.stdout.readline() != b"ready\n":
            proc.kill()
            proc.wait()
            raise OSError(f"the supervisor spawner did not start; see {self._stderr_path}")
        self._proc = proc
        return proc

    @property
    def pid(self) -> int | None:
        """The running spawner's pid (None before the first instance starts it)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def spawn(self, run_dir: str, stderr_path: str, cold: bool = False, box: dict[str, Any] | None = None) -> int:
        """The pid of the supervisor of ``run_dir``: a warm one, or (``cold``, or none ready) a new
        fork (one retry with a fresh spawner). ``box``: the sandbox template spares are made in
        from now on (:meth:`mljobs.runtime.sandbox.Policy.template`)."""
        with self._lock:
            self._box = box
            for attempt in (1, 2):
                proc = self._ensure()
                assert proc.stdin is not None and proc.stdout is not None
                try:
                    proc.stdin.write(json.dumps({"run_dir": run_dir, "stderr": stderr_path, "cold": cold,
                                                 "box": box}).encode() + b"\n")
                    proc.stdin.flush()
                    reply = proc.stdout.readline().decode().strip()
                except OSError:
                    reply = ""
                if reply.isdigit():
                    return int(reply)
                if reply.startswith("error") or attempt == 2:
                    raise OSError(f"the supervisor spawner failed: {reply or 'it exited'}")
                proc.kill()
                proc.wait()
            raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None


class _Tidier:
    """One thread that removes what ended instances leave (cgroups, folders), in order, off the
    path of every job's result; :meth:`close` waits until all of it is done."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mljobs-tidier", daemon=True)
        self._thread.start()

    def put(self, task: Callable[[], Any]) -> None:
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._queue.put(task)

    def _run(self) -> None:
        while (task := self._queue.get()) is not None:
            try:
                task()
            except Exception:  # noqa: BLE001 - one failure must not stop the rest
                log.exception("cleaning up after an instance failed")
            with self._lock:
                self._pending -= 1
                if not self._pending:
                    self._idle.set()

    def wait(self, timeout: float = 60.0) -> None:
        """Until everything queued so far is done."""
        self._idle.wait(timeout)

    def close(self) -> None:
        self.wait()
        self._queue.put(None)
        self._thread.join(timeout=5)


def _spare_alive(name: str) -> bool:
    """Whether the warm supervisor that made the cgroups or slot ``spare-<spawner>-<supervisor>-<random>``
    is still running (a name of another form: assume so)."""
    parts = name[len(containment.SPARE_PREFIX):].split("-")
    return not (len(parts) == 3 and parts[1].isdigit()) or psutil.pid_exists(int(parts[1]))


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` right now (held open together, so never the same twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# Ray's per-node listening ports that default to fixed numbers or could collide when several
# nodes share one address; each gets a port of its own in loopback mode.
_NODE_PORT_OPTIONS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                      "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")


class LocalProvider(Provider):
    name = "local"
    supports_gpus = True
    supports_multinode = True

    def __init__(self, home: HomePaths, settings: Settings | None = None) -> None:
        self.home = home
        node_network = settings.node_network if settings else "auto"
        reason = netns.unavailable_reason()
        if node_network not in ("auto", "netns", "loopback"):
            raise InvalidArgumentError(f"node_network must be auto, netns or loopback, got {node_network!r}")
        if node_network == "netns" and reason:
            raise InvalidArgumentError(f"node_network=netns: cannot make network namespaces ({reason})")
        # Instances of a multi-node job as separate hosts (own namespaces) or on shared loopback.
        self.use_netns = node_network == "netns" or (node_network == "auto" and reason is None)
        self._networks: dict[str, dict[str, Any]] = {}
        self._net_lock = threading.Lock()
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
            range(os.cpu_count() or 1))
        self.gpus = detect_gpus()
        self.plan = containment.detect(home.root, settings.containment if settings else "auto")
        self._metrics = settings.metrics if settings else True
        self._watcher = _ExitWatcher()
        self._spawner = _Spawner(home, self.plan, settings.warm_supervisors if settings else 2)
        self._tidier = _Tidier()

    # -- pools -------------------------------------------------------------------------------
    def validate_pool(self, pool: PoolSpec) -> None:
        try:
            sandbox.parse_mounts(pool.provider_options.get("mounts"), pool.name)
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from None
        fam = pool.family
        if fam.gpus and fam.gpus * pool.max_nodes > self.gpus:
            raise InvalidArgumentError(
                f"compute pool {pool.name}: {pool.max_nodes} x {fam.name} needs "
                f"{fam.gpus * pool.max_nodes} GPU(s) but this machine has {self.gpus}; "
                "lower max_nodes or choose a CPU family"
            )

    # -- instances ---------------------------------------------------------------------------
    def _slice(self, launch: InstanceLaunch) -> tuple[list[int], list[int]]:
        n = len(self.cpus)
        want = min(launch.family.cpus, n)
        start = (launch.slot * want) % n
        cpus = sorted({self.cpus[(start + k) % n] for k in range(want)})
        g = launch.family.gpus
        gpus = list(range(launch.slot * g, launch.slot * g + g)) if g else []
        return cpus, gpus

    def paths(self, handle_or_launch: InstanceHandle | InstanceLaunch) -> InstancePaths:
        return self.home.instance(handle_or_launch.job_id, handle_or_launch.instance_id)

    # -- multi-node: the job's network and each instance's Ray settings ----------------------
    def _network_file(self, job_id: str) -> Path:
        return self.home.job_run(job_id) / "network.json"

    def _network(self, launch: InstanceLaunch) -> dict[str, Any]:
        """The job's addresses and ports: made when its first instance starts, extended for late
        instances, and read back from ``network.json`` after a server restart."""
        with self._net_lock:
            net = self._networks.get(launch.job_id)
            path = self._network_file(launch.job_id)
            if net is None and path.exists():
                net = json.loads(path.read_text())
            if net is None:
                net = {"netns": self.use_netns, "addresses": [], "node_ports": [], "started_at": time.time()}
                if self.use_netns:  # every node its own host: Ray's default ports on every address
                    net.update(multinode.DEFAULT_PORTS)
                else:  # shared loopback: every listening port distinct
                    net.update(zip(("gcs_port", "dashboard_port", "client_port", "rendezvous_port"), free_ports(4)))
            have, want = len(net["addresses"]), max(launch.instance_count, launch.instance_id + 1)
            if want > have:
                if net["netns"]:
                    made = netns.create(launch.job_id, want) if have == 0 else netns.add(launch.job_id, range(have, want))
                    net["addresses"] += made
                    net["node_ports"] += [{} for _ in range(have, want)]
                else:
                    ports = free_ports((want - have) * len(_NODE_PORT_OPTIONS))
                    net["addresses"] += ["127.0.0.1"] * (want - have)
                    net["node_ports"] += [dict(zip(_NODE_PORT_OPTIONS, ports[j * len(_NODE_PORT_OPTIONS):]))
                                          for j in range(want - have)]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(net))
            self._networks[launch.job_id] = net
            return net

    def _multinode(self, launch: InstanceLaunch, p: InstancePaths) -> tuple[dict[str, Any], dict[str, str], str | None]:
        """This instance's part of a multi-node job: its ``multinode`` launch entry, its
        environment variables (ranks and addresses) and its network namespace."""
        net = self._network(launch)
        spec, i, k = launch.spec, launch.instance_id, launch.instance_count
        mn = {"count": k, "min_instances": min(spec.effective_min_instances, k), "parallel": spec.parallel,
              "join_timeout_s": spec.join_timeout_s, "started_at": net["started_at"],
              "addresses": net["addresses"], "gcs_port": net["gcs_port"], "dashboard_port": net["dashboard_port"],
              "client_port": net["client_port"], "rendezvous_port": net["rendezvous_port"], "ports": net["node_ports"][i],
              "temp_dir": ray_temp_dir(p.run_dir), "cpus": launch.family.cpus, "gpus": launch.family.gpus,
              "memory_bytes": launch.family.memory_bytes}
        env = multinode.node_env(mn, i)
        return mn, env, netns.namespace(launch.job_id, i) if net["netns"] else None

    def start(self, launch: InstanceLaunch) -> InstanceHandle:
        p = self.paths(launch)
        for d in (p.run_dir, p.work_dir, p.log_file.parent):
            d.mkdir(parents=True, exist_ok=True)
        app_prefix = f"{launch.job_id}/app/"
        # A function's payload (its pickle and any imports) is only read: on a local stage the
        # launcher reads it in place. Files and folders are copied, since a script may change them.
        app_dir = launch.stage.local_path(app_prefix) if launch.spec.payload_kind == PayloadKind.FUNCTION else None
        if app_dir is None:
            launch.stage.download_dir(app_prefix, p.work_dir)
        if launch.attempt > 1:  # what the last attempt left in its checkpoint folder
            checkpoint.StageFolder(launch.stage, StagePaths(launch.job_id).checkpoint(launch.instance_id)).restore(
                p.work_dir / CHECKPOINT_DIR)
        trace.mark(launch.job_id, "provider.workdir.ready")
        cpus, gpus = self._slice(launch)
        env = {var: str(len(cpus)) for var in containment.THREAD_VARS}
        if launch.family.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        multinode, ns = None, None
        if launch.spec.target_instances > 1:
            multinode, mn_env, ns = self._multinode(launch, p)
            env.update(mn_env)
        box = launch.sandbox
        policy = sandbox.Policy.from_dict(box) if box else None
        template = policy.template().to_dict() if policy is not None else None
        # a multi-node instance's sandbox keeps its network (the server gives it net "open"): its own
        # namespace on the job's bridge (the other instances and, through the forwarder, the control
        # plane), where what its integrations allow is reached through its supervisor's proxy, or,
        # without namespaces, the host's loopback, where egress is open
        note = (sandbox.MULTINODE_OPEN_EGRESS if box is not None and box["mode"] == "shared" and multinode is not None
                and ns is None else None)
        if policy is not None and ns is not None and policy.filtered():
            policy = dataclasses.replace(policy, net="bridge")
            box = policy.to_dict()
        doc = launch_document(
            launch, env, run_dir=str(p.run_dir), work_dir=str(p.work_dir), app_dir=app_dir or str(p.work_dir),
            log_file=str(p.log_file), result_file=str(p.result), cpus=cpus,
            python=launch.spec.runtime_python or sys.executable, multinode=multinode, netns=ns,
            containment=self.plan.to_dict(), metrics_file=str(p.metrics_file), metrics=self._metrics, gpus=gpus,
            sandbox=box, isolation=policy.describe() if policy is not None else "none",
            isolation_note=note, settle_checkpoint=launch.attempt <= launch.spec.max_retries)
        p.launch.write_text(json.dumps(doc))
        trace.mark(launch.job_id, "provider.launch.written")
        pid = self._spawner.spawn(str(p.run_dir), str(p.supervisor_log), cold=ns is not None, box=template)
        trace.mark(launch.job_id, "provider.spawned")
        found = self.find(launch.job_id, launch.instance_id)  # the spawner wrote the pid file before answering
        started = found.pid_start if found is not None and found.pid == pid else None
        return InstanceHandle(launch.job_id, launch.instance_id, pid, started,
                              {"cpus": cpus, "gpus": gpus, "isolation": doc["isolation"]})

    def find(self, job_id: str, instance_id: int) -> InstanceHandle | None:
        """From the pid file, which the spawner writes before it answers; without one, an exit
        record still makes the instance found (pid None: :meth:`poll` reads how it ended)."""
        p = self.home.instance(job_id, instance_id)
        try:
            launch = json.loads(p.launch.read_text())
        except (FileNotFoundError, ValueError):
            return None
        try:
            pid_text, started_text = p.pid_file.read_text().split()
            pid: int | None = int(pid_text)
            started = None if started_text == "None" else float(started_text)
        except (FileNotFoundError, ValueError):
            if not p.exit_file.exists():
                return None  # never started
            pid = started = None
        gpus = [int(g) for g in launch["env"].get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
        return InstanceHandle(job_id, instance_id, pid, started, {"cpus": launch["cpus"], "gpus": gpus,
                                                                  "isolation": launch.get("isolation", "none")})

    def never_started(self, job_id: str, instance_id: int) -> bool:
        """No supervisor was ever spawned for it: the spawner writes the pid file before it
        answers (and finishes a request whose server died), and a supervisor's end leaves an exit
        record."""
        p = self.home.instance(job_id, instance_id)
        return not (p.pid_file.exists() or p.exit_file.exists())

    def _running(self, handle: InstanceHandle) -> bool:
        if handle.pid is None:
            return False
        try:
            ps = psutil.Process(handle.pid)
            return ps.status() != psutil.STATUS_ZOMBIE and (
                handle.pid_start is None or abs(ps.create_time() - handle.pid_start) < 0.01)
        except psutil.NoSuchProcess:
            return False

    def watch(self, handle: InstanceHandle, on_exit: ExitCallback) -> bool:
        if handle.pid is None or not self._running(handle):
            return False

        return self._watcher.add(handle.pid, lambda: on_exit(handle))

    def poll(self, handle: InstanceHandle) -> InstanceExit | None:
        if self._running(handle):
            return None
        p = self.paths(handle)
        try:
            record = json.loads(p.exit_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            # the supervisor's own stderr says why it ended without its record (its run dir goes
            # with the job, so what it said is kept in the job's message)
            said = [f"mljobs: supervisor: {line}" for line in _text_tail(p.supervisor_log, 10)]
            return InstanceExit(exit_code=None, lost=True, log_tail=read_log_tail(p.log_file, 10) + said)
        try:
            error = json.loads(p.error.read_text())
        except FileNotFoundError:
            error = None
        try:
            result: bytes | None = p.result.read_bytes()
        except FileNotFoundError:
            result = None
        code = record.get("exit_code")
        tail = read_log_tail(p.log_file, 10) if code != 0 or error is not None else []  # for the job's message
        return InstanceExit(code, bool(record.get("cancelled")), False, error, result, tail,
                            bool(record.get("released")), record.get("oom"), record.get("usage"),
                            record.get("isolation"))

    def metrics(self, handle: InstanceHandle) -> list[dict[str, Any]]:
        return read_samples(self.paths(handle).metrics_file)

    def containment(self) -> str:
        return self.plan.describe()

    def ray_info(self, handle: InstanceHandle) -> dict[str, Any] | None:
        p = self.paths(handle)
        for f in (p.ray_file, p.run_dir / "out" / p.ray_file.name):  # a sandboxed head writes it in its out folder
            try:
                info = json.loads(f.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            return info if isinstance(info, dict) else None
        return None

    def release(self, handle: InstanceHandle, grace_period_s: float) -> None:
        if self._running(handle) and handle.pid is not None:
            try:
                os.kill(handle.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def cancel(self, handle: InstanceHandle, grace_period_s: float) -> None:
        if not self._running(handle) or handle.pid is None:
            return
        pid = handle.pid
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def force() -> None:  # the supervisor did not finish its own cleanup in time
            if not self._running(handle):
                return
            try:
                tree = psutil.Process(pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            for proc in [*tree]:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        t = threading.Timer(grace_period_s + 5.0, force)
        t.daemon = True
        t.start()

    def cleanup(self, handle: InstanceHandle, now: bool = False) -> None:
        """Remove the instance's folders, in the background (after any cgroups queued before)
        unless ``now``."""
        p = self.paths(handle)

        def remove() -> None:
            for d in (p.work_dir, ray_temp_dir(p.run_dir), p.run_dir):
                shutil.rmtree(d, ignore_errors=True)

        remove() if now else self._tidier.put(remove)

    def checkpoint_dir(self, handle: InstanceHandle, lost: bool = False) -> str | None:
        p = self.paths(handle)
        settled = checkpoint.LocalFolder.kept(p.run_dir / checkpoint.SETTLED)  # what its supervisor kept as it settled
        if lost and settled is not None:  # the folder may hold a file it was writing when it was lost
            return str(settled)
        return str(p.work_dir / CHECKPOINT_DIR)

    def _spare_owners(self, job_id: str | None = None) -> dict[str, str]:
        """Cgroups a warm supervisor made ahead, by name, and the job whose instance took them (as
        the instances' run dirs name them; only ``job_id``'s when given)."""
        runs = [self.home.job_run(job_id)] if job_id else [d for d in self.home.runs.glob("*") if d.is_dir()]
        out: dict[str, str] = {}
        for run in runs:
            for f in run.glob(f"*/{CGROUP_FILE}"):
                try:
                    out[f.read_text().strip()] = run.name
                except OSError:
                    pass
        return out

    def _cgroups_of(self, job_id: str | None = None) -> dict[str, list[containment.InstanceCgroup]]:
        """This server's instance cgroups that still exist, by job (only ``job_id``'s when given);
        warm supervisors' ``spare-*`` cgroups that no instance took come under the job ``""``."""
        out: dict[str, list[containment.InstanceCgroup]] = {}
        owners: dict[str, str] | None = None
        for names in self._cgroup_names():
            for name in names:
                if name.startswith(containment.SPARE_PREFIX):
                    if owners is None:
                        owners = self._spare_owners(job_id)
                    job = owners.get(name, "")
                    if job_id is not None and job != job_id:
                        continue
                    cg = containment.InstanceCgroup(self.plan, name=name)
                else:
                    job, _, inst = name.rpartition(".")
                    if not (job and inst.isdigit() and (job_id is None or job == job_id)):
                        continue
                    cg = containment.InstanceCgroup(self.plan, job, inst)
                if all(c.dirs != cg.dirs for c in out.get(job, [])):
                    out.setdefault(job, []).append(cg)
        return out

    def _dead_spare_cgroups(self) -> list[containment.InstanceCgroup]:
        """Cgroups of warm supervisors that are gone (by the pid their names hold; no run dir read)."""
        dead = {name for names in self._cgroup_names() for name in names
                if name.startswith(containment.SPARE_PREFIX) and not _spare_alive(name)}
        return [containment.InstanceCgroup(self.plan, name=name) for name in sorted(dead)]

    def _cgroup_names(self) -> Iterator[list[str]]:
        """The names in each of this server's cgroup folders (kill, and memory where it is another)."""
        for root in dict.fromkeys([self.plan.kill_dir, self.plan.memory_dir]):
            try:
                yield os.listdir(root) if root else []
            except FileNotFoundError:
                continue

    def finish_job(self, job_id: str) -> None:
        """Kill whatever of the job is left and wait until it is gone: its instances' cgroups
        (a supervisor that ended normally emptied its own); by the job's marker where an instance
        had no cgroup and lost its supervisor, or on a loopback multi-node job (a lost head's Ray
        node); a multi-node job's namespaces. The emptied cgroups are removed in the background:
        removing one waits for an RCU grace period (~10 ms), which no result should wait for.

        Where every instance's supervisor saw its cgroups empty at the end (``emptied`` in its exit
        record) and the job had no network of its own, nothing can be left: the cgroups are only
        queued for removal, without looking through every cgroup of the server."""
        if self._all_emptied(job_id):
            for cg in self._instance_cgroups(job_id):
                self._tidier.put(lambda cg=cg: cg.remove() or log.warning(
                    "job %s: could not remove its cgroups %s", job_id, cg.dirs))
            return
        for cg in self._cgroups_of(job_id).get(job_id, []):
            if not cg.kill():
                log.warning("job %s: cgroups %s still hold processes after SIGKILL", job_id, cg.dirs)
            self._tidier.put(lambda cg=cg: cg.remove() or log.warning(
                "job %s: could not remove its cgroups %s", job_id, cg.dirs))
        with self._net_lock:
            self._networks.pop(job_id, None)
        path = self._network_file(job_id)
        try:
            net = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            net = None
        if net is not None and net.get("netns"):
            netns.delete(job_id)
        if (net is not None and not net.get("netns")) or self._lost_uncontained(job_id):
            containment.kill_marked(job_id)
        path.unlink(missing_ok=True)
        for cg in self._dead_spare_cgroups():  # a warm supervisor killed before its run dir named them
            self._tidier.put(cg.remove)

    def _instance_dirs(self, job_id: str) -> list[Path]:
        try:
            return [d for d in self.home.job_run(job_id).iterdir() if d.name.isdigit()]
        except FileNotFoundError:
            return []

    def _all_emptied(self, job_id: str) -> bool:
        dirs = self._instance_dirs(job_id)
        if not dirs or self._network_file(job_id).exists():
            return False
        for d in dirs:
            try:
                if not json.loads((d / "exit.json").read_text()).get("emptied"):
                    return False
            except (FileNotFoundError, ValueError):
                return False
        return True

    def _instance_cgroups(self, job_id: str) -> list[containment.InstanceCgroup]:
        """The cgroups of the job's instances, by the names their run dirs give (or ``<job>.<i>``)."""
        out = []
        for d in self._instance_dirs(job_id):
            try:
                name = (d / CGROUP_FILE).read_text().strip()
            except FileNotFoundError:
                name = f"{job_id}.{d.name}"
            out.append(containment.InstanceCgroup(self.plan, name=name))
        return out

    def _lost_uncontained(self, job_id: str) -> bool:
        """Whether an instance of the job ran without a cgroup and its supervisor left no exit record
        (then its processes are found by the job's marker)."""
        if self.plan.kind != "fallback":
            return False
        run = self.home.job_run(job_id)
        try:
            dirs = [d for d in run.iterdir() if d.name.isdigit()]
        except FileNotFoundError:
            return True  # nothing to tell: look
        return any(not (d / "exit.json").exists() for d in dirs)

    def sweep(self, ended: Callable[[str], bool]) -> list[str]:
        """Finish ended jobs that left processes: from this server's cgroups, and by marker. Warm
        supervisors' cgroups that no instance took and that our own spawner did not make belong
        to an earlier server's spawner: they are emptied and removed."""
        found = self._cgroups_of()
        ours = f"{containment.SPARE_PREFIX}{self._spawner.pid}-" if self._spawner.pid else None
        for cg in found.pop("", []):
            if not (ours and cg.name.startswith(ours)):
                cg.remove()
        for cg in self._dead_spare_cgroups():  # ours too, and taken ones: their supervisor is gone
            cg.remove()
        self._remove_dead_slots()
        jobs = set(found)
        jobs.update(containment.marked_processes().values())
        done = sorted(j for j in jobs if j and ended(j))
        for job_id in done:
            self.finish_job(job_id)
            containment.kill_marked(job_id)
        self._tidier.wait()
        return done

    def _remove_dead_slots(self) -> None:
        """Sandboxed spares' folders (``spares/spare-<spawner>-<supervisor>-<random>``) whose
        supervisor is gone: it was killed before it could remove them."""
        try:
            slots = list((self.home.root / "spares").iterdir())
        except FileNotFoundError:
            return
        for slot in slots:
            if not _spare_alive(slot.name):
                shutil.rmtree(slot, ignore_errors=True)

    def close(self) -> None:
        self._watcher.close()
        self._spawner.close()
        self._tidier.close()
        for root in dict.fromkeys([self.plan.kill_dir, self.plan.memory_dir]):
            if root:  # only when empty: instances still running keep theirs
                try:
                    os.rmdir(root)
                except OSError:
                    pass
