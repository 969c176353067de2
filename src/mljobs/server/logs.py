"""Reading instance logs: a bounded tail, all lines as a stream, or a follow until the job ends.

Nothing here holds a whole log in memory, and the follow stream does its file reads and status
checks in worker threads, never on the server's event loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from mljobs import logformat

__all__ = ["iter_lines", "tail_lines", "follow_lines"]

_CHUNK = 1 << 20
_TAIL_CHUNK = 1 << 16


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


def tail_lines(path: Path, limit: int, verbose: bool = False, before: int | None = None
               ) -> tuple[list[str], int, int]:
    """The last ``limit`` rendered lines that end before byte ``before`` (default: the log's end
    now), with the byte offsets where the first of them starts and where the last ends.

    A start of 0 means there is nothing earlier; a later call with ``before=start`` pages back.
    The end never splits a line: a line still being written is left to whoever follows from it.
    The file is read backwards from the end, so the cost is the tail's, not the log's.
    """
    if not path.exists():
        return [], 0, 0
    kept: list[tuple[int, str]] = []  # newest first
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        end = size if before is None else min(max(0, before), size)
        pending, lo, end_found = b"", end, False  # pending: bytes [lo, q), q the earliest line taken
        while lo > 0 and len(kept) < limit:
            n = min(_TAIL_CHUNK, lo)
            lo -= n
            f.seek(lo)
            data = f.read(n) + pending
            if not end_found:  # leave out an unfinished last line
                cut = data.rfind(b"\n")
                if cut < 0:
                    pending = data
                    continue
                end, data, end_found = lo + cut + 1, data[:cut + 1], True
            segs = data.split(b"\n")[:-1]  # data ends with a newline
            first_whole = 0 if lo == 0 else 1
            offset = lo + len(data)
            for raw in reversed(segs[first_whole:]):
                offset -= len(raw) + 1
                text = _render(raw.decode("utf-8", "backslashreplace"), verbose)
                if text is not None:
                    kept.append((offset, text + "\n"))
                    if len(kept) == limit:
                        break
            pending = segs[0] + b"\n" if first_whole else b""
        if not end_found:
            end = 0
    start = kept[-1][0] if len(kept) == limit else 0
    return [t for _, t in reversed(kept)], start, end


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read(_CHUNK)
            return chunk, offset + len(chunk)
    except FileNotFoundError:
        return b"", offset


async def follow_lines(path: Path, finished: Callable[[], bool], verbose: bool = False,
                       limit: int = -1, poll_s: float = 0.2,
                       keepalive_s: float = logformat.KEEPALIVE_S,
                       tail: tuple[list[str], int] | None = None) -> AsyncIterator[str]:
    """Yield the log's rendered lines as they are written, until ``finished()`` and fully read.

    With ``limit`` > 0 the stream starts with the last ``limit`` lines; ``tail`` (lines, the byte
    offset where they end, from :func:`tail_lines`) gives them read already. A quiet stretch of
    ``keepalive_s`` sends a ``KEEPALIVE`` line.
    """
    offset = 0
    if tail is None and limit > 0:
        lines, _, end = await run_in_threadpool(tail_lines, path, limit, verbose)
        tail = (lines, end)
    if tail is not None:
        offset = tail[1]
        if tail[0]:
            yield "".join(tail[0])
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
