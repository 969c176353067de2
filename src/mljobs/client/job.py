"""MLJob: the handle of one submitted job."""

from __future__ import annotations

import base64
import dataclasses
import importlib
import logging
import pickle
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import httpx

from mljobs import logformat
from mljobs.client import progress as _progress
from mljobs.client.session import Session, get_active_session
from mljobs.errors import (InvalidArgumentError, JobFailedError, NotFoundError, RemoteError, RemoteTraceback,
                           ServerUnavailableError)
from mljobs.status import JOB_STATUS, TERMINAL

__all__ = ["MLJob", "DistributedResult", "METRICS_COLUMNS", "GPU_METRICS_COLUMNS"]

METRICS_COLUMNS = ["time", "instance", "cpu_percent", "cpu_seconds", "rss_bytes", "peak_rss_bytes"]
GPU_METRICS_COLUMNS = ["gpu_util", "gpu_memory_bytes"]  # on instances with GPUs

log = logging.getLogger("mljobs")
if not log.handlers:  # progress on long waits, unless the application configured logging itself
    _h = logging.StreamHandler(sys.stderr)
    _h.setFormatter(logging.Formatter("mljobs: %(message)s"))
    log.addHandler(_h)
    log.setLevel(logging.INFO)
    log.propagate = False

_POLL_S = 30.0  # one long poll; the server answers at once when the job ends


def _rebuild(job_id: str, url: str | None) -> MLJob:
    active = get_active_session()
    session = active if url is None or active._url in (None, url) and active.url == url else Session(url)
    return MLJob(job_id, session)


