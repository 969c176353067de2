"""Job definitions: a payload registered once on a stage and called many times.

Registering checks the job as a submission would and keeps its payload on its stage, one folder
per version. A call makes a job whose ``app/`` folder is the definition's, linked (hard links on a
local stage; a copy elsewhere) rather than uploaded again, plus the call's own arguments: a
function's as a small pickle beside it, a script's as its ``args``. Schedules call definitions too
(:mod:`mljobs.server.schedules`), preparing the job here and recording it with their tick.

``@remote`` registers its function lazily under a name of its own, ``_REMOTE_<FUNCTION>_<hash>``
(the hash of the pickled function, its imports and its options): such a definition is not
listed, names no job's ``definition_name`` nor a job's default name, cannot be scheduled, and
only the newest :data:`KEEP_REMOTE` of a function's are kept (an edited function gets a new one).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from typing import IO, TYPE_CHECKING, Any

import sqlalchemy as sa

from mljobs.errors import ConflictError, InvalidArgumentError, NotFoundError
from mljobs.paths import CALL_PAYLOAD, DefinitionPaths, StagePaths
from mljobs.server.auth import Principal
from mljobs.server.records import JobRecord
from mljobs.server.store import utcnow
from mljobs.server.tables import definitions
from mljobs.spec import REMOTE_PREFIX, JobSpec, PayloadKind, check_identifier, new_job_id

if TYPE_CHECKING:
    from mljobs.server.service import ControlPlane

__all__ = ["Definitions", "PreparedCall"]

MAX_CALL_BYTES = 16 << 20  # a call's pickled arguments (the payload itself was registered)
KEEP_REMOTE = 8  # of one function's @remote definitions, per user
_REMOTE_HASH = re.compile(r"[0-9A-F]{20}")


def is_remote(name: str) -> bool:
    return name.upper().startswith(REMOTE_PREFIX)


def _remote_family(name: str) -> str:
    """``_REMOTE_<FUNCTION>_``: what a function's @remote definitions share (the hash follows)."""
    return name[:name.rindex("_") + 1]


class PreparedCall:
    """A definition's call made ready: its payload on the stage and its job row, not recorded yet."""

    def __init__(self, row: dict[str, Any], pool: str, stage: Any) -> None:
        self.row, self.pool, self.stage = row, pool, stage

    @property
    def job_id(self) -> str:
        return str(self.row["id"])

    def discard(self) -> None:
        """The job was not recorded: remove what was put on the stage for it."""
        self.stage.remove(StagePaths(self.job_id).prefix)


