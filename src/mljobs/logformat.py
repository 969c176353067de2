"""The instance log line format, written by the supervisor and read by the server.

One line per record: ``<UTC ISO time>\\t<stream>\\t<text>``. Streams: ``out`` and ``err`` are
the payload's own output; ``sys`` lines come from mljobs itself (shown with verbose=True).
"""

from __future__ import annotations

import datetime as _dt
from typing import NamedTuple

__all__ = ["LogRecord", "format_record", "parse_record", "render", "OUT", "ERR", "SYS", "KEEPALIVE",
           "KEEPALIVE_S"]

OUT, ERR, SYS = "out", "err", "sys"
# A followed log stream sends this line (ASCII SYN, "synchronous idle") when nothing was written
# for a while (the server's MLJOBS_LOG_KEEPALIVE_S, at most KEEPALIVE_S), so a client tells a
# quiet job from a dead connection; clients drop it.
KEEPALIVE = "\x16"
KEEPALIVE_S = 10.0


class LogRecord(NamedTuple):
    time: str
    stream: str
    text: str


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_record(stream: str, text: str, time: str | None = None) -> str:
    return f"{time or now_iso()}\t{stream}\t{text}\n"


def parse_record(line: str) -> LogRecord:
    parts = line.rstrip("\n").split("\t", 2)
    if len(parts) != 3:  # a line not written by the supervisor: treat as output
        return LogRecord("", OUT, line.rstrip("\n"))
    return LogRecord(*parts)


def render(rec: LogRecord, verbose: bool) -> str | None:
    """The text a user sees for one record, or None when verbose=False hides it."""
    if verbose:
        return f"{rec.time} [{rec.stream}] {rec.text}"
    if rec.stream == SYS:
        return None
    return rec.text