class MLJob:
    """A job's handle: status, logs, wait, result, cancel. Pickles as (id, server address)."""

    def __init__(self, job_id: str, session: Session | None = None, info: dict[str, Any] | None = None) -> None:
        self._id = job_id
        self._session = session or get_active_session()
        self._info = info

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._id, self._session._url))

    def __repr__(self) -> str:
        status = self._info["status"] if self._info else "?"
        return f"MLJob(id={self._id!r}, status={status})"

    # -- state --------------------------------------------------------------------------------
    def _refresh(self) -> dict[str, Any]:
        self._info = self._session.request("GET", f"/jobs/{self._id}").json()
        return self._info

    def _cached(self) -> dict[str, Any]:
        return self._info if self._info is not None else self._refresh()

    @property
    def id(self) -> str:
        return self._id

    @property
    def name(self) -> str:
        return self._cached()["name"]

    @property
    def status(self) -> JOB_STATUS:
        info = self._info if self._info and self._info["status"] in TERMINAL else self._refresh()
        return JOB_STATUS(info["status"])

    @property
    def message(self) -> str:
        return self._refresh()["message"]

    @property
    def target_instances(self) -> int:
        return self._cached()["target_instances"]

    @property
    def min_instances(self) -> int:
        return self._cached()["min_instances"]

    @property
    def compute_pool(self) -> str:
        return self._cached()["compute_pool"]

    @property
    def instances_ran(self) -> int:
        """How many instances the job actually got (0 until it starts; >= min_instances after)."""
        return self._refresh()["instances_ran"]

    @property
    def attempt(self) -> int:
        """Which run of the job this is: 1, or more after an instance was lost (``max_retries``)."""
        return int(self._refresh().get("attempt") or 1)

    def get_ray_dashboard_url(self) -> str | None:
        """The Ray dashboard of a running multi-node job (None before its head node is up, after
        it ended, or when the dashboard is not installed: pip install 'ray[default]').

        With network namespaces (a server running as root) the address is the head's address on
        the job's own network, reachable from the job's instances."""
        return self._session.request("GET", f"/jobs/{self._id}/ray").json()["dashboard_url"]

    # -- waiting ------------------------------------------------------------------------------
    def wait(self, timeout: float = -1, *, progress: bool | None = None) -> JOB_STATUS:
        """Block until the job ends; returns its final status (FAILED does not raise).

        Raises TimeoutError if ``timeout`` seconds (>= 0) pass first. ``progress`` shows a live
        line (the job's id, status, time in it, and why it waits or what it prepares): None (the
        default) in a notebook or on a terminal only, True everywhere, False never. Without a
        progress line, the reason a pending job waits is logged (logger ``mljobs``) each time it
        changes.
        """
        return self._wait(timeout, progress, with_result=False)

    def _wait(self, timeout: float, progress: bool | None, *, with_result: bool) -> JOB_STATUS:
        """:meth:`wait`; ``with_result``: the server sends an ended job's result along (into ``_info``)."""
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        said = None
        shown = _progress.open_view(self, progress)  # shows nothing until the job is seen active
        poll = _POLL_S if shown is None else _progress.POLL_S
        first = True
        try:
            while True:
                left = poll if deadline is None else min(poll, deadline - time.monotonic())
                if left <= 0 and deadline is not None:
                    info = self._refresh()
                    if shown is not None:
                        shown.close(info)
                    if info["status"] in TERMINAL:
                        return JOB_STATUS(info["status"])
                    raise TimeoutError(f"job {self._id} is still {info['status']} after {timeout} s "
                                       f"({info['message'] or 'running'})")
                if first and shown is not None:
                    left = 0  # the line appears at once, not after the first poll
                first = False
                params: dict[str, Any] = {"timeout": max(left, 0)}
                if with_result:
                    params["result"] = "true"
                info = self._session.request("GET", f"/jobs/{self._id}/wait", params=params,
                                             timeout=max(left, 0) + 30).json()
                self._info = info
                if info["status"] in TERMINAL:
                    if shown is not None:
                        shown.close(info)
                    return JOB_STATUS(info["status"])
                if shown is not None:  # the line carries the pending reason
                    shown.observe(info)
                    continue
                note = f"job {self._id} is {info['status']}" + (f": {info['message']}" if info["message"] else "")
                if note != said and info["status"] == JOB_STATUS.PENDING:
                    log.info(note)
                    said = note
        finally:
            if shown is not None:
                shown.close()

    def result(self, timeout: float = -1, *, progress: bool | None = None) -> Any:
        """The job's return value; re-raises the job's exception with its remote traceback.

        ``progress`` as for :meth:`wait`."""
        status = self._wait(timeout, progress, with_result=True)
        if status == JOB_STATUS.DELETED:
            raise JobFailedError(f"job {self._id} was deleted", job_id=self._id, status=status.value)
        inline = self._info.pop("result", None) if self._info else None
        data = base64.b64decode(inline) if inline else self._session.request("GET", f"/jobs/{self._id}/result").content
        envelope = pickle.loads(data)
        if envelope["ok"]:
            return cloudpickle.loads(envelope["value"])
        raise _rebuild_exception(envelope) from RemoteTraceback(envelope["traceback"])

    def distributed_result(self, timeout: float = -1) -> DistributedResult:
        """Every instance's outcome of a ``parallel=True`` job: exit codes, each instance's
        ``__return__`` (None where it failed) and the first failure's exception (not raised)."""
        self.wait(timeout)
        info = self._refresh()
        if not info.get("parallel"):
            raise InvalidArgumentError(f"job {self._id} is not a parallel job: use result() (its head's value)")
        instances = sorted(info["instances"], key=lambda i: i["instance_id"])
        codes = [i["exit_code"] for i in instances]
        values: list[Any] = []
        errors: list[BaseException] = []  # instances whose payload raised, in instance order
        for inst in instances:
            try:
                envelope = pickle.loads(
                    self._session.request("GET", f"/jobs/{self._id}/results/{inst['instance_id']}").content)
            except NotFoundError:  # the instance never wrote one (killed, lost, or stopped early)
                envelope = None
            if envelope is not None and envelope["ok"]:
                values.append(cloudpickle.loads(envelope["value"]))
                continue
            values.append(None)
            if envelope is not None:
                exc = _rebuild_exception(envelope)
                exc.__cause__ = RemoteTraceback(envelope["traceback"])
                errors.append(exc)
        first: BaseException | None = errors[0] if errors else None
        if first is None and any(c != 0 for c in codes):  # none raised: one was killed or lost
            bad = next(i for i, c in enumerate(codes) if c != 0)
            first = JobFailedError(f"instance {bad} of job {self._id} exited with code {codes[bad]}: "
                                   f"{info['message']}", job_id=self._id, status=info["status"])
        return DistributedResult(codes, values, first)

    # -- logs ---------------------------------------------------------------------------------
    def _log_params(self, limit: int, instance_id: int | None, verbose: bool) -> dict[str, Any]:
        return {"limit": limit, "instance": instance_id or 0, "verbose": verbose}

    def get_metrics(self) -> Any:
        """Resource samples of every instance, as a pandas DataFrame with columns ``time`` (UTC),
        ``instance``, ``cpu_percent``, ``cpu_seconds``, ``rss_bytes``, ``peak_rss_bytes`` (and
        ``gpu_util``, ``gpu_memory_bytes`` on GPU instances). Live while the job runs; empty (with
        those columns) for a job that never ran."""
        import pandas as pd

        rows = self._session.request("GET", f"/jobs/{self._id}/metrics").json()
        columns = METRICS_COLUMNS + (GPU_METRICS_COLUMNS if any("gpu_util" in r for r in rows) else [])
        df = pd.DataFrame(rows, columns=columns)
        df["time"] = pd.to_datetime(df["time"], unit="s", utc=True)
        return df

    def get_logs(self, limit: int = -1, instance_id: int | None = None, *, as_list: bool = False,
                 verbose: bool = False, follow: bool = False) -> str | list[str]:
        """The instance's log (the head's by default): the last ``limit`` lines when > 0.

        ``verbose=False`` shows only the payload's own output; ``follow=True`` waits for the job
        to end and returns everything it wrote.
        """
        if follow:
            lines = list(self.stream_logs(instance_id, verbose=verbose))
        else:
            text = self._session.request("GET", f"/jobs/{self._id}/logs",
                                         params=self._log_params(limit, instance_id, verbose)).text
            lines = text.splitlines()
        if limit > 0:
            lines = lines[-limit:]
        return lines if as_list else "\n".join(lines)

    def stream_logs(self, instance_id: int | None = None, *, verbose: bool = False,
                    limit: int = -1) -> Iterator[str]:
        """Yield log lines as they are written, until the job ends."""
        client = self._session._http()
        params = {**self._log_params(limit, instance_id, verbose), "follow": True}
        # the server sends a keep-alive line when the job is quiet, so a silent stream is a dead one
        timeout = httpx.Timeout(60.0, read=3 * logformat.KEEPALIVE_S)
        try:
            with client.stream("GET", f"/jobs/{self._id}/logs", params=params, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise self._session._error(resp)
                for line in resp.iter_lines():
                    if line != logformat.KEEPALIVE:
                        yield line
        except httpx.TimeoutException:
            raise ServerUnavailableError(
                f"the log stream of job {self._id} went silent for {3 * logformat.KEEPALIVE_S:g} s (not even a "
                "keep-alive): the server or the connection is gone; call stream_logs again to resume") from None
        if self.status not in TERMINAL:
            raise ConnectionError(f"the log stream of job {self._id} ended before the job did")

    def show_logs(self, limit: int = -1, instance_id: int | None = None, *, verbose: bool = False,
                  follow: bool = False, progress: bool | None = None) -> None:
        """Print the instance's log; ``follow=True`` prints lines as they come until the job ends,
        with a progress line (``progress`` as for :meth:`wait`) while it queues, prepares and runs."""
        if not follow:
            print(self.get_logs(limit, instance_id, verbose=verbose))
            return
        shown = _progress.open_view(self, progress) if self.status not in TERMINAL else None
        if shown is None:
            for line in self.stream_logs(instance_id, verbose=verbose, limit=limit):
                print(line, flush=True)
            return
        with shown:
            self._follow_with_progress(shown, instance_id, verbose, limit)

    def _follow_with_progress(self, shown: _progress.JobProgress, instance_id: int | None, verbose: bool,
                              limit: int) -> None:
        """Print the stream (read by a thread) and refresh the progress line, both from here, so
        that every output comes from the caller's thread (a notebook routes it to the cell)."""
        lines: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()
        end = object()

        def read() -> None:
            try:
                for line in self.stream_logs(instance_id, verbose=verbose, limit=limit):
                    lines.put(line)
                    if stop.is_set():
                        return
                lines.put(end)
            except BaseException as e:  # noqa: BLE001 - raised again by the caller's thread
                lines.put(e)

        reader = threading.Thread(target=read, name=f"mljobs-logs-{self._id}", daemon=True)
        reader.start()
        shown.observe(self._refresh())
        next_poll = time.monotonic() + _progress.POLL_S
        try:
            while True:
                try:
                    item = lines.get(timeout=max(0.0, next_poll - time.monotonic()))
                except queue.Empty:
                    shown.observe(self._refresh())
                    next_poll = time.monotonic() + _progress.POLL_S
                    continue
                if item is end:
                    break
                if isinstance(item, BaseException):
                    raise item
                shown.print(item)
            shown.close(self._refresh())
        finally:
            stop.set()

    # -- control ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Cancel the job: PENDING ends CANCELLED at once; RUNNING stops its whole process tree."""
        self._info = self._session.request("POST", f"/jobs/{self._id}/cancel").json()


@dataclasses.dataclass
class DistributedResult:
    """What every instance of a parallel job did, in instance order."""

    exit_codes: list[int | None]
    results: list[Any]
    exception: BaseException | None  # the first failed instance's, with its remote traceback

    @property
    def ok(self) -> bool:
        return self.exception is None and all(c == 0 for c in self.exit_codes)

    def raise_for_failure(self) -> None:
        if self.exception is not None:
            raise self.exception


def _rebuild_exception(envelope: dict[str, Any]) -> BaseException:
    """The job's own exception object, else one of the same type, else a RemoteError."""
    if envelope.get("exc_pickle"):
        try:
            exc = pickle.loads(envelope["exc_pickle"])
            if isinstance(exc, BaseException):
                return exc
        except Exception:  # noqa: BLE001 - the type may not exist here
            pass
    module, _, qualname = envelope["exc_type"].rpartition(".")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            return obj(envelope["exc_message"])
    except Exception:  # noqa: BLE001
        pass
    return RemoteError(envelope["exc_type"], envelope["exc_message"], envelope["traceback"])
