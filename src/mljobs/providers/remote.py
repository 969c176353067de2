"""What every provider whose instances run on other machines shares: instances that report.

A remote instance cannot be watched with a pidfd or read from local files. Its node runs
``python -m mljobs.runtime.agent``, which reads the job's launch document from the job's stage,
runs the same supervisor as a local instance, and reports to the control plane over HTTP with
the job's own token (``POST /api/v1/jobs/{id}/instances/{i}/report``):

- log records in batches (the log lives on the server, so logs work as for local jobs),
  resource samples, its node's address, a head's Ray addresses;
- a heartbeat every ``heartbeat_s`` (5 s) when there is nothing else to say;
- its exit record, once its result envelope is on the stage.

The reply says what the server wants of it (``cancel``, ``release``, ``stop``) and, for a
multi-node job, the addresses of the job's nodes as they become known.

This class keeps what the reports say in the same files the local provider's supervisor writes
(``InstancePaths`` under MLJOBS_HOME: the log, ``exit.json``, ``metrics.jsonl``, ``ray.json``), so
polling, logs, metrics and completion are one code path for every provider, and an exit
reported just before a server restart is read back after it. An instance that stays silent for
``heartbeat_timeout_s`` (30 s), or that its engine no longer runs and that left no exit record,
is lost. Subclasses say how to start, find and stop allocations on their engine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from mljobs import logformat
from mljobs.config import Settings
from mljobs.errors import InvalidArgumentError
from mljobs.paths import HomePaths, InstancePaths, StagePaths
from mljobs.providers.base import (ExitCallback, InstanceExit, InstanceHandle, InstanceLaunch, InstanceReport, Provider,
                                   launch_document)
from mljobs.providers.local import read_log_tail
from mljobs.runtime import multinode
from mljobs.runtime.sandbox import MULTINODE_NODE_NETWORK
from mljobs.runtime.metrics import read_samples
from mljobs.spec import JobSpec, PoolSpec
from mljobs.stages import Stage

__all__ = ["RemoteProvider", "ENGINE_PENDING", "ENGINE_RUNNING", "ENGINE_GONE", "is_shared_url"]

log = logging.getLogger("mljobs.server")

# What an engine says of an instance's allocation (None: it cannot tell right now).
ENGINE_PENDING, ENGINE_RUNNING, ENGINE_GONE = "pending", "running", "gone"
_GONE_GRACE_S = 10.0  # an exit report may still be on its way when the engine already forgot the job


def is_shared_url(url: str, shared_paths: list[str]) -> bool:
    """Whether a stage at ``url`` can be read from other machines: any remote fsspec URL, or a
    folder under one of the pool's ``shared_paths`` (a shared filesystem mounted on every node)."""
    scheme = urlsplit(url).scheme
    if scheme and scheme not in ("file", "local") and len(scheme) > 1:  # "C:" is a drive, not a scheme
        return True
    path = os.path.realpath(url.removeprefix("file://"))
    return any(path == os.path.realpath(s) or path.startswith(os.path.realpath(s).rstrip("/") + "/")
               for s in shared_paths)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class RemoteProvider(Provider):
    """A provider whose instances run elsewhere and report over HTTP (see the module doc)."""

    remote = True
    supports_gpus = True
    supports_multinode = True
    # provider_options every remote provider knows, beside its own
    COMMON_OPTIONS: ClassVar[dict[str, str]] = {
        "shared_paths": "folders mounted at the same path on the server and every node, so that a stage there "
                        "counts as shared (a list of paths)",
        "python": "the Python interpreter on the nodes, with mljobs installed (default: the server's own path)",
    }

    def __init__(self, home: HomePaths, settings: Settings | None = None) -> None:
        self.home = home
        self.settings = settings or Settings(home=home.root)
        self._lock = threading.Lock()
        self._callbacks: dict[tuple[str, int], ExitCallback] = {}
        self._beats: dict[tuple[str, int], float] = {}  # last report (monotonic)
        self._first_seen: dict[tuple[str, int], float] = {}  # when the engine first said it runs
        self._gone_since: dict[tuple[str, int], float] = {}
        self._actions: dict[tuple[str, int], str] = {}

    # -- what subclasses provide ----------------------------------------------------------------
    def engine_state(self, handle: InstanceHandle) -> str | None:
        """ENGINE_PENDING, ENGINE_RUNNING or ENGINE_GONE for the instance's allocation (None: the
        engine did not answer)."""
        return None

    def engine_detail(self, handle: InstanceHandle) -> str:
        """In words, how the engine says the instance's allocation ended ("" if it cannot say)."""
        return ""

    # -- pools and jobs -------------------------------------------------------------------------
    def check_job(self, spec: JobSpec, pool: PoolSpec, stage_url: str) -> None:
        shared = list(pool.provider_options.get("shared_paths") or [])
        if not is_shared_url(stage_url, shared):
            raise InvalidArgumentError(
                f"stage {spec.stage_name!r} is the folder {stage_url} on the server, which the nodes of compute pool "
                f"{pool.name} ({self.name} provider) cannot read: payloads and results travel through the stage. "
                f"Use a stage on shared storage, e.g. create_stage({spec.stage_name!r}, 's3://bucket/prefix'), or "
                f"name the shared filesystem it lives on in the pool's provider_options "
                f"{{'shared_paths': ['/shared/mljobs']}} (now {shared})")

    def check_reachable(self, pool: PoolSpec, url: str) -> None:
        host = urlsplit(url).hostname or ""
        if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
            raise InvalidArgumentError(
                f"compute pool {pool.name}: the control plane's address {url} is loopback, which the nodes of a "
                f"{self.name} pool cannot reach; start the server on an address the nodes reach "
                "(`mljobs server start --host ADDRESS`) or set MLJOBS_ADVERTISE_URL")

    def launch_template(self, launch: InstanceLaunch, options: dict[str, Any]) -> dict[str, Any]:
        """The job's launch document for the agents: everything but the node's own part, which
        each agent fills in on its node (paths, CPUs, addresses)."""
        spec, k = launch.spec, launch.instance_count
        doc = launch_document(launch, {}, python=options.get("python") or spec.runtime_python or "",
                              metrics=self.settings.metrics, gpus_per_node=launch.family.gpus,
                              cpus_per_node=launch.family.cpus, heartbeat_s=self.settings.heartbeat_s,
                              stage={"name": launch.stage.name, "url": launch.stage.url},
                              # the agent makes it where its node has bubblewrap; a multi-node
                              # job's instances share the nodes' network (their Ray cluster)
                              sandbox=launch.sandbox,  # a multi-node job's: net "open" (the server's policy)
                              isolation_note=MULTINODE_NODE_NETWORK if k > 1 and launch.sandbox
                              and launch.sandbox["mode"] == "shared" else None)
        doc["env"].pop("MLJOBS_INSTANCE_ID", None)
        if k > 1:
            doc["multinode"] = {"count": k, "min_instances": min(spec.effective_min_instances, k),
                                "parallel": spec.parallel, "join_timeout_s": spec.join_timeout_s,
                                "started_at": time.time(), "addresses": None, **multinode.DEFAULT_PORTS, "ports": {},
                                "cpus": launch.family.cpus, "gpus": launch.family.gpus,
                                "memory_bytes": launch.family.memory_bytes}
        return doc

    def write_launch(self, launch: InstanceLaunch, options: dict[str, Any]) -> str:
        """Put the job's launch document on its stage; returns its path there."""
        path = StagePaths(launch.job_id).launch
        launch.stage.put_bytes(path, json.dumps(self.launch_template(launch, options)).encode())
        for i in range(launch.instance_count):
            self.paths(InstanceHandle(launch.job_id, i)).run_dir.mkdir(parents=True, exist_ok=True)
        return path

    # -- the job's allocation on the engine (how instances are found again after a restart) -----
    def handle_for(self, job_id: str, instance_id: int, alloc: dict[str, Any]) -> InstanceHandle:
        """An instance's handle from its job's allocation record (subclasses add their ids)."""
        return InstanceHandle(job_id, instance_id, extra={"count": alloc["count"], "stage": alloc["stage"]})

    def save_allocation(self, job_id: str, alloc: dict[str, Any]) -> None:
        _write_json(self.home.allocation_file(job_id), alloc)

    def allocation(self, job_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.home.allocation_file(job_id).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def find(self, job_id: str, instance_id: int) -> InstanceHandle | None:
        alloc = self.allocation(job_id)
        return None if alloc is None else self.handle_for(job_id, instance_id, alloc)

    # -- reports --------------------------------------------------------------------------------
    def paths(self, handle: InstanceHandle) -> InstancePaths:
        return self.home.instance(handle.job_id, handle.instance_id)

    def report(self, handle: InstanceHandle, report: InstanceReport) -> dict[str, Any]:
        key = (handle.job_id, handle.instance_id)
        p = self.paths(handle)
        if p.exit_file.exists():  # it ended for the server already (lost, or a repeated exit report)
            return {"action": "stop"}
        p.run_dir.mkdir(parents=True, exist_ok=True)
        if report.lines:
            p.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(p.log_file, "a", encoding="utf-8") as f:
                f.write("".join(line if line.endswith("\n") else line + "\n" for line in report.lines))
        if report.metrics:
            with open(p.metrics_file, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(m) + "\n" for m in report.metrics))
        if report.address and not p.node_file.exists():
            _write_json(p.node_file, {"address": report.address, "hostname": report.hostname})
        if report.ray:
            _write_json(p.ray_file, report.ray)
        if report.granted is not None:
            self._not_granted(handle, report.granted)
        callback = None
        with self._lock:
            self._beats[key] = time.monotonic()
            action = self._actions.get(key)
            if report.exit is not None:
                callback = self._callbacks.pop(key, None)
        if report.exit is not None:
            error = report.exit.pop("error", None)
            if error:
                _write_json(p.error, error)
            _write_json(p.exit_file, report.exit)  # last: its presence means the exit is complete
            if callback is not None:
                callback(handle)
            return {"action": None}
        return {"action": action, "addresses": self._addresses(handle)}

    def _not_granted(self, handle: InstanceHandle, granted: int) -> None:
        """The engine gave the job ``granted`` of the nodes it asked for (a node range, as
        ``min_instances`` asks): the instances past them end at once, released, never started."""
        alloc = self.allocation(handle.job_id)
        if alloc is not None and alloc.get("granted") != granted:
            self.save_allocation(handle.job_id, {**alloc, "granted": granted})
        for i in range(granted, int(handle.extra.get("count", 1))):
            other = InstanceHandle(handle.job_id, i, extra=dict(handle.extra))
            p = self.paths(other)
            if p.exit_file.exists():
                continue
            p.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(p.log_file, "a", encoding="utf-8") as f:
                f.write(logformat.format_record(logformat.SYS, f"mljobs: the {self.name} engine granted {granted} "
                                                               f"node(s); instance {i} does not run"))
            _write_json(p.exit_file, {"exit_code": 0, "cancelled": False, "released": True, "has_result": False})
            with self._lock:
                callback = self._callbacks.pop((handle.job_id, i), None)
            if callback is not None:
                callback(other)

    def _addresses(self, handle: InstanceHandle) -> list[str] | None:
        """Every node's address once all of a multi-node job's (granted) instances reported theirs."""
        count = int(handle.extra.get("count", 1))
        alloc = self.allocation(handle.job_id) or {}
        count = min(count, int(alloc.get("granted") or count))
        if count < 2:
            return None
        out = []
        for i in range(count):
            try:
                out.append(json.loads(self.home.instance(handle.job_id, i).node_file.read_text())["address"])
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                return None
        return out

    # -- watching -------------------------------------------------------------------------------
    def watch(self, handle: InstanceHandle, on_exit: ExitCallback) -> bool:
        if self.paths(handle).exit_file.exists():
            return False
        with self._lock:
            self._callbacks[(handle.job_id, handle.instance_id)] = on_exit
        return True

    def poll(self, handle: InstanceHandle) -> InstanceExit | None:
        p = self.paths(handle)
        key = (handle.job_id, handle.instance_id)
        try:
            record = json.loads(p.exit_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            record = None
        if record is not None:
            return self._exit_from(handle, record)
        state = self.engine_state(handle)
        now = time.monotonic()
        with self._lock:
            if state == ENGINE_PENDING:
                return None  # queued by the engine: not started, not lost
            first = self._first_seen.setdefault(key, now)
            silent = now - max(self._beats.get(key, first), first)
            if state == ENGINE_GONE:
                gone = self._gone_since.setdefault(key, now)
            else:
                self._gone_since.pop(key, None)
                gone = None
        # before its first report (node.json says it made one, also across a server restart) the
        # node may still be starting Python: the longer start timeout applies
        started = key in self._beats or p.node_file.exists()
        limit, name = ((self.settings.heartbeat_timeout_s, "MLJOBS_HEARTBEAT_TIMEOUT_S") if started else
                       (max(self.settings.heartbeat_timeout_s, self.settings.start_timeout_s), "MLJOBS_START_TIMEOUT_S"))
        if gone is not None and now - gone >= _GONE_GRACE_S:
            detail = self.engine_detail(handle)
            why = f"its {self.name} allocation ended and it sent no exit record" + (f" ({detail})" if detail else "")
        elif silent > limit:
            why = f"it sent nothing for {silent:.0f} s (the limit is {name}={limit:g})"
        else:
            return None
        log.warning("job %s instance %d lost: %s", handle.job_id, handle.instance_id, why)
        # The decision is the instance's exit record, so that every later look (a second poll,
        # a server restart) sees the same; a report that comes after it is told to stop.
        _write_json(p.exit_file, {"exit_code": None, "lost": True, "reason": why})
        return self._exit_from(handle, json.loads(p.exit_file.read_text()))

    def _exit_from(self, handle: InstanceHandle, record: dict[str, Any]) -> InstanceExit:
        p = self.paths(handle)
        if record.get("lost"):
            self._forget((handle.job_id, handle.instance_id))
            return InstanceExit(None, lost=True, log_tail=[f"mljobs: the node was lost: {record.get('reason')}"]
                                + read_log_tail(p.log_file, 9))
        error = json.loads(p.error.read_text()) if p.error.exists() else None
        result = None
        if record.get("has_result") and handle.extra.get("stage"):
            stage = Stage(handle.extra["stage"]["name"], handle.extra["stage"]["url"])
            path = StagePaths(handle.job_id).instance_result(handle.instance_id)
            result = stage.get_bytes(path) if stage.exists(path) else None
        self._forget((handle.job_id, handle.instance_id))
        return InstanceExit(record.get("exit_code"), bool(record.get("cancelled")), False, error, result,
                            read_log_tail(p.log_file, 10), bool(record.get("released")), record.get("oom"),
                            record.get("usage"), record.get("isolation"))

    def _forget(self, key: tuple[str, int]) -> None:
        with self._lock:
            for d in (self._callbacks, self._beats, self._first_seen, self._gone_since, self._actions):
                d.pop(key, None)  # type: ignore[attr-defined]

    def ask(self, handle: InstanceHandle, action: str) -> None:
        """Tell the instance's agent ``action`` in its next reply (``cancel``, ``release``)."""
        with self._lock:
            self._actions[(handle.job_id, handle.instance_id)] = action

    def release(self, handle: InstanceHandle, grace_period_s: float) -> None:
        self.ask(handle, "release")

    def _started(self, handle: InstanceHandle) -> bool:
        """Whether the instance's agent has reported (this server heard it, or node.json says so)."""
        return (handle.job_id, handle.instance_id) in self._beats or self.paths(handle).node_file.exists()

    def _any_started(self, job_id: str) -> bool:
        with self._lock:
            if any(key[0] == job_id for key in self._beats):
                return True
        return any(self.home.job_run(job_id).glob("*/node.json"))

    def _cancel_unstarted(self, handle: InstanceHandle) -> bool:
        """A cancel of an instance whose agent has not reported yet (the engine still queues it,
        or its node is starting Python): it ends CANCELLED now, by its exit record, instead of
        waiting for an agent that the engine is told to stop and that will never report (a late
        report is told to stop). False when the agent has reported: its own exit report follows."""
        p = self.paths(handle)
        with self._lock:
            if self._started(handle) or p.exit_file.exists():
                return False
            _write_json(p.exit_file, {"exit_code": None, "cancelled": True,
                                      "reason": "cancelled before its agent started"})
        p.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(p.log_file, "a", encoding="utf-8") as f:
            f.write(logformat.format_record(logformat.SYS, f"mljobs: cancelled before it started on a node; its "
                                                           f"{self.name} allocation is stopped"))
        return True

    def metrics(self, handle: InstanceHandle) -> list[dict[str, Any]]:
        return read_samples(self.paths(handle).metrics_file)

    def ray_info(self, handle: InstanceHandle) -> dict[str, Any] | None:
        try:
            return json.loads(self.paths(handle).ray_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def cleanup(self, handle: InstanceHandle, now: bool = False) -> None:
        shutil.rmtree(self.paths(handle).run_dir, ignore_errors=True)
        if handle.instance_id == 0:
            self.home.allocation_file(handle.job_id).unlink(missing_ok=True)
