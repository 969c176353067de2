"""tail_lines: the last lines of a log read backwards, and paging back with ``before`` to the start."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mljobs import logformat
from mljobs.server import logs


@pytest.mark.parametrize("chunk", [7, 64, 1000, 1 << 16])
def test_tail_and_paging_back_match_a_forward_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(logs, "_TAIL_CHUNK", chunk)  # lines longer than a read, and many per read
    rng = random.Random(chunk)
    path = tmp_path / "0.log"
    for trial in range(150):
        records = [logformat.format_record(rng.choice(["out", "out", "err", "sys"]),
                                           "x" * rng.choice([0, 1, 5, 70, 300]) + f" {i}")
                   for i in range(rng.randint(0, 60))]
        whole = "".join(records).encode()
        unfinished = rng.random() < 0.3
        path.write_bytes(whole + (b"2026-01-01T00:00:00Z\tout\tstill being writ" if unfinished else b""))
        verbose, limit = rng.random() < 0.3, rng.randint(1, 20)
        offsets = [len("".join(records[:k]).encode()) for k in range(len(records))]
        shown = [(o, t + "\n") for o, r in zip(offsets, records)
                 if (t := logformat.render(logformat.parse_record(r), verbose)) is not None]

        got, start, end = logs.tail_lines(path, limit, verbose)
        assert got == [t for _, t in shown[-limit:]], trial
        assert end == len(whole), "the end is after the last whole line, never inside an unfinished one"
        assert start == (shown[-limit][0] if len(shown) >= limit else 0)
        every = got
        while start > 0:
            earlier, start, _ = logs.tail_lines(path, limit, verbose, before=start)
            every = earlier + every
        assert every == [t for _, t in shown], "paging back gives every line once, in order"


def test_missing_log_is_empty(tmp_path: Path) -> None:
    assert logs.tail_lines(tmp_path / "none.log", 10) == ([], 0, 0)
