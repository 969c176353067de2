"""The node side of a remote instance: fetch, supervise, report.

A remote provider (Slurm, Ray) starts, on each node, ::

    python -m mljobs.runtime.agent --stage NAME --stage-url URL --job JOB_ID [--instance I]

The agent reads the job's launch document from the stage (``<job>/run/launch.json``, written by
:class:`mljobs.providers.remote.RemoteProvider`), downloads the payload into a folder of the
node's own (``MLJOBS_NODE_DIR``, default ``$TMPDIR/mljobs-node``), fills in the node's part of the
launch (paths, CPUs, GPUs, a multi-node job's addresses) and runs the same supervisor as a local
instance, in its own session. While it runs, the agent tails the supervisor's log and samples
and POSTs them to the control plane with the job's own token (``/jobs/{id}/instances/{i}/report``):
every 0.5 s while there is output, else a heartbeat every ``heartbeat_s``. Once the supervisor
has ended it uploads the result envelope to the stage and reports the exit record, retrying
until the control plane has it. The reply to a report says what the server wants: ``cancel``
(SIGTERM to the supervisor, which stops the whole tree after the grace period), ``release`` (a
worker whose head has finished) or ``stop`` (the job is over for the server: stop, report
nothing more). SIGTERM to the agent (``scancel``, Ray's stop) is a cancel too.

The instance id comes from ``--instance``, else ``MLJOBS_INSTANCE_ID``, else ``SLURM_PROCID``.
"""

from __future__ import annotations

import argparse
import fcntl
import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mljobs import logformat
from mljobs.paths import CHECKPOINT_DIR, StagePaths
from mljobs.runtime import checkpoint, containment, multinode, sandbox, supervisor
from mljobs.stages import Stage

__all__ = ["main", "own_address", "instance_id_from_env"]

_FLUSH_S = 0.5  # output goes out this often while there is some
_EXIT_RETRY_S = 600.0  # how long the exit record is retried while the control plane is away


class Unreachable(Exception):
    """The control plane did not answer (or failed): keep going, keep the output, try again."""


class Stop(Exception):
    """The control plane no longer wants this instance (its job ended, or its token is refused)."""


