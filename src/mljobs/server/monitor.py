"""Reconciliation: compare the store's live instances with what the providers see."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from mljobs.providers.base import InstanceHandle, Provider

__all__ = ["reconcile_once"]

log = logging.getLogger("mljobs.server")


def reconcile_once(
    live_instances: list[dict[str, Any]],
    provider_for: Callable[[str], Provider],
    pool_of: Callable[[str], str],
    on_exit: Callable[[InstanceHandle], None],
    now: dt.datetime,
    *,
    attach: bool = False,
    starting_grace: dt.timedelta = dt.timedelta(seconds=60),
    on_found: Callable[[InstanceHandle], None] | None = None,
    on_never_started: Callable[[dict[str, Any]], bool] | None = None,
) -> list[InstanceHandle]:
    """Finish every instance the store thinks is live but its provider says has ended.

    With ``attach`` (after a server start) also watch the ones still running, so their exit is
    noticed without polling. An instance without a stored handle (the server stopped between
    recording and starting it) is looked up with the provider's ``find``; ``on_found`` records
    the handle found. With ``attach``, one the provider is sure it never started goes to
    ``on_never_started`` (which starts it and says whether it did). Errors are isolated per
    instance. Returns the handles finished.
    """
    finished = []
    for inst in live_instances:
        try:
            provider = provider_for(pool_of(inst["job_id"]))
            if inst["handle"] is None:
                found = provider.find(inst["job_id"], inst["instance_id"])
                if found is None and attach and on_never_started is not None and provider.never_started(
                        inst["job_id"], inst["instance_id"]) and on_never_started(inst):
                    continue
                if found is None:
                    started = inst["started_time"]
                    if started is not None and now - started < starting_grace:
                        continue
                    handle = InstanceHandle(inst["job_id"], inst["instance_id"])
                    on_exit(handle)
                    finished.append(handle)
                    continue
                if on_found is not None:
                    on_found(found)
                inst = {**inst, "handle": found.to_dict()}
            handle = InstanceHandle.from_dict(inst["handle"])
            if attach and provider.watch(handle, on_exit):
                continue
            if provider.poll(handle) is not None:
                on_exit(handle)
                finished.append(handle)
        except Exception:  # noqa: BLE001 - one broken instance must not stop the others
            log.exception("reconcile: instance %s/%s", inst.get("job_id"), inst.get("instance_id"))
    return finished
