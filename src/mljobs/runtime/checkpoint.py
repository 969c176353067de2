"""Keeping an instance's checkpoint folder (``MLJOBS_CHECKPOINT_DIR``) while it runs, for the
job's next attempt: on the stage by a remote node's agent, in the instance's run folder by a local
supervisor (the server keeps that copy on the stage if the instance is lost).

A folder is kept only once it has settled (the same files, sizes and times at two looks in a row),
so a file being written in place is not kept half-written: the last settled copy stays until
then. Each copy is made beside the kept one and renamed into place, so an instance lost mid-copy
leaves the previous copy whole. A folder with any file that changes at every look never settles
while it runs: the copy kept is then the last settled one, or none.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

__all__ = ["Keeper", "LocalFolder", "SETTLED"]

SETTLED = "checkpoint"  # a local supervisor's copies, in the instance's run folder: SETTLED/settled


class Target(Protocol):
    """Where copies go: a :class:`mljobs.stages.Stage` (copied at once), or a :class:`LocalFolder`."""

    def upload_dir(self, local: Path, prefix: str) -> object: ...
    def exists(self, prefix: str) -> bool: ...
    def move_dir(self, src: str, dst: str) -> object: ...
    def remove(self, prefix: str) -> object: ...


class LocalFolder:
    """A folder of this machine's as a :class:`Target`, whose copies a child process makes as the
    job's ``uid`` (the payload owns the folder it copies: as root, a link it swaps in mid-copy
    would have root copy what the job may not read), while the caller goes on (a large folder
    does not hold up its logs). ``reaped``: where the caller's own reaping of children puts their
    statuses (the supervisor's), for a copy it reaped first."""

    def __init__(self, root: os.PathLike[str] | str, uid: int | None = None,
                 reaped: dict[int, int] | None = None) -> None:
        self.root, self.uid, self.reaped = Path(root), uid, reaped if reaped is not None else {}
        self.root.mkdir(mode=0o700, exist_ok=True)
        if uid is not None and self.root.stat().st_uid != uid:
            os.chown(self.root, uid, uid)  # the copying child writes here; no job sees the run folder

    def start_copy(self, local: Path, prefix: str) -> int:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                # both folders opened first: the uid need not pass through the folders above them
                src = os.open(local, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                dst = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                if self.uid is not None:
                    os.setgroups([])
                    os.setresgid(self.uid, self.uid, self.uid)
                    os.setresuid(self.uid, self.uid, self.uid)
                shutil.copytree(f"/proc/self/fd/{src}", f"/proc/self/fd/{dst}/{prefix}", symlinks=True)
                code = 0
            except BaseException as e:  # noqa: BLE001
                print(f"mljobs supervisor: could not copy the checkpoint folder: {e}", file=sys.stderr)
            finally:
                os._exit(code)
        return pid

    def copied(self, pid: int) -> bool | None:
        """Whether the copy ``pid`` succeeded (None: still copying)."""
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, self.reaped.get(pid, 1)
        if done == 0:
            return None
        return os.waitstatus_to_exitcode(status) == 0

    def stop(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def exists(self, prefix: str) -> bool:
        return (self.root / prefix).exists()

    def move_dir(self, src: str, dst: str) -> None:
        os.rename(self.root / src, self.root / dst)

    def remove(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)  # fd-based: it follows no link


class Keeper:
    """Keeps ``folder`` at ``prefix`` of ``target`` as it changes (:meth:`keep`: at most once
    every ``every_s``, and with ``every_s=0`` whatever it holds, at the end)."""

    def __init__(self, folder: Path, target: Target, prefix: str, who: str = "mljobs") -> None:
        self.folder, self.target, self.prefix, self.who = folder, target, prefix, who
        self.seen: list[tuple[str, int, int]] | None = None  # what the target holds
        self.looked: list[tuple[str, int, int]] | None = None  # what the last look found
        self.last = 0.0
        self.pending: tuple[int, list[tuple[str, int, int]]] | None = None  # a copy under way, and of what
        base = prefix.rstrip("/")
        self.part, self.old = f"{base}.part-{os.getpid()}/", f"{base}.old-{os.getpid()}/"

    def _signature(self) -> list[tuple[str, int, int]] | None:
        try:
            return sorted((str(p.relative_to(self.folder)), st.st_size, st.st_mtime_ns)
                          for p in self.folder.rglob("*") if not p.is_symlink() and p.is_file()
                          for st in [p.lstat()])
        except OSError:
            return None

    def keep(self, every_s: float) -> None:
        if self.pending is not None and not self._finish():
            return  # a copy is still under way
        if time.monotonic() - self.last < every_s or not self.folder.is_dir():
            return
        self.last = time.monotonic()
        sig = self._signature()
        settled = every_s == 0.0 or sig == self.looked  # at the end, whatever it holds
        self.looked = sig
        if not sig or sig == self.seen or not settled:  # unreadable, empty (nothing to keep) or kept already
            return
        self._guard(lambda: self.target.remove(self.part))
        start: Callable[[Path, str], int] | None = getattr(self.target, "start_copy", None)
        if start is None:  # a stage: copied now
            if self._guard(lambda: self.target.upload_dir(self.folder, self.part)):
                self._swap(sig)
            return
        self.pending = (start(self.folder, self.part), sig)

    def _finish(self) -> bool:
        """Whether the copy under way has ended (swapped into place if it succeeded)."""
        assert self.pending is not None
        pid, sig = self.pending
        ok = self.target.copied(pid)  # type: ignore[attr-defined]
        if ok is None:
            return False
        self.pending = None
        if ok:
            self._swap(sig)
        else:
            self._guard(lambda: self.target.remove(self.part))
        return True

    def _swap(self, sig: list[tuple[str, int, int]]) -> None:
        def swap() -> None:
            if self.target.exists(self.prefix):
                self.target.move_dir(self.prefix, self.old)
            self.target.move_dir(self.part, self.prefix)
            self.target.remove(self.old)

        if self._guard(swap):
            self.seen = sig
        else:
            self._guard(lambda: self.target.remove(self.part))

    def _guard(self, step: Callable[[], object]) -> bool:
        try:
            step()
            return True
        except OSError as e:
            print(f"{self.who}: could not keep the checkpoint folder: {e}", file=sys.stderr)
            return False

    def close(self) -> None:
        """Stop a copy still under way (the instance has ended; the last settled copy stays)."""
        if self.pending is not None:
            self.target.stop(self.pending[0])  # type: ignore[attr-defined]
            self.pending = None
            self._guard(lambda: self.target.remove(self.part))