def own_address(url: str) -> str:
    """This node's address on the route to the control plane (no packet is sent)."""
    parts = urlsplit(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((parts.hostname or "127.0.0.1", parts.port or 80))
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def instance_id_from_env(env: dict[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    for var in ("MLJOBS_INSTANCE_ID", "SLURM_PROCID"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return 0


class Reporter:
    """Posts reports for one instance; keeps what it has not managed to send."""

    def __init__(self, url: str, token: str, job_id: str, instance_id: int) -> None:
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or (443 if self._https else 80)
        self.path = f"{parts.path.rstrip('/')}/api/v1/jobs/{job_id}/instances/{instance_id}/report"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._conn: http.client.HTTPConnection | None = None
        self.pending_lines: list[str] = []
        self.pending_metrics: list[dict[str, Any]] = []
        self.last_sent = 0.0

    def _post(self, body: bytes) -> tuple[int, bytes]:
        """One POST on a kept-alive connection (http.client: the agent starts in a third of
        httpx's import time); a connection the server dropped is made again once."""
        for attempt in (1, 2):
            if self._conn is None:
                cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                self._conn = cls(self._host, self._port, timeout=30)
            try:
                self._conn.request("POST", self.path, body=body, headers=self._headers)
                r = self._conn.getresponse()
                return r.status, r.read()
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def send(self, **fields: Any) -> dict[str, Any]:
        """Send the pending output with ``fields``; returns the reply. Raises Stop when the job
        is over for the server, Unreachable when the server cannot be reached or fails."""
        body = {"lines": self.pending_lines, "metrics": self.pending_metrics, **fields}
        try:
            status, data = self._post(json.dumps(body).encode())
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(f"{type(e).__name__}: {e}") from None
        if status in (401, 403, 404, 409):
            raise Stop(f"the control plane answered {status}: {data[:300].decode(errors='replace')}")
        if status >= 300:
            raise Unreachable(f"the control plane answered {status}: {data[:300].decode(errors='replace')}")
        self.pending_lines, self.pending_metrics = [], []
        self.last_sent = time.monotonic()
        reply = json.loads(data)
        if reply.get("action") == "stop":
            raise Stop("the control plane says the job is over")
        return reply

    def system(self, text: str) -> None:
        self.pending_lines.append(logformat.format_record(logformat.SYS, f"mljobs agent: {text}"))


class _Tail:
    """The complete lines appended to a file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.rest = path, 0, b""

    def read(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        return [ln.decode("utf-8", "backslashreplace") + "\n" for ln in lines]


def _node_launch(tpl: dict[str, Any], instance_id: int, node_dir: Path) -> dict[str, Any]:
    """The template with this node's part filled in (what the local provider decides for itself)."""
    run_dir, work_dir = node_dir / "run", node_dir / "work"
    for d in (run_dir, work_dir):
        d.mkdir(parents=True, exist_ok=True)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    gpus = int(tpl.get("gpus_per_node") or 0)
    env = {**tpl["env"], "MLJOBS_INSTANCE_ID": str(instance_id)}
    env.update({var: str(min(len(cpus), int(tpl.get("cpus_per_node") or len(cpus)))) for var in containment.THREAD_VARS})
    environment = tpl.get("environment")
    if environment:  # the node builds job environments in a cache of its own
        environment = {**environment, "cache_dir": str(node_dir.parent.parent / "envs")}
    return {**tpl, "sandbox": _node_sandbox(tpl.get("sandbox"), node_dir.parent.parent),
            "instance_id": instance_id, "run_dir": str(run_dir), "work_dir": str(work_dir),
            "app_dir": str(work_dir), "log_file": str(run_dir / "instance.log"), "result_file": str(run_dir / "result.pkl"),
            "metrics_file": str(run_dir / "metrics.jsonl"), "cpus": cpus, "netns": None, "env": env,
            "python": tpl.get("python") or sys.executable, "environment": environment,
            "gpus": list(range(gpus)) if gpus else [],
            # the engine contains the job (Slurm's cgroups, Ray's worker); the supervisor adds the
            # parent-death signal and watches resident memory against the family's limit
            "containment": containment.Plan("fallback", None, "rss", None, "a remote node: its engine contains the job")
            .to_dict()}


def _node_sandbox(box: dict[str, Any] | None, base: Path) -> dict[str, Any] | None:
    """The server's sandbox for this node: its folders hidden are the agent's (``base``: every
    job's node folders and the node's environment cache, read-only); without bubblewrap here,
    none (the exit record says so). A uid of the job owner's own only where the agent is root."""
    if not box or sandbox.probe() is not None:
        return None
    box = {**box, "home": str(base), "readable": [str(base / "envs")]}
    (base / "envs").mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:  # no other uid to give (the owner's name still picks their uv cache)
        box.update(uid=None)
    return box


def _send_retrying(rep: Reporter, limit_s: float = 120.0, **fields: Any) -> dict[str, Any]:
    """A report that must arrive (the first, the address exchange): retried while the control
    plane is away, up to ``limit_s``."""
    deadline, delay = time.monotonic() + limit_s, 0.2
    while True:
        try:
            return rep.send(**fields)
        except Unreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _wait_for_addresses(rep: Reporter, mn: dict[str, Any], address: str, hostname: str) -> list[str]:
    """A multi-node job's node addresses, once every instance has reported its own."""
    deadline = time.monotonic() + float(mn["join_timeout_s"])
    while True:
        reply = _send_retrying(rep, address=address, hostname=hostname)
        if reply.get("addresses"):
            return list(reply["addresses"])
        if time.monotonic() > deadline:
            raise TimeoutError(f"the job's other nodes did not report within join_timeout_s={mn['join_timeout_s']:g}")
        time.sleep(0.5)


_HOLD = ".agent"  # in a node folder: locked (flock) while its agent, or the supervisor it forked, lives
SWEEP_AGE_S = 60.0  # a node folder younger than this is never swept: its agent is about to lock it


def hold(node_dir: Path) -> int:
    """Make ``node_dir`` and lock its hold file; the fd stays open for the agent's life (the
    supervisor, forked, holds it too), so the lock goes only with both processes."""
    node_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(node_dir / _HOLD, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def sweep(base: Path, min_age_s: float = SWEEP_AGE_S) -> list[str]:
    """Remove the node folders under ``base`` whose agent and supervisor are both gone without
    removing them (killed: by a stop that outlasted Ray's grace, the OOM killer, a node restart);
    returns their names. One whose processes live, one just made, and one without a hold file
    (an older agent's) are left alone."""
    removed = []
    try:
        entries = list((base / "jobs").iterdir())
    except OSError:
        return removed
    for d in entries:
        try:
            if time.time() - (d / _HOLD).stat().st_mtime < min_age_s:
                continue
            fd = os.open(d / _HOLD, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(d, ignore_errors=True)  # under the lock: no agent can take the folder meanwhile
            removed.append(d.name)
        except OSError:  # BlockingIOError: its agent or supervisor lives
            pass
        finally:
            os.close(fd)
    return removed


def run(stage: Stage, job_id: str, instance_id: int) -> int:
    tpl = json.loads(stage.get_bytes(StagePaths(job_id).launch))
    url, token = tpl["env"]["MLJOBS_URL"], tpl["env"]["MLJOBS_TOKEN"]
    rep = Reporter(url, token, job_id, instance_id)
    address, hostname = own_address(url), socket.gethostname()
    base = Path(os.environ.get("MLJOBS_NODE_DIR") or Path(tempfile.gettempdir()) / "mljobs-node")
    attempt = int(tpl.get("attempt") or 1)  # an attempt's folder is its own (a lost one's may be left)
    node_dir = base / "jobs" / (f"{job_id}-{instance_id}" + (f".{attempt}" if attempt > 1 else ""))
    rep.system(f"instance {instance_id} on {hostname} ({address}), pid {os.getpid()}")
    mn: dict[str, Any] | None = None
    gone = sweep(base)
    if gone:
        print(f"mljobs agent: removed {len(gone)} node folder(s) whose agents were killed: {', '.join(gone)}",
              file=sys.stderr)
    held = hold(node_dir)
    try:
        _send_retrying(rep, address=address, hostname=hostname)
        launch = _node_launch(tpl, instance_id, node_dir)
        if tpl.get("sandbox") and not launch["sandbox"]:
            rep.system(f"the payload runs unsandboxed on {hostname}: {sandbox.probe()}")
        stage.download_dir(StagePaths(job_id).app, launch["work_dir"])
        kept = checkpoint.StageFolder(stage, StagePaths(job_id).checkpoint(instance_id))
        if attempt > 1 and kept.restore(Path(launch["work_dir"]) / CHECKPOINT_DIR):  # what the last attempt left
            rep.system(f"attempt {launch['attempt']}: the checkpoint folder of the last attempt is restored")
        mn = launch.get("multinode")
        granted = int(os.environ.get("SLURM_JOB_NUM_NODES") or 0)
        if mn and 0 < granted < mn["count"]:  # the engine gave fewer nodes than asked (a node range)
            mn = {**mn, "count": granted, "min_instances": min(mn["min_instances"], granted)}
            rep.system(f"the allocation has {granted} of the {tpl['multinode']['count']} node(s) asked for")
            _send_retrying(rep, granted=granted)
            launch["instance_count"] = granted
            launch["env"]["MLJOBS_INSTANCE_COUNT"] = str(granted)
        if mn:
            mn = {**mn, "addresses": _wait_for_addresses(rep, mn, address, hostname),
                  "temp_dir": os.path.join(tempfile.gettempdir(), f"mljr-{job_id[-12:].lower()}-{instance_id}")}
            if mn.get("host_cluster"):  # the Ray provider: the payload joins the nodes' own Ray cluster
                mn["ray_address"] = os.environ.get("MLJOBS_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
            launch["multinode"] = mn
            launch["env"].update(multinode.node_env(mn, instance_id))
        return _supervise(rep, stage, launch, node_dir)
    except Stop as e:
        print(f"mljobs agent: {e}; stopping", file=sys.stderr)
        return 0
    finally:
        shutil.rmtree(node_dir, ignore_errors=True)
        os.close(held)
        if mn and mn.get("temp_dir"):  # the node's Ray folder (sockets, logs); its processes are gone
            shutil.rmtree(mn["temp_dir"], ignore_errors=True)


class _Supervisor:
    """The instance's supervisor, forked from this agent (its imports are warm, so no interpreter
    start) into a session of its own, exactly as ``python -m mljobs.runtime.supervisor RUN_DIR``."""

    def __init__(self, run_dir: Path) -> None:
        err = os.open(run_dir / "supervisor.err", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            code = 70
            try:
                os.setsid()
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(err, 1)
                os.dup2(err, 2)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                code = supervisor.main([str(run_dir)])
            finally:
                os._exit(code)
        os.close(err)
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code; subprocess.TimeoutExpired if it still runs after ``timeout`` (a pidfd
        wakes the wait the moment it ends, so a long timeout costs no exit latency)."""
        if self.returncode is None:
            if timeout is not None:
                fd = os.pidfd_open(self.pid)
                try:
                    ready, _, _ = select.select([fd], [], [], timeout)
                finally:
                    os.close(fd)
                if not ready:
                    raise subprocess.TimeoutExpired("supervisor", timeout)
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def _supervise(rep: Reporter, stage: Stage, launch: dict[str, Any], node_dir: Path) -> int:
    run_dir = Path(launch["run_dir"])
    (run_dir / "launch.json").write_text(json.dumps(launch))
    cancel = {"requested": False}
    sup = _Supervisor(run_dir)

    def forward(sig: int, _: Any) -> None:  # scancel / Ray's stop: the supervisor stops the tree
        cancel["requested"] = True
        try:
            os.kill(sup.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    logs, samples = _Tail(Path(launch["log_file"])), _Tail(Path(launch["metrics_file"]))
    ray_file, ray_sent = run_dir / "ray.json", False
    heartbeat = float(launch.get("heartbeat_s") or 5.0)
    checkpoint = _Checkpoint(stage, launch)
    try:
        while True:
            try:
                code = sup.wait(timeout=_FLUSH_S / 2)
                break
            except subprocess.TimeoutExpired:
                code = None
            checkpoint.keep(every_s=heartbeat)
            rep.pending_lines += logs.read()
            rep.pending_metrics += [json.loads(s) for s in samples.read()]
            ray = None
            if not ray_sent and ray_file.exists():
                ray = json.loads(ray_file.read_text())
            since = time.monotonic() - rep.last_sent
            if ray is not None or (since >= _FLUSH_S and (rep.pending_lines or rep.pending_metrics)) or since >= heartbeat:
                try:
                    reply = rep.send(ray=ray)
                except Unreachable:
                    continue  # the control plane is away: keep running, keep the output, try again
                ray_sent = ray_sent or ray is not None
                action = reply.get("action")
                if action == "cancel" and not cancel["requested"]:
                    forward(signal.SIGTERM, None)
                elif action == "release":
                    os.kill(sup.pid, signal.SIGUSR1)
    except Stop:
        forward(signal.SIGTERM, None)
        sup.wait()
        raise
    rep.pending_lines += logs.read()
    rep.pending_metrics += [json.loads(s) for s in samples.read()]
    checkpoint.keep(every_s=0.0)
    return _report_exit(rep, stage, launch, code)


class _Checkpoint(checkpoint.Keeper):
    """The instance's checkpoint folder, kept on the stage while the job has attempts left: as it
    changes (looked at every heartbeat, so a node lost mid-run loses at most two of them) and at
    the end (:class:`mljobs.runtime.checkpoint.Keeper`)."""

    def __init__(self, stage: Stage, launch: dict[str, Any]) -> None:
        super().__init__(Path(launch["work_dir"]) / CHECKPOINT_DIR,
                         checkpoint.StageFolder(stage, StagePaths(launch["job_id"]).checkpoint(int(launch["instance_id"])),
                                                int(launch.get("attempt") or 1)),
                         who="mljobs agent")
        self.on = bool(launch.get("keep_checkpoint"))

    def keep(self, every_s: float) -> None:
        if self.on:
            super().keep(every_s)


def _report_exit(rep: Reporter, stage: Stage, launch: dict[str, Any], code: int) -> int:
    run_dir = Path(launch["run_dir"])
    try:
        record = json.loads((run_dir / "exit.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        rep.system(f"the supervisor ended with code {code} without an exit record; see supervisor.err on the node")
        record = {"exit_code": None, "cancelled": False, "has_result": False}
    result = Path(launch["result_file"])
    if record.get("has_result") and result.exists():
        stage.put_local(StagePaths(launch["job_id"]).instance_result(launch["instance_id"]), result)
    error_file = run_dir / "error.json"
    if error_file.exists():
        record["error"] = json.loads(error_file.read_text())
    deadline = time.monotonic() + _EXIT_RETRY_S
    delay = 0.2
    while True:
        try:
            rep.send(exit=record)
            return 0
        except Stop:
            return 0
        except Unreachable as e:
            if time.monotonic() > deadline:
                print(f"mljobs agent: could not report the exit to the control plane: {e}", file=sys.stderr)
                return 1
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mljobs.runtime.agent", description=__doc__.split("\n")[0])
    ap.add_argument("--stage", required=True, help="the job's stage name")
    ap.add_argument("--stage-url", required=True, help="the stage's fsspec URL, readable from this node")
    ap.add_argument("--job", required=True)
    ap.add_argument("--instance", type=int, default=None)
    args = ap.parse_args(argv)
    instance = args.instance if args.instance is not None else instance_id_from_env()
    return run(Stage(args.stage, args.stage_url), args.job, instance)


if __name__ == "__main__":
    sys.exit(main())
