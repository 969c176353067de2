"""Large payloads, sent once: a submission's files by content hash, kept per stage.

A client with a large file or directory payload sends its manifest first (each file's path,
SHA-256, size and mode). The server makes an *upload* on the job's stage: a folder under
``.mljobs/uploads/<id>/`` that already holds every file whose content the stage has seen before
(its *blobs*, ``.mljobs/blobs/<sha256>``), and answers with the paths it still needs. The client
streams a tar of just those; each is checked against its hash as it is written and kept as a blob
for the next submission. The job's submission then names the upload, whose folder becomes the
job's ``app`` folder (a rename on a local stage). So a second submission of a directory with one
file changed sends that one file, and neither side ever holds a payload in memory.

Blobs are copies, never links to a job's files (a job or a stage write must not change what a
later job gets); a blob unused for ``BLOB_TTL_S`` is removed (local stages). Stages belong to one
user, so blobs are never shared between users.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tarfile
import time
import uuid
from dataclasses import dataclass
from typing import IO, Any

from mljobs.errors import InvalidArgumentError, NotFoundError, PayloadTooLargeError, PermissionDeniedError
from mljobs.stages import Stage

__all__ = ["Entry", "parse_manifest", "begin", "receive", "take", "UPLOADS", "BLOBS"]

UPLOADS = ".mljobs/uploads"
BLOBS = ".mljobs/blobs"
MAX_FILES = 100_000
BLOB_TTL_S = 7 * 86400.0
UPLOAD_TTL_S = 86400.0  # an upload no submission took
_PRUNE_EVERY_S = 3600.0
_SHA = re.compile(r"[0-9a-f]{64}")
_last_prune: dict[str, float] = {}


@dataclass(frozen=True)
class Entry:
    path: str
    sha256: str
    size: int
    mode: int


def parse_manifest(files: Any) -> list[Entry]:
    """``[[path, sha256, size, mode], ...]`` checked: relative paths that stay inside, hex hashes."""
    if not isinstance(files, list) or not files:
        raise InvalidArgumentError("an upload's manifest must list its files as [[path, sha256, size, mode], ...]")
    if len(files) > MAX_FILES:
        raise InvalidArgumentError(f"an upload may hold at most {MAX_FILES} files, not {len(files)}")
    out, seen = [], set()
    for item in files:
        if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str) and isinstance(item[1], str)
                and isinstance(item[2], int) and isinstance(item[3], int)):
            raise InvalidArgumentError(f"manifest entry {item!r}: expected [path, sha256, size, mode]")
        path = posixpath.normpath(item[0])
        if path.startswith(("..", "/")) or path in (".", "") or path.split("/")[0] == ".mljobs" or "\x00" in path:
            raise InvalidArgumentError(f"manifest path {item[0]!r} leaves the payload folder")
        if not _SHA.fullmatch(item[1]) or item[2] < 0:
            raise InvalidArgumentError(f"manifest entry for {item[0]!r}: a hex SHA-256 and a size >= 0 are needed")
        if path in seen:
            raise InvalidArgumentError(f"manifest lists {path!r} twice")
        seen.add(path)
        out.append(Entry(path, item[1], item[2], item[3] & 0o777))
    folders = set()
    for p in seen:
        while p := posixpath.dirname(p):
            folders.add(p)
    clash = next((p for p in sorted(seen) if p in folders), None)
    if clash is not None:
        raise InvalidArgumentError(f"manifest lists {clash!r} both as a file and as a folder of other files")
    return out


def _folder(upload_id: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{32}", upload_id or ""):
        raise NotFoundError(f"upload {upload_id!r} does not exist")
    return f"{UPLOADS}/{upload_id}"


def _blob(sha256: str) -> str:
    return f"{BLOBS}/{sha256}"


def _set_mode(stage: Stage, path: str, mode: int) -> None:
    local = stage.local_path(path)
    if local is not None and mode:
        os.chmod(local, mode | 0o400)  # the server reads it back whatever the mode says


def begin(stage: Stage, entries: list[Entry], owner: str | None, max_bytes: int | None) -> dict[str, Any]:
    """Make an upload holding every file the stage already has; returns its id and what is missing."""
    total = sum(e.size for e in entries)
    if max_bytes is not None and total > max_bytes:
        raise PayloadTooLargeError(f"the payload has {total} bytes, more than the server accepts ({max_bytes}); an "
                                   "admin raises the cap with MLJOBS_MAX_PAYLOAD_MB")
    _prune(stage)
    upload_id = uuid.uuid4().hex
    folder = _folder(upload_id)
    missing, reused = [], 0
    for e in entries:
        blob = _blob(e.sha256)
        if stage.exists(blob) and stage.size(blob) == e.size:
            stage.copy_file(blob, f"{folder}/files/{e.path}")
            _set_mode(stage, f"{folder}/files/{e.path}", e.mode)
            _touch(stage, blob)
            reused += e.size
        else:
            missing.append(e.path)
    record = {"owner": owner, "created": time.time(), "files": [[e.path, e.sha256, e.size, e.mode] for e in entries]}
    stage.put_bytes(f"{folder}/manifest.json", json.dumps(record).encode())
    return {"id": upload_id, "missing": missing, "files": len(entries), "bytes": total, "reused_bytes": reused}


def _record(stage: Stage, upload_id: str, owner: str | None) -> tuple[str, list[Entry]]:
    folder = _folder(upload_id)
    try:
        record = json.loads(stage.get_bytes(f"{folder}/manifest.json"))
    except (FileNotFoundError, NotFoundError, ValueError):
        raise NotFoundError(f"upload {upload_id} does not exist on stage @{stage.name} (or was already used); "
                            "submit again") from None
    if record.get("owner") != owner:
        raise PermissionDeniedError(f"upload {upload_id} is not yours")
    return folder, parse_manifest(record["files"])


class _Hashing:
    """A reader that hashes what passes through it."""

    def __init__(self, src: IO[bytes]) -> None:
        self.src, self.sha = src, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.sha.update(data)
        return data


def receive(stage: Stage, upload_id: str, fileobj: IO[bytes], owner: str | None) -> dict[str, Any]:
    """Unpack a tar of the upload's missing files, each checked against its manifest entry and
    kept as a blob; returns how many files and bytes came."""
    folder, entries = _record(stage, upload_id, owner)
    wanted = {e.path: e for e in entries}
    files = size = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = posixpath.normpath(member.name)
                e = wanted.get(name)
                if e is None or member.size != e.size:
                    raise InvalidArgumentError(f"upload member {member.name!r} is not in its manifest (or not of "
                                               "the size it gave)")
                src = tar.extractfile(member)
                assert src is not None  # isfile() above
                reader = _Hashing(src)
                # written under a private name and checked before it takes its place: a second
                # send of the same upload, racing this one, never sees (or keeps) a half-written file
                part = f"{folder}/parts/{uuid.uuid4().hex}"
                try:
                    stage.put_stream(part, reader)  # type: ignore[arg-type]
                    if reader.sha.hexdigest() != e.sha256:
                        raise InvalidArgumentError(f"upload member {name!r} does not match the SHA-256 its "
                                                   "manifest gave")
                    _set_mode(stage, part, e.mode)
                    _keep_blob(stage, part, e.sha256)
                    if not stage.exists(f"{folder}/manifest.json"):  # taken meanwhile: nothing to add to
                        raise NotFoundError(f"upload {upload_id} was used by a submission while it was being sent")
                    stage.rename(part, f"{folder}/files/{name}")
                except BaseException:  # a bad member, a cut connection: no part left behind
                    stage.remove(part)
                    raise
                files += 1
                size += e.size
    except tarfile.TarError as e:
        raise InvalidArgumentError(f"the upload is not a readable tar archive ({e})") from None
    return {"files": files, "bytes": size}


def _keep_blob(stage: Stage, src: str, sha256: str) -> None:
    blob = _blob(sha256)
    if stage.exists(blob):
        return
    tmp = f"{blob}.{uuid.uuid4().hex[:8]}.part"  # whole or not at all, when two uploads race
    stage.copy_file(src, tmp)
    stage.rename(tmp, blob)


def take(stage: Stage, upload_id: str, app_prefix: str, owner: str | None) -> list[str]:
    """Make the upload's files the folder ``app_prefix`` (a rename on a local stage); returns
    their names. Every file of the manifest must have arrived."""
    folder, entries = _record(stage, upload_id, owner)
    absent = [e.path for e in entries if not stage.exists(f"{folder}/files/{e.path}")]
    if absent:
        raise InvalidArgumentError(f"upload {upload_id} is missing {len(absent)} of its files (e.g. {absent[0]!r}); "
                                   "send them before submitting")
    stage.move_dir(f"{folder}/files/", app_prefix)
    stage.remove(folder)
    return [e.path for e in entries]


def _touch(stage: Stage, path: str) -> None:
    local = stage.local_path(path)
    if local is not None:
        os.utime(local)


def _prune(stage: Stage) -> None:
    """Blobs unused for BLOB_TTL_S and uploads never taken, at most once an hour per stage
    (local stages: an object store's lifecycle rules do this for a bucket)."""
    root = stage.local_path("")
    now = time.time()
    if root is None or now - _last_prune.get(root, 0.0) < _PRUNE_EVERY_S:
        return
    _last_prune[root] = now
    for sub, ttl in ((BLOBS, BLOB_TTL_S), (UPLOADS, UPLOAD_TTL_S)):
        try:
            names = os.listdir(os.path.join(root, sub))
        except OSError:
            continue
        for name in names:
            path = os.path.join(root, sub, name)
            try:
                if now - os.stat(path).st_mtime > ttl:
                    stage.remove(f"{sub}/{name}")
            except OSError:
                continue