class Definitions:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.engine = cp.store.engine

    # -- the catalog ----------------------------------------------------------------------------
    def _row(self, owner: str, name: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(sa.select(definitions).where(definitions.c.owner == owner,
                                                       definitions.c.name == name)).first()
        return dict(r._mapping) if r else None

    def get_row(self, owner: str, name: str) -> dict[str, Any]:
        name = check_identifier("job definition", name)
        row = self._row(owner, name)
        if row is None:
            raise NotFoundError(f"job definition {name} does not exist (or is not yours); "
                                "mljobs.list_definitions() shows yours, MLJobDefinition.register(...) makes one")
        return row

    def view(self, row: dict[str, Any]) -> dict[str, Any]:
        spec = row["spec"]
        return {"name": row["name"], "owner": row["owner"], "version": row["version"],
                "payload_kind": spec["payload_kind"], "compute_pool": spec["compute_pool"],
                "stage_name": row["stage_name"], "entrypoint": spec["entrypoint"], "args": spec["args"],
                "target_instances": spec["target_instances"], "min_instances": spec["min_instances"],
                "parallel": spec["parallel"], "max_retries": spec.get("max_retries", 0),
                "session_param": spec.get("session_param"), "signature": row["signature"],
                "created_time": row["created_time"], "updated_time": row["updated_time"]}

    def get(self, name: str, who: Principal) -> dict[str, Any]:
        return self.view(self.get_row(who.name, name))

    def list(self, who: Principal, remote: bool = False) -> list[dict[str, Any]]:
        """``who``'s definitions (every user's for an admin); ``remote``: @remote's own too."""
        q = sa.select(definitions).order_by(definitions.c.owner, definitions.c.name)
        if not remote:
            q = q.where(~definitions.c.name.startswith(REMOTE_PREFIX, autoescape=True))
        if who.owner_filter is not None:
            q = q.where(definitions.c.owner == who.owner_filter)
        with self.engine.connect() as c:
            return [self.view(dict(r._mapping)) for r in c.execute(q)]

    def register(self, spec: JobSpec, payload: IO[bytes] | None, name: str, overwrite: bool,
                 signature: list[dict[str, Any]] | None, who: Principal,
                 upload: str | None = None) -> dict[str, Any]:
        """Check ``spec`` as a submission, keep its payload on its stage and record it as ``name``
        (a new version when ``overwrite``; a ConflictError naming ``overwrite=True`` otherwise). The
        payload is the tar ``payload`` or the files of the upload ``upload`` (a large one)."""
        name = check_identifier("job definition", name)
        spec.owner = who.name
        spec.name = spec.name or (None if is_remote(name) else name)
        self.cp.check_submission(spec, who)
        stage = self.cp.stage(spec.stage_name, who=who)
        old = self._row(who.name, name)
        if old is not None and not overwrite:
            raise ConflictError(f"job definition {name} already exists (version {old['version']}); pass "
                                "overwrite=True to replace it, or delete it first (get_definition(name).delete())")
        version = old["version"] + 1 if old else 1
        paths = DefinitionPaths(who.name, name, version, secrets.token_hex(4))
        now = utcnow()
        try:
            self.cp.stage_payload(spec, stage, paths.app, payload, who, upload)
            values = {"version": version, "stage_name": stage.name, "payload_prefix": paths.app,
                      "spec": spec.to_dict(), "signature": signature, "updated_time": now}
            with self.engine.begin() as c:
                if old is None:
                    c.execute(definitions.insert().values(owner=who.name, name=name, created_time=now, **values))
                elif c.execute(definitions.update().where(
                        definitions.c.owner == who.name, definitions.c.name == name,
                        definitions.c.version == old["version"]).values(**values)).rowcount != 1:
                    raise ConflictError(f"job definition {name} changed while it was being replaced; try again")
        except sa.exc.IntegrityError:
            stage.remove(paths.version)
            raise ConflictError(f"job definition {name} was registered meanwhile; pass overwrite=True to "
                                "replace it") from None
        except BaseException:
            stage.remove(paths.version)
            raise
        if old is not None:  # jobs called from it have their own links or copies
            self._remove_payload(old)
        if is_remote(name):
            self._prune_remote(who.name, name)
        return self.view(self.get_row(who.name, name))

    def _prune_remote(self, owner: str, name: str) -> None:
        """Keep a function's newest :data:`KEEP_REMOTE` @remote definitions (jobs made from the
        others keep their own files; a client that calls one removed registers it again)."""
        family = _remote_family(name)
        q = (sa.select(definitions).where(definitions.c.owner == owner,
                                          definitions.c.name.startswith(family, autoescape=True))
             .order_by(definitions.c.updated_time.desc(), definitions.c.name))
        with self.engine.connect() as c:  # the same function's: the family, then only the hash
            rows = [dict(r._mapping) for r in c.execute(q)]
        mine = [r for r in rows if _REMOTE_HASH.fullmatch(r["name"][len(family):])]
        for row in mine[KEEP_REMOTE:]:
            with self.engine.begin() as c:
                gone = c.execute(definitions.delete().where(definitions.c.owner == owner,
                                                            definitions.c.name == row["name"],
                                                            definitions.c.version == row["version"])).rowcount
            if gone:
                self._remove_payload(row, whole=True)

    def delete(self, name: str, who: Principal) -> None:
        row = self.get_row(who.name, name)
        with self.engine.begin() as c:
            c.execute(definitions.delete().where(definitions.c.owner == row["owner"],
                                                 definitions.c.name == row["name"]))
        self._remove_payload(row, whole=True)

    def _remove_payload(self, row: dict[str, Any], whole: bool = False) -> None:
        """Remove a registration's payload from its stage (``whole``: the definition is gone, so
        its folder goes too where it is left empty: a registration of the name made meanwhile
        keeps its own)."""
        try:
            stage = self.cp.stage(row["stage_name"], create=False)
        except NotFoundError:
            return
        version = row["payload_prefix"].removesuffix("app/")
        stage.remove(version)
        local = stage.local_path(version.rstrip("/").rsplit("/", 1)[0]) if whole else None
        if local is not None:
            try:
                os.rmdir(local)  # only if empty
            except OSError:
                pass

    # -- calls ------------------------------------------------------------------------------------
    def prepare(self, row: dict[str, Any], who: Principal, *, args: list[str] | None = None,
                call: bytes | None = None, job_name: str | None = None, idempotency_key: str | None = None,
                **extra: Any) -> PreparedCall:
        """A call of the definition ``row`` ready to record: checked as a submission (its pool may have
        changed since), its payload linked into the new job's folder, its row made."""
        spec = JobSpec.from_dict(row["spec"])
        spec.owner = row["owner"]
        kind = spec.payload_kind
        if kind == PayloadKind.FUNCTION:
            if args:
                raise InvalidArgumentError(f"job definition {row['name']} is a function: call it with its own "
                                           "arguments, definition(*args, **kwargs), not args=[...]")
        else:
            if call is not None:
                raise InvalidArgumentError(f"job definition {row['name']} runs {spec.entrypoint}: give its "
                                           "arguments as args=[...] (strings for its sys.argv)")
            if args is not None:
                if not isinstance(args, list):
                    raise InvalidArgumentError(f"args must be a list of strings, got {args!r}")
                spec.args = [str(a) for a in args]
        if call is not None and len(call) > MAX_CALL_BYTES:
            raise InvalidArgumentError(f"the call's arguments pickle to {len(call)} bytes, more than "
                                       f"{MAX_CALL_BYTES}; put large inputs on a stage and pass their path")
        if job_name:
            spec.name = job_name
        pool = self.cp.check_submission(spec, who)
        stage = self.cp.stage(row["stage_name"], who=who)
        job_id = new_job_id()
        paths = StagePaths(job_id)
        prepared = PreparedCall(self.cp.job_row(job_id, spec, pool, stage, idempotency_key,
                                                definition_name=None if is_remote(row["name"]) else row["name"],
                                                **extra), pool["name"], stage)
        try:
            copied = stage.copy_dir(row["payload_prefix"], stage, paths.app)
            if kind == PayloadKind.FUNCTION and not copied:  # removed since the row was read (pruned, deleted)
                raise NotFoundError(f"job definition {row['name']}'s payload is gone (deleted meanwhile); "
                                    "register it again")
            if call is not None:
                stage.put_bytes(paths.app + CALL_PAYLOAD, call)
        except BaseException:
            prepared.discard()
            raise
        return prepared

    def call(self, name: str, who: Principal, *, args: list[str] | None = None, call: bytes | None = None,
             job_name: str | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a job from definition ``name``; nothing of its payload travels again."""
        if idempotency_key:
            done = self.cp.store.job_by_key(who.name, idempotency_key)
            if done is not None:
                return self.cp.job_view(done)
        prepared = self.prepare(self.get_row(who.name, name), who, args=args, call=call, job_name=job_name,
                                idempotency_key=idempotency_key)
        try:
            self.cp.store.insert_job(prepared.row)
        except BaseException:
            prepared.discard()
            first = self.cp.store.job_by_key(who.name, idempotency_key) if idempotency_key else None
            if first is not None:
                return self.cp.job_view(first)
            raise
        self.cp.request_schedule(prepared.pool)
        return self.cp.job_view(JobRecord.from_row(prepared.row), instances=[])  # as recorded: not read back


def decode_call(text: str | None) -> bytes | None:
    """A call's pickled arguments as the API carries them (base64)."""
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgumentError("call must be the call's pickled arguments in base64") from None
