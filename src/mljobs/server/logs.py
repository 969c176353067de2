"""Reading instance logs: a bounded tail, or a follow stream until the job ends."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from mljobs import logformat

__all__ = ["read_lines", "follow_lines"]


def _rendered(lines: Iterator[str], verbose: bool) -> Iterator[str]:
    for raw in lines:
        text = logformat.render(logformat.parse_record(raw), verbose)
        if text is not None:
            yield text


def read_lines(path: Path, limit: int = -1, verbose: bool = False) -> list[str]:
    """All rendered lines, or the last ``limit``; memory is bounded by ``limit`` when given."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8", errors="backslashreplace") as f:
        rendered = _rendered(iter(f), verbose)
        return list(deque(rendered, maxlen=limit)) if limit > 0 else list(rendered)


async def follow_lines(path: Path, finished: Callable[[], bool], verbose: bool = False,
                       limit: int = -1, poll_s: float = 0.2) -> AsyncIterator[str]:
    """Yield the log's rendered lines as they are written, until ``finished()`` and fully read."""
    for line in read_lines(path, limit, verbose) if limit > 0 else []:
        yield line + "\n"
    offset = path.stat().st_size if limit > 0 and path.exists() else 0
    partial = b""
    while True:
        done = finished()  # read the state before the file, so nothing written before the end is lost
        if path.exists() and os.path.getsize(path) > offset:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read(1 << 20)
                offset = f.tell()
            *lines, partial = (partial + chunk).split(b"\n")
            for raw in lines:
                text = logformat.render(logformat.parse_record(raw.decode("utf-8", "backslashreplace")), verbose)
                if text is not None:
                    yield text + "\n"
            continue
        if done:
            return
        await asyncio.sleep(poll_s)
