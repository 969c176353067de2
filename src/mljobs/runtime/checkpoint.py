"""Keeping an instance's checkpoint folder (``MLJOBS_CHECKPOINT_DIR``) while it runs, for the
job's next attempt: on the stage by a remote node's agent, in the instance's run folder by a local
supervisor (the server keeps that copy on the stage if the instance is lost).

A folder is kept only once it has settled (the same files, sizes and times at two looks in a row),
so a file being written in place is not kept half-written: the last settled copy stays until
then. Each copy is made beside the kept one and renamed into place, so an instance lost mid-copy
leaves the previous copy whole.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Protocol

__all__ = ["Keeper", "LocalFolder", "SETTLED"]

SETTLED = "checkpoint.settled"  # a local supervisor's copy, in the instance's run folder


class Target(Protocol):
    """Where copies go: a :class:`mljobs.stages.Stage`, or a :class:`LocalFolder`."""

    def upload_dir(self, local: Path, prefix: str) -> object: ...
    def exists(self, prefix: str) -> bool: ...
    def move_dir(self, src: str, dst: str) -> object: ...
    def remove(self, prefix: str) -> object: ...


class LocalFolder:
    """A folder on this machine as a :class:`Target` (prefixes are paths under it)."""

    def __init__(self, root: os.PathLike[str] | str) -> None:
        self.root = Path(root)

    def upload_dir(self, local: Path, prefix: str) -> None:
        shutil.copytree(local, self.root / prefix, symlinks=True)

    def exists(self, prefix: str) -> bool:
        return (self.root / prefix).exists()

    def move_dir(self, src: str, dst: str) -> None:
        os.rename(self.root / src, self.root / dst)

    def remove(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)


class Keeper:
    """Keeps ``folder`` at ``prefix`` of ``target`` as it changes (:meth:`keep`: at most once
    every ``every_s``, and with ``every_s=0`` whatever it holds, at the end)."""

    def __init__(self, folder: Path, target: Target, prefix: str, who: str = "mljobs") -> None:
        self.folder, self.target, self.prefix, self.who = folder, target, prefix, who
        self.seen: list[tuple[str, int, int]] | None = None  # what the target holds
        self.looked: list[tuple[str, int, int]] | None = None  # what the last look found
        self.last = 0.0

    def _signature(self) -> list[tuple[str, int, int]] | None:
        try:
            return sorted((str(p.relative_to(self.folder)), st.st_size, st.st_mtime_ns)
                          for p in self.folder.rglob("*") if not p.is_symlink() and p.is_file()
                          for st in [p.stat()])
        except OSError:
            return None

    def keep(self, every_s: float) -> None:
        if time.monotonic() - self.last < every_s or not self.folder.is_dir():
            return
        self.last = time.monotonic()
        sig = self._signature()
        settled = every_s == 0.0 or sig == self.looked  # at the end, whatever it holds
        self.looked = sig
        if not sig or sig == self.seen or not settled:  # unreadable, empty (nothing to keep) or kept already
            return
        base = self.prefix.rstrip("/")
        part, old = f"{base}.part-{os.getpid()}/", f"{base}.old-{os.getpid()}/"
        try:
            self.target.upload_dir(self.folder, part)
            if self.target.exists(self.prefix):
                self.target.move_dir(self.prefix, old)
            self.target.move_dir(part, self.prefix)
            self.target.remove(old)
            self.seen = sig
        except OSError as e:
            self.target.remove(part)
            print(f"{self.who}: could not keep the checkpoint folder: {e}", file=sys.stderr)
