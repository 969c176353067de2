"""Reading instance logs: a bounded tail, all lines as a stream, or a follow until the job ends.

Nothing here holds a whole log in memory, and the follow stream does its file reads and status
checks in worker threads, never on the server's event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from mljobs import logformat

__all__ = ["iter_lines", "follow_lines"]

_CHUNK = 1 << 20


def _render(raw: str, verbose: bool) -> str | None:
    return logformat.render(logformat.parse_record(raw), verbose)


def iter_lines(path: Path, limit: int = -1, verbose: bool = False) -> Iterator[str]:
    """The rendered lines, each ending in a newline: all of them as a stream, or the last ``limit``
    (memory bounded by ``limit``)."""
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="backslashreplace") as f:
        rendered = (t + "\n" for t in (_render(raw, verbose) for raw in f) if t is not None)
        yield from (deque(rendered, maxlen=limit) if limit > 0 else rendered)


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read(_CHUNK)
            return chunk, offset + len(chunk)
    except FileNotFoundError:
        return b"", offset


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def follow_lines(path: Path, finished: Callable[[], bool], verbose: bool = False,
                       limit: int = -1, poll_s: float = 0.2,
                       keepalive_s: float = logformat.KEEPALIVE_S) -> AsyncIterator[str]:
    """Yield the log's rendered lines as they are written, until ``finished()`` and fully read.

    With ``limit`` > 0 the stream starts with the last ``limit`` lines. A quiet stretch of
    ``keepalive_s`` sends a ``KEEPALIVE`` line.
    """
    offset = 0
    if limit > 0:
        offset = await run_in_threadpool(_size, path)
        for line in await run_in_threadpool(lambda: list(iter_lines(path, limit, verbose))):
            yield line
    partial = b""
    quiet_since = time.monotonic()
    while True:
        done = await run_in_threadpool(finished)  # the state before the file: nothing written before the end is lost
        chunk, offset = await run_in_threadpool(_read_from, path, offset)
        if chunk:
            *lines, partial = (partial + chunk).split(b"\n")
            out = [t for t in (_render(raw.decode("utf-8", "backslashreplace"), verbose) for raw in lines)
                   if t is not None]
            if out:
                quiet_since = time.monotonic()
                yield "".join(t + "\n" for t in out)
            continue
        if done:
            return
        if time.monotonic() - quiet_since >= keepalive_s:
            quiet_since = time.monotonic()
            yield logformat.KEEPALIVE + "\n"
        await asyncio.sleep(poll_s)
