"""Keeping an instance's checkpoint folder (``MLJOBS_CHECKPOINT_DIR``) while it runs, for the
job's next attempt: on the stage by a remote node's agent, in the instance's run folder by a local
supervisor (the server keeps that copy on the stage if the instance is lost).

A folder is kept only once it has settled (the same files, sizes and times at two looks in a row),
so a file being written in place is not kept half-written: the last settled copy stays until
then. Each copy is made beside the kept one and only then made the kept one, so an instance lost
mid-copy leaves the previous copy whole. In a local folder that is a rename. On a stage, where a
folder's "rename" on an object store is a copy of each file, each copy is a folder of its own
(``v-<hex>/``) and a one-object pointer (``CURRENT``) names the whole one: :class:`StageFolder`.
A folder with any file that changes at every look never settles while it runs: the copy kept is
then the last settled one, or none.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mljobs.errors import NotFoundError

if TYPE_CHECKING:
    from mljobs.stages import Stage

__all__ = ["Keeper", "LocalFolder", "StageFolder", "SETTLED"]

SETTLED = "checkpoint"  # a local supervisor's copies, in the instance's run folder: SETTLED/settled
CURRENT = "CURRENT"  # in a kept folder on a stage: the name of its whole copy
_VERSION = re.compile(r"v-(\d{1,9})-[0-9a-f]{16}")  # v-<attempt>-<hex>: a copy, and the attempt that made it
_POINTER_TMP = re.compile(rf"{CURRENT}\.(\d{{1,9}})\.[0-9a-f]{{8}}")  # a pointer being written, by an attempt


class Superseded(OSError):
    """A later attempt keeps the folder now: this (earlier, presumed lost) writer stops."""


def _attempt_of(entry: str) -> int:
    """The attempt that wrote an entry under a kept folder's prefix (0: not a copy or a pointer
    of ours, such as a folder from before pointers)."""
    m = _VERSION.fullmatch(entry) or _POINTER_TMP.fullmatch(entry)
    return int(m.group(1)) if m else 0


class StageFolder:
    """A folder kept whole on a stage at ``prefix``: each copy in a folder of its own, and the
    ``CURRENT`` object naming the last whole one. Writing one object is atomic on every stage (a
    rename of one file on a local folder, a PUT on S3), so a writer lost at any point leaves
    either the previous copy or the new one named; copies that no pointer names are removed by
    the next commit. Each copy carries the ``attempt`` that made it: a writer of an earlier
    attempt (a node presumed lost that still runs) never names its copy over a later attempt's,
    and never removes what a later attempt wrote."""

    def __init__(self, stage: Stage, prefix: str, attempt: int = 1) -> None:
        self.stage, self.prefix, self.attempt = stage, prefix.rstrip("/") + "/", attempt
        self.superseded = False

    def part(self) -> str:
        return f"{self.prefix}v-{self.attempt}-{uuid.uuid4().hex[:16]}/"

    def upload_dir(self, local: Path | str, part: str, link: bool = False) -> int:
        return self.stage.upload_dir(local, part, link=link)

    def commit(self, part: str) -> None:
        """Name ``part`` the kept copy. Raises (and ``part`` is then not named) only while the
        pointer is not written; what is removed after it is only tidying, which the next commit
        does again where it failed."""
        name = part[len(self.prefix):].rstrip("/")
        named = self._named()
        if named is not None and _attempt_of(named) > self.attempt:
            self.superseded = True
            raise Superseded(f"attempt {_attempt_of(named)} keeps {self.prefix} now; attempt {self.attempt} "
                             "(presumed lost) stops keeping it")
        tmp = f"{self.prefix}{CURRENT}.{self.attempt}.{uuid.uuid4().hex[:8]}"
        self.stage.put_bytes(tmp, name.encode())
        try:
            self.stage.rename(tmp, self.prefix + CURRENT)
        except BaseException:
            self._quietly(lambda: self.stage.remove(tmp))
            raise
        for entry in self._entries() - {name, CURRENT}:
            if _attempt_of(entry) <= self.attempt:  # a later attempt's copy under way is its own
                self._quietly(lambda entry=entry: self.stage.remove(self.prefix + entry))

    def _quietly(self, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - tidying only: the kept copy is named already
            print(f"mljobs: could not tidy the checkpoint folder {self.prefix}: {e}", file=sys.stderr)

    def discard(self, part: str) -> None:
        self.stage.remove(part)

    def keep(self, local: Path | str, link: bool = False) -> int:
        """Make a copy of ``local`` the kept one; returns its file count."""
        part = self.part()
        try:
            n = self.upload_dir(local, part, link=link)
            self.commit(part)
        except BaseException:
            self.discard(part)
            raise
        return n

    def kept(self) -> str | None:
        """The stage prefix of the whole copy kept here; None when there is none. A folder from
        before pointers (files right under ``prefix``) is its own copy."""
        name = self._named()
        if name is None or not _VERSION.fullmatch(name):
            entries = self._entries()
            if entries and not any(_VERSION.fullmatch(e) for e in entries):
                return self.prefix  # the old layout (a file of the job's own may be called CURRENT)
            if name is None:
                return None
            # the job may write on its stage: a pointer is never a path
            print(f"mljobs: the checkpoint pointer {self.prefix}{CURRENT} names {name[:80]!r}, not a copy; "
                  "nothing is restored", file=sys.stderr)
            return None
        return f"{self.prefix}{name}/"

    def _named(self) -> str | None:
        """What the pointer says (None: no pointer). Any error but its absence is raised: a copy
        that could not be read is not "no copy"."""
        try:
            return self.stage.get_bytes(self.prefix + CURRENT).decode("ascii", "replace").strip()
        except NotFoundError:
            return None

    def restore(self, local: Path | str) -> bool:
        """Download the kept copy into ``local``; False when there is none."""
        kept = self.kept()
        if kept is None or not self.stage.exists(kept):
            return False
        self.stage.download_dir(kept, local)
        return True

    def _entries(self) -> set[str]:
        """The names right under ``prefix`` (copies, pointers, anything a lost writer left)."""
        try:
            listed = self.stage.list(self.prefix)
        except NotFoundError:
            return set()
        names = {f["name"][len(self.prefix):].split("/", 1)[0] for f in listed if f["name"].startswith(self.prefix)}
        names.discard("")  # a folder's own placeholder object, which some S3 tools make
        return names


class LocalFolder:
    """A folder of this machine's as a :class:`Target`, whose copies a child process makes as the
    job's ``uid`` (the payload owns the folder it copies: as root, a link it swaps in mid-copy
    would have root copy what the job may not read), while the caller goes on (a large folder
    does not hold up its logs). ``reaped``: where the caller's own reaping of children puts their
    statuses (the supervisor's), for a copy it reaped first."""

    NAME = "settled"  # the kept copy, in ``root``
    superseded = False  # one supervisor per run folder: no later writer (see StageFolder)

    def __init__(self, root: os.PathLike[str] | str, uid: int | None = None,
                 reaped: dict[int, int] | None = None) -> None:
        self.root, self.uid, self.reaped = Path(root), uid, reaped if reaped is not None else {}
        self.root.mkdir(mode=0o700, exist_ok=True)
        if uid is not None and self.root.stat().st_uid != uid:
            os.chown(self.root, uid, uid)  # the copying child writes here; no job sees the run folder

    @classmethod
    def kept(cls, root: os.PathLike[str] | str) -> Path | None:
        """The whole copy kept in ``root``: ``settled``, or, where a supervisor was lost between
        its two renames, the previous copy it had renamed aside whole (``settled.old-PID``)."""
        settled = Path(root) / cls.NAME
        if settled.is_dir():
            return settled
        aside = sorted(Path(root).glob(f"{cls.NAME}.old-*"), key=lambda p: p.stat().st_mtime)
        return aside[-1] if aside else None

    def part(self) -> str:
        return f"{self.NAME}.part-{os.getpid()}"

    def commit(self, part: str) -> None:
        """Rename the copy into place (renames on one file system are atomic; see :meth:`kept`)."""
        settled, old = self.root / self.NAME, self.root / f"{self.NAME}.old-{os.getpid()}"
        if settled.exists():
            os.rename(settled, old)
        os.rename(self.root / part, settled)
        shutil.rmtree(old, ignore_errors=True)  # fd-based: it follows no link

    def discard(self, part: str) -> None:
        shutil.rmtree(self.root / part, ignore_errors=True)

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



class Keeper:
    """Keeps ``folder`` in ``target`` as it changes (:meth:`keep`: at most once every ``every_s``,
    and with ``every_s=0`` whatever it holds, at the end)."""

    def __init__(self, folder: Path, target: StageFolder | LocalFolder, who: str = "mljobs") -> None:
        self.folder, self.target, self.who = folder, target, who
        self.seen: list[tuple[str, int, int]] | None = None  # what the target holds
        self.looked: list[tuple[str, int, int]] | None = None  # what the last look found
        self.last = 0.0
        self.pending: tuple[int, str, list[tuple[str, int, int]]] | None = None  # a copy under way: pid, part, of what

    def _signature(self) -> list[tuple[str, int, int]] | None:
        try:
            return sorted((str(p.relative_to(self.folder)), st.st_size, st.st_mtime_ns)
                          for p in self.folder.rglob("*") if not p.is_symlink() and p.is_file()
                          for st in [p.lstat()])
        except OSError:
            return None

    def keep(self, every_s: float) -> None:
        if self.target.superseded:
            return  # a later attempt keeps the folder
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
        target = self.target
        if isinstance(target, StageFolder):  # copied now
            if self._guard(lambda: target.keep(self.folder)):
                self.seen = sig
            return
        part = target.part()
        self._guard(lambda: target.discard(part))  # what a copy stopped mid-way left
        self.pending = (target.start_copy(self.folder, part), part, sig)

    def _finish(self) -> bool:
        """Whether the copy under way has ended (made the kept one if it succeeded)."""
        assert self.pending is not None and isinstance(self.target, LocalFolder)
        pid, part, sig = self.pending
        ok = self.target.copied(pid)
        if ok is None:
            return False
        self.pending = None
        if ok:
            self._commit(part, sig)
        else:
            self._guard(lambda: self.target.discard(part))
        return True

    def _commit(self, part: str, sig: list[tuple[str, int, int]]) -> None:
        if self._guard(lambda: self.target.commit(part)):
            self.seen = sig
        else:
            self._guard(lambda: self.target.discard(part))

    def _guard(self, step: Callable[[], object]) -> bool:
        try:
            step()
            return True
        except OSError as e:
            print(f"{self.who}: could not keep the checkpoint folder: {e}", file=sys.stderr)
            return False

    def close(self) -> None:
        """Stop a copy still under way (the instance has ended; the last settled copy stays)."""
        if self.pending is not None and isinstance(self.target, LocalFolder):
            pid, part, _ = self.pending
            self.target.stop(pid)
            self.pending = None
            self._guard(lambda: self.target.discard(part))
