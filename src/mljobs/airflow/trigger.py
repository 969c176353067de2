"""MLJobTrigger: waits for an mljobs job in Airflow's triggerer, over the mljobs HTTP API, holding no worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from airflow.triggers.base import BaseTrigger, TriggerEvent

from mljobs.airflow.hook import MLJobsHook, SessionSettings, settings_from_connection
from mljobs.status import TERMINAL

__all__ = ["MLJobTrigger", "TIMED_OUT"]

TIMED_OUT = "TIMED_OUT"  # the event's status when the operator's timeout passed (the job was cancelled)
_TERMINAL = {s.value for s in TERMINAL}
_MAX_POLL_S = 300.0  # the server's longest long poll
_UNREACHABLE_S = 300.0  # how long the server may be unreachable before the trigger gives up


class MLJobTrigger(BaseTrigger):
    """Fires once the job is terminal (or its deadline passed: then it cancels the job first).

    Args:
        job_id: the job (``MLJOB_...``).
        url: the control plane's URL.
        mljobs_conn_id: the Airflow connection whose password is the token (read in the triggerer,
            so the token is not stored with the trigger); or
        token: the token itself, when the task had no connection.
        poll_interval: seconds per long poll (the server answers at once when the job ends).
        deadline: a UNIX time after which the job is cancelled and the event says ``TIMED_OUT``.
    """

    def __init__(self, job_id: str, url: str, mljobs_conn_id: str | None = None, token: str | None = None,
                 poll_interval: float = 30.0, deadline: float | None = None) -> None:
        super().__init__()
        self.job_id, self.url, self.mljobs_conn_id, self.token = job_id, url, mljobs_conn_id, token
        self.poll_interval, self.deadline = float(poll_interval), deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("mljobs.airflow.trigger.MLJobTrigger",
                {"job_id": self.job_id, "url": self.url, "mljobs_conn_id": self.mljobs_conn_id,
                 "token": self.token, "poll_interval": self.poll_interval, "deadline": self.deadline})

    async def _client(self) -> httpx.AsyncClient:
        token = self.token
        if self.mljobs_conn_id is not None:
            settings: SessionSettings = settings_from_connection(
                await MLJobsHook.aget_connection(self.mljobs_conn_id))
            token = settings.token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url + "/api/v1", headers=headers, timeout=60.0)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async with await self._client() as client:
            unreachable_since: float | None = None
            while True:
                left = None if self.deadline is None else self.deadline - time.time()
                if left is not None and left <= 0:
                    yield TriggerEvent(await self._cancel(client, "its timeout passed"))
                    return
                wait = min(self.poll_interval, _MAX_POLL_S, left if left is not None else _MAX_POLL_S)
                try:
                    resp = await client.get(f"/jobs/{self.job_id}/wait", params={"timeout": max(wait, 0.0)},
                                            timeout=wait + 30)
                except httpx.TransportError as e:  # a server restart: jobs survive it, so keep waiting
                    unreachable_since = unreachable_since or time.monotonic()
                    if time.monotonic() - unreachable_since > _UNREACHABLE_S:
                        yield TriggerEvent({"job_id": self.job_id, "status": "UNREACHABLE",
                                            "message": f"no mljobs server answered at {self.url} for "
                                                       f"{_UNREACHABLE_S:.0f} s: {e}"})
                        return
                    self.log.warning("mljobs server at %s unreachable (%s); retrying", self.url, e)
                    await asyncio.sleep(min(self.poll_interval, 5.0))
                    continue
                unreachable_since = None
                if resp.status_code >= 400:
                    yield TriggerEvent({"job_id": self.job_id, "status": "ERROR",
                                        "message": f"HTTP {resp.status_code} from {self.url}: {resp.text[:500]}"})
                    return
                info = resp.json()
                if info["status"] in _TERMINAL:
                    yield TriggerEvent({"job_id": self.job_id, "status": info["status"], "message": info["message"]})
                    return

    async def _cancel(self, client: httpx.AsyncClient, why: str) -> dict[str, Any]:
        now = await client.get(f"/jobs/{self.job_id}")
        if now.status_code < 400 and now.json()["status"] in _TERMINAL:  # it ended in time: say how
            return {"job_id": self.job_id, "status": now.json()["status"], "message": now.json()["message"]}
        resp = await client.post(f"/jobs/{self.job_id}/cancel")
        status = resp.json().get("status") if resp.status_code < 400 else None
        return {"job_id": self.job_id, "status": TIMED_OUT,
                "message": f"cancelled job {self.job_id} because {why} (it was {status or 'unknown'})"}

    async def on_kill(self) -> None:
        """The deferred task was marked failed/success or cleared: stop the job it waits on."""
        async with await self._client() as client:
            resp = await client.post(f"/jobs/{self.job_id}/cancel")
            self.log.info("cancelled mljobs job %s (HTTP %s)", self.job_id, resp.status_code)
