"""Stages: named storage locations addressed as ``@stage/path``, backed by fsspec.

A stage is a root URL (a local folder, ``s3://bucket/prefix``, any fsspec URL). Every read
and write of stage content goes through :class:`Stage`.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import stat
import tarfile
from pathlib import Path
from typing import IO, Any

import fsspec

from mljobs.errors import InvalidArgumentError, NotFoundError, PayloadTooLargeError
from mljobs.spec import check_stage_name

__all__ = ["Stage", "parse_stage_path", "SKIP_NAMES"]

SKIP_NAMES = ("__pycache__",)  # never uploaded; nor are *.pyc files


def skip(name: str) -> bool:
    return name in SKIP_NAMES or name.endswith(".pyc")


def parse_stage_path(value: str) -> tuple[str, str]:
    """``"@stage/a/b/"`` -> ``("STAGE", "a/b/")``; the error shows the expected form."""
    if not isinstance(value, str) or not value.startswith("@") or len(value) < 2 or "\x00" in value:
        raise InvalidArgumentError(f"stage path {value!r} must look like '@stage_name/path'")
    name, _, path = value[1:].partition("/")
    clean = posixpath.normpath(path) if path else ""
    if clean.startswith("..") or clean.startswith("/"):
        raise InvalidArgumentError(f"stage path {value!r} leaves its stage")
    if clean == ".":
        clean = ""
    if path.endswith("/") and clean:
        clean += "/"
    return check_stage_name(name), clean


class Stage:
    """One stage's storage. Paths are relative to the stage root and use '/'."""

    def __init__(self, name: str, url: str) -> None:
        self.name, self.url = name, url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")

    def _p(self, path: str) -> str:
        path = path.lstrip("/")
        return f"{self.root}/{path}" if path else self.root

    def ensure(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def exists(self, path: str) -> bool:
        return self.fs.exists(self._p(path))

    def local_path(self, path: str) -> str | None:
        """Where ``path`` is on this machine's file system, for a stage that is a local folder
        (None for any other fsspec URL)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return self._p(path) if protocol in ("file", "local") else None

    def size(self, path: str) -> int:
        """A file's size in bytes (FileNotFoundError when it is not there)."""
        return int(self.fs.size(self._p(path)))

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(self._p(path))

    def put_bytes(self, path: str, data: bytes) -> None:
        full = self._p(path)
        self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        self.fs.pipe_file(full, data)

    def put_stream(self, path: str, src: IO[bytes], max_bytes: int | None = None) -> int:
        """Copy ``src`` to ``path`` chunk by chunk; more than ``max_bytes`` removes the partial file
        and raises PayloadTooLargeError. Returns the size written."""
        full = self._p(path)
        self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        size = 0
        try:
            with self.fs.open(full, "wb") as dst:
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise PayloadTooLargeError(
                            f"@{self.name}/{path} is larger than the server accepts ({max_bytes} bytes); an admin "
                            "raises the cap with MLJOBS_MAX_PAYLOAD_MB")
                    dst.write(chunk)
        except BaseException:
            if self.fs.exists(full):
                self.fs.rm(full)
            raise
        return size

    def iter_chunks(self, path: str, chunk_size: int = 1 << 20) -> Any:
        """A file's bytes, chunk by chunk (for streaming answers)."""
        if self.isdir(path):
            raise InvalidArgumentError(f"@{self.name}/{path} is a folder; `mljobs stage ls @{self.name}/{path}` lists "
                                       "its files, and each is fetched on its own")
        f = self.open(path)

        def chunks() -> Any:
            with f:
                while chunk := f.read(chunk_size):
                    yield chunk

        return chunks()

    def put_local(self, path: str, local: str | os.PathLike[str]) -> None:
        full = self._p(path)
        self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        self.fs.put_file(str(local), full)

    def get_bytes(self, path: str) -> bytes:
        try:
            return self.fs.cat_file(self._p(path))
        except FileNotFoundError:
            raise NotFoundError(f"@{self.name}/{path} does not exist") from None

    def open(self, path: str) -> Any:
        try:
            return self.fs.open(self._p(path), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"@{self.name}/{path} does not exist") from None

    def list(self, prefix: str = "") -> list[dict[str, Any]]:
        """Files under ``prefix`` (a folder or one file), with sizes, relative to the stage root."""
        full = self._p(prefix)
        if not self.fs.exists(full):
            raise NotFoundError(
                f"@{self.name}/{prefix} does not exist; `mljobs stage ls @{self.name}/` lists what does"
            )
        if not self.fs.isdir(full):
            info = self.fs.info(full)
            return [{"name": prefix.rstrip("/"), "size": info.get("size", 0)}]
        out = []
        for p, info in sorted(self.fs.find(full, detail=True).items()):
            rel = p[len(self.root) + 1 :] if p.startswith(self.root + "/") else p
            out.append({"name": rel, "size": info.get("size", 0)})
        return out

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> None:
        """Copy every file under ``prefix`` into ``local_dir``, keeping the tree (and, from a local
        stage, each file's mode: a script's executable bit)."""
        base = self._p(prefix).rstrip("/")
        local = Path(local_dir)
        is_local = self.local_path(prefix) is not None
        for p in self.fs.find(base):
            rel = p[len(base) + 1 :]
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if is_local:  # the permission bits only: never a setuid or setgid bit from a stage file
                shutil.copyfile(p, target)
                os.chmod(target, os.stat(p).st_mode & 0o777)
            else:
                self.fs.get_file(p, str(target))

    def upload_dir(self, local_dir: str | os.PathLike[str], prefix: str, link: bool = False) -> int:
        """Make ``prefix`` hold exactly the regular files under ``local_dir`` (what was there goes
        first); links and anything but plain files are left out, so a folder a job wrote can never
        make this process copy a file it points at. With ``link``, on a local stage of the same file
        system the files are hard links (a checkpoint of gigabytes costs nothing; only for a folder
        whose writer has ended). Returns the file count."""
        self.remove(prefix)
        root, n = Path(local_dir), 0
        target = self.local_path(prefix) if link else None
        for dirpath, _dirs, filenames in os.walk(root):  # never follows links
            rel = Path(dirpath).relative_to(root).as_posix()
            for f in filenames:
                path = os.path.join(dirpath, f)
                name = f"{prefix.rstrip('/')}/{'' if rel == '.' else rel + '/'}{f}"
                try:
                    if not stat.S_ISREG(os.lstat(path).st_mode):
                        continue
                except OSError:
                    continue
                if target is not None:
                    dest = self._p(name)
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    try:
                        os.link(path, dest, follow_symlinks=False)
                        n += 1
                        continue
                    except OSError:
                        pass  # another file system: copied
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:
                    continue
                with os.fdopen(fd, "rb") as src:
                    if stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                        self.put_stream(name, src)
                        n += 1
        return n

    def copy_dir(self, src_prefix: str, dst: Stage, dst_prefix: str) -> int:
        """Copy a folder to another place (possibly another stage); returns the file count. Between
        local folders on one file system the files are hard links (payload files are never changed
        in place, only removed)."""
        base = self._p(src_prefix).rstrip("/")
        src_local, dst_local = self.local_path(src_prefix), dst.local_path(dst_prefix)
        if src_local is not None and dst_local is not None:
            try:
                return _link_tree(Path(src_local), Path(dst_local))
            except OSError:
                dst.remove(dst_prefix)  # another file system: copied below
        n = 0
        for p in self.fs.find(base):
            rel = p[len(base) + 1 :]
            if any(skip(part) for part in rel.split("/")):
                continue
            dst.put_bytes(f"{dst_prefix.rstrip('/')}/{rel}", self.fs.cat_file(p))
            n += 1
        return n

    def extract_tar(self, fileobj: IO[bytes], prefix: str, max_bytes: int | None = None) -> list[str]:
        """Unpack a tar stream under ``prefix``, member by member (never a whole member in memory);
        refuses members that leave it, and more than ``max_bytes`` in all."""
        try:
            return self._extract_tar(fileobj, prefix, max_bytes)
        except tarfile.TarError as e:
            raise InvalidArgumentError(f"the payload is not a readable tar archive ({e}); submit it with the "
                                       "mljobs client (submit_file, submit_directory or @remote)") from None

    def _extract_tar(self, fileobj: IO[bytes], prefix: str, max_bytes: int | None) -> list[str]:
        names = []
        total = 0
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = posixpath.normpath(member.name)
                if name.startswith("..") or name.startswith("/"):
                    raise InvalidArgumentError(f"payload member {member.name!r} leaves the payload folder")
                f = tar.extractfile(member)
                assert f is not None  # isfile() above
                left = None if max_bytes is None else max_bytes - total
                total += self.put_stream(f"{prefix.rstrip('/')}/{name}", f, left)
                names.append(name)
        return names

    def copy_file(self, src: str, dst: str) -> None:
        """Copy one file within the stage (in the kernel on a local folder, server-side on a bucket)."""
        full = self._p(dst)
        self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        src_local = self.local_path(src)
        if src_local is not None:
            shutil.copyfile(src_local, full)
        else:
            self.fs.copy(self._p(src), full)

    def rename(self, src: str, dst: str) -> None:
        """Move one file within the stage (atomic on a local folder)."""
        src_local, dst_local = self.local_path(src), self.local_path(dst)
        if src_local is not None and dst_local is not None:
            os.makedirs(os.path.dirname(dst_local), exist_ok=True)
            os.replace(src_local, dst_local)
        else:
            self.fs.mv(self._p(src), self._p(dst))

    def move_dir(self, src_prefix: str, dst_prefix: str) -> None:
        """Make the folder ``src_prefix`` the folder ``dst_prefix`` (a rename on a local folder)."""
        src_local, dst_local = self.local_path(src_prefix), self.local_path(dst_prefix)
        if src_local is not None and dst_local is not None:
            os.makedirs(os.path.dirname(dst_local.rstrip("/")), exist_ok=True)
            os.rename(src_local.rstrip("/"), dst_local.rstrip("/"))
            return
        base = self._p(src_prefix).rstrip("/")
        for p in self.fs.find(base):
            self.fs.mv(p, f"{self._p(dst_prefix).rstrip('/')}/{p[len(base) + 1:]}")
        self.remove(src_prefix)

    def remove(self, prefix: str) -> None:
        full = self._p(prefix)
        if self.fs.exists(full):
            self.fs.rm(full, recursive=True)


def _link_tree(src: Path, dst: Path) -> int:
    n = 0
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if not skip(d)]
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in filenames:
            if not skip(f):
                os.link(os.path.join(dirpath, f), dst / rel / f)
                n += 1
    return n


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """A small in-memory tar of ``{name: data}`` (used by tests and the client)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
