"""Wake long-polling waiters when a job changes, from any thread."""

from __future__ import annotations

import asyncio

__all__ = ["Notifier"]


class Notifier:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify(self, job_id: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake, job_id)

    def _wake(self, job_id: str) -> None:
        for fut in self._waiters.pop(job_id, ()):
            if not fut.done():
                fut.set_result(None)

    def register(self, job_id: str) -> asyncio.Future[None]:
        """Register before reading state, then await :meth:`wait` on the future."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(fut)
        return fut

    async def wait(self, job_id: str, fut: asyncio.Future[None], timeout: float) -> bool:
        """True if the job changed before ``timeout`` seconds."""
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self.discard(job_id, fut)

    def discard(self, job_id: str, fut: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                self._waiters.pop(job_id, None)
