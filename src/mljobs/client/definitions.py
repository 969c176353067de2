"""Job definitions: ``@remote`` and ``MLJobDefinition.register`` (register once, call many times),
``get_definition`` and ``list_definitions``."""

from __future__ import annotations

import base64
import functools
import hashlib
import inspect
import json
import os
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from mljobs.client import payload as pl
from mljobs.client.job import MLJob
from mljobs.client.jobs import _entrypoint, _options, _refuse_notebook, _submit, send_large
from mljobs.client.session import Session, get_active_session
from mljobs.errors import ConflictError, InvalidArgumentError, LocalFileNotFoundError, NotFoundError
from mljobs.spec import REMOTE_FEATURE, REMOTE_PREFIX, JobSpec, PayloadKind

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["MLJobDefinition", "remote", "get_definition", "list_definitions", "LIST_DEFINITIONS_COLUMNS"]

P = ParamSpec("P")
R = TypeVar("R")
LIST_DEFINITIONS_COLUMNS = ["payload_kind", "compute_pool", "stage_name", "entrypoint", "args", "target_instances",
                            "parallel", "max_retries", "version", "owner", "created_time", "updated_time"]
_NOT_NAME = re.compile(r"[^A-Za-z0-9_$]")
REMOTE_CALL_BYTES = 4 << 20  # larger pickled arguments travel with the function, as one upload
_REMOTE_KNOWN: set[str] = set()  # @remote definitions this process registered or called


def _signature_params(sig: inspect.Signature, covered: set[str]) -> list[dict[str, Any]]:
    """A function's parameters as the server keeps them (``covered``: given by the definition's
    defaults or the job itself, so a call may leave them out)."""
    return [{"name": p.name, "kind": p.kind.name,
             "has_default": p.default is not inspect.Parameter.empty or p.name in covered}
            for p in sig.parameters.values()]


def _kind(name: str) -> Any:
    return getattr(inspect.Parameter, name)


def _signature(params: list[dict[str, Any]]) -> inspect.Signature:
    """The signature calls are checked against; a parameter the definition's defaults cover may
    come before one without (not a valid Python signature, but a valid call check)."""
    return inspect.Signature([inspect.Parameter(p["name"], _kind(p["kind"]),
                                                default=None if p["has_default"] else inspect.Parameter.empty)
                              for p in params], __validate_parameters__=False)


def _bind(sig: inspect.Signature, qualname: str, session_param: str | None, args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call checked against ``sig``: its positional-only arguments, and the rest by keyword (so
    the job can fill in its session: a Session passed for ``session_param`` travels as None)."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise InvalidArgumentError(f"{qualname}{sig}: {e}") from None
    if session_param and isinstance(bound.arguments.get(session_param), Session):
        bound.arguments[session_param] = None  # the job gets its own session
    # (a function with *args or **kwargs is refused: payload.check_function)
    positional = [p.name for p in sig.parameters.values() if p.kind == p.POSITIONAL_ONLY]
    pos = tuple(bound.arguments[n] for n in positional if n in bound.arguments)
    return pos, {k: v for k, v in bound.arguments.items() if k not in positional}


def encode_call(sig: inspect.Signature, qualname: str, session_param: str | None, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> str:
    """A function definition's call, checked against its signature and pickled (base64)."""
    pos, kw = _bind(sig, qualname, session_param, args, kwargs)
    return base64.b64encode(pl.pickle_args(qualname, pos, kw)).decode()


def remote_name(fn: Callable[..., Any], fn_pickle: bytes, spec: JobSpec, signature: list[dict[str, Any]],
                imports: Sequence[Any] | None) -> str:
    """The name ``@remote`` registers a function under: ``_REMOTE_<NAME>_<WHERE>_<HASH>``. WHERE
    hashes the function's module and qualified name (the versions of one function, which the
    server prunes together); HASH all the definition holds (the pickled function with its
    globals, its imports' files, its options), so an edited function or a changed global makes
    a new one and nothing else does."""
    h = hashlib.sha256(fn_pickle)
    h.update(json.dumps([spec.to_dict(), signature, pl.manifest(pl.import_entries(imports))], sort_keys=True,
                        default=str).encode())
    where = hashlib.sha256(f"{fn.__module__}:{fn.__qualname__}".encode()).hexdigest()[:8].upper()
    name = _NOT_NAME.sub("_", fn.__name__).upper()[:64]
    return f"{REMOTE_PREFIX}{name}_{where}_{h.hexdigest()[:20].upper()}"


def _post_definition(session: Session, name: str, spec: JobSpec, signature: list[dict[str, Any]] | None,
                     tar: bytes | None, upload: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    data = {"name": name, "spec": json.dumps(spec.to_dict()), "overwrite": json.dumps(bool(overwrite))}
    if signature is not None:
        data["signature"] = json.dumps(signature)
    if upload is not None:
        data["upload"] = upload
    files = {"payload": ("payload.tar", tar, "application/x-tar")} if tar is not None else None
    return session.request("POST", "/definitions", data=data, files=files).json()


def _call_definition(session: Session, name: str, body: dict[str, Any]) -> MLJob:
    info = session.request("POST", f"/definitions/{name}/jobs", json=body,
                           headers={"Idempotency-Key": uuid.uuid4().hex}).json()
    return MLJob(info["id"], session, info)


class MLJobDefinition(Generic[P, R]):
    """A job you call. ``@remote`` makes one of a function, registered lazily: its first call
    uploads the function (once for each version of it: an edited function or a changed global is
    uploaded again), later calls send only their arguments. :meth:`register` keeps one on the
    server under a name (for :func:`get_definition` and schedules). Call a function's with its
    arguments, a script's with ``args=[...]``."""

    def __init__(self, fn: Callable[P, R] | None = None, options: dict[str, Any] | None = None,
                 imports: Sequence[Any] | None = None, session: Session | None = None, *,
                 info: dict[str, Any] | None = None) -> None:
        self.fn, self.options, self.imports, self._session, self._info = fn, options or {}, imports, session, info
        if fn is not None:
            pl.check_function(fn)
            self.session_param = pl.session_parameter(fn, Session)
            self.signature = inspect.signature(fn)
            functools.update_wrapper(self, fn)
        elif info is not None:
            self.session_param = info.get("session_param")
            self.signature = _signature(info["signature"]) if info.get("signature") is not None else None
        else:
            raise InvalidArgumentError("a job definition needs a function or a registered definition")

    def __repr__(self) -> str:
        if self._info is None:
            return f"MLJobDefinition({getattr(self.fn, '__qualname__', self.fn)!r}, not registered)"
        return (f"MLJobDefinition(name={self._info['name']!r}, version={self._info['version']}, "
                f"{self._info['payload_kind']} on {self._info['compute_pool']})")

    @property
    def name(self) -> str | None:
        """The registered name (None for ``@remote``'s, which are not registered)."""
        return self._info["name"] if self._info else None

    @property
    def registered(self) -> bool:
        return self._info is not None

    @property
    def info(self) -> dict[str, Any] | None:
        """What the server keeps of it (None when not registered)."""
        return dict(self._info) if self._info else None

    def _sess(self) -> Session:
        return self._session or get_active_session()

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> MLJob:
        if self._info is None:
            return self._submit_unregistered(args, kwargs)
        session = self._sess()
        body: dict[str, Any]
        if self._info["payload_kind"] == PayloadKind.FUNCTION.value:
            qualname = self._info["entrypoint"][0] if self._info["entrypoint"] else self._info["name"]
            sig = self.signature or inspect.Signature()
            body = {"call": encode_call(sig, qualname, self.session_param, args, kwargs)}
        else:
            unknown = set(kwargs) - {"args"}
            if args or unknown:
                raise InvalidArgumentError(f"job definition {self._info['name']} runs {self._info['entrypoint']}: "
                                           "call it as definition(args=['--flag', 'value']) (strings for its sys.argv)")
            given = kwargs.get("args")
            if isinstance(given, str) or (given is not None and not isinstance(given, (list, tuple))):
                raise InvalidArgumentError(f"args must be a list of strings, got {given!r}")
            body = {"args": [str(a) for a in given]} if given is not None else {}
        return _call_definition(session, self._info["name"], body)

    def _submit_unregistered(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> MLJob:
        """``@remote``'s call: the function registered under :func:`remote_name` (on the first call
        of this version of it), then called with only its arguments; arguments over
        :data:`REMOTE_CALL_BYTES` go with the function in one upload instead, as a job of its own."""
        assert self.fn is not None
        qualname = self.fn.__qualname__
        pos, kw = _bind(self.signature, qualname, self.session_param, args, kwargs)
        session = self._sess()
        opts = _options(session=session, **self.options)
        spec = JobSpec(payload_kind=PayloadKind.FUNCTION, entrypoint=[qualname],
                       session_param=self.session_param, **opts)
        module = sys.modules.get(self.fn.__module__)
        call = pl.pickle_args(qualname, pos, kw, module)
        fn_pickle = pl.pickle_call(self.fn, (), {})
        if len(call) > REMOTE_CALL_BYTES or REMOTE_FEATURE not in session.features():
            # large arguments, or a server older than @remote's definitions: one upload, the
            # function and the call's own pickle
            return _submit(session, spec, pl.tar_call(fn_pickle, self.imports, call))
        signature = _signature_params(self.signature, {self.session_param} if self.session_param else set())
        name = remote_name(self.fn, fn_pickle, spec, signature, self.imports)
        body = {"call": base64.b64encode(call).decode()}

        def register() -> None:
            try:
                _post_definition(session, name, spec, signature, pl.tar_call(fn_pickle, self.imports))
            except ConflictError:
                pass  # registered already (another process, or an earlier run of this one): the same content
            _REMOTE_KNOWN.add(name)

        if name not in _REMOTE_KNOWN:  # this process's first call of this version: register, then call
            register()
        try:
            return _call_definition(session, name, body)
        except NotFoundError:  # pruned or deleted since, or another server: register it again
            register()
            return _call_definition(session, name, body)

    def delete(self) -> None:
        """Remove the definition and its payload from the server (jobs it made keep theirs)."""
        if self._info is None:
            raise InvalidArgumentError("this definition is not registered; MLJobDefinition.register(...) makes one")
        self._sess().request("DELETE", f"/definitions/{self._info['name']}")
        self._info = None if self.fn is not None else self._info

    @classmethod
    def register(cls, source: Callable[..., Any] | str | os.PathLike[str], compute_pool: str, stage_name: str, *,
                 name: str | None = None, target_instances: int = 1, min_instances: int | None = None,
                 parallel: bool = False, pip_requirements: Sequence[str] | None = None,
                 external_access_integrations: Sequence[str] | None = None, env_vars: dict[str, str] | None = None,
                 entrypoint: str | Sequence[str] | None = None, default_args: Any = None, max_retries: int = 0,
                 retry_on_failure: bool = False, overwrite: bool = False, imports: Sequence[Any] | None = None,
                 database: str | None = None, schema: str | None = None, runtime_environment: str | None = None,
                 join_timeout_s: float = 720.0, priority: int = 0,
                 session: Session | None = None) -> MLJobDefinition[Any, Any]:
        """Keep a job on the server under ``name``: its payload is uploaded now, once; calling the
        definition submits a job with nothing uploaded again.

        Args:
            source: a function, a script file, a directory (with ``entrypoint``) or a folder on a
                stage (``"@stage/dir/"``, with ``entrypoint``).
            compute_pool, stage_name: where its jobs run, and the stage that keeps its payload.
            name: the definition's name (default: the function's or file's name).
            default_args: a script's arguments when a call gives none (a list of strings); for a
                function, keyword arguments (a dict) that calls may leave out.
            max_retries, retry_on_failure: see :func:`remote`.
            overwrite: replace a definition of that name (a new version) instead of refusing.

        The other options are :func:`remote`'s.
        """
        session = session or get_active_session()
        opts = _options(compute_pool, stage_name, target_instances, min_instances, pip_requirements,
                        external_access_integrations, env_vars, None, database, schema, session, runtime_environment,
                        parallel, join_timeout_s, max_retries, retry_on_failure, priority)
        signature: list[dict[str, Any]] | None = None
        tar: bytes | None
        upload: str | None = None
        if callable(source) and not isinstance(source, (str, os.PathLike)):
            fn = source.fn if isinstance(source, MLJobDefinition) and source.fn is not None else source
            pl.check_function(fn)
            sig, session_param = inspect.signature(fn), pl.session_parameter(fn, Session)
            if default_args is not None and not isinstance(default_args, dict):
                raise InvalidArgumentError(f"default_args for a function is a dict of keyword arguments calls may "
                                           f"leave out, got {type(default_args).__name__}")
            d_args: tuple[Any, ...] = ()
            d_kwargs = dict(default_args or {})
            try:
                covered = set(sig.bind_partial(*d_args, **d_kwargs).arguments)
            except TypeError as e:
                raise InvalidArgumentError(f"default_args do not fit {fn.__qualname__}{sig}: {e}") from None
            signature = _signature_params(sig, covered | ({session_param} if session_param else set()))
            spec = JobSpec(payload_kind=PayloadKind.FUNCTION, entrypoint=[fn.__qualname__],
                           session_param=session_param, **opts)
            tar = pl.tar_call(pl.pickle_call(fn, d_args, d_kwargs), imports)
            default_name = fn.__name__
        else:
            d_list = [] if default_args is None else default_args
            if isinstance(d_list, str) or not isinstance(d_list, (list, tuple)):
                raise InvalidArgumentError(f"default_args for a script is a list of strings, got {default_args!r}")
            args = [str(a) for a in d_list]
            text = os.fspath(source)
            if text.startswith("@"):
                if entrypoint is None:
                    raise InvalidArgumentError(f"a definition from {text} needs entrypoint=, e.g. 'main.py'")
                spec = JobSpec(payload_kind=PayloadKind.STAGE, entrypoint=_entrypoint(entrypoint), args=args,
                               source=text, **opts)
                tar = None
                default_name = text.rstrip("/").rsplit("/", 1)[-1]
            else:
                path = Path(text)
                if path.is_file():
                    _refuse_notebook(path.name)
                    spec = JobSpec(payload_kind=PayloadKind.FILE, entrypoint=[path.name], args=args, **opts)
                    entries = pl.file_entries(path, imports)
                    default_name = path.stem
                elif path.is_dir():
                    if entrypoint is None:
                        raise InvalidArgumentError(f"a definition of the directory {text!r} needs entrypoint=, "
                                                   "e.g. 'main.py'")
                    entry = _entrypoint(entrypoint)
                    if len(entry) == 1 and not (path / entry[0]).is_file():
                        raise LocalFileNotFoundError(f"entrypoint {entry[0]!r} does not exist in {text!r}")
                    spec = JobSpec(payload_kind=PayloadKind.DIRECTORY, entrypoint=entry, args=args, **opts)
                    entries = pl.directory_entries(path, imports)
                    default_name = path.resolve().name
                else:
                    raise LocalFileNotFoundError(f"{text!r} is neither a function, a file, a directory nor a stage "
                                                 "path like '@stage/dir/'")
                upload = send_large(session, spec.stage_name, entries)  # a large one by content hash
                tar = pl.tar_entries(entries) if upload is None else None
        def_name = name or (_NOT_NAME.sub("_", default_name).upper() or "JOB")
        if def_name[0].isdigit():
            def_name = f"_{def_name}"
        if def_name.upper().startswith(REMOTE_PREFIX):
            raise InvalidArgumentError(f"definition names starting with {REMOTE_PREFIX} are @remote's own; pick "
                                       f"another name than {def_name!r}")
        info = _post_definition(session, def_name, spec, signature, tar, upload, overwrite)
        fn_local = source if callable(source) and not isinstance(source, (str, os.PathLike, MLJobDefinition)) else None
        made: MLJobDefinition[Any, Any] = cls(info=info, session=session)
        if fn_local is not None:
            functools.update_wrapper(made, fn_local)
        return made


def remote(compute_pool: str, *, stage_name: str, target_instances: int = 1, min_instances: int | None = None,
           pip_requirements: Sequence[str] | None = None, external_access_integrations: Sequence[str] | None = None,
           env_vars: dict[str, str] | None = None, imports: Sequence[Any] | None = None, name: str | None = None,
           database: str | None = None, schema: str | None = None, runtime_environment: str | None = None,
           join_timeout_s: float = 720.0, parallel: bool = False, max_retries: int = 0,
           retry_on_failure: bool = False, priority: int = 0,
           session: Session | None = None) -> Callable[[Callable[P, R]], MLJobDefinition[P, R]]:
    """Turn a function into a job definition: calling it submits a job and returns an MLJob.

    Args:
        compute_pool: the pool to run on.
        stage_name: the stage that keeps the payload and result.
        target_instances: instances (nodes) to run on. With more than one, every instance starts
            a Ray node (instance 0 the head) and the function runs on the head with Ray ready.
        min_instances: start once this many are available (default: target_instances).
        pip_requirements: packages to install for the job.
        external_access_integrations: egress policies the job may use.
        env_vars: environment variables for the job.
        imports: local packages or modules to ship with the function.
        name: a name for the job (default: its id).
        database, schema: the job's namespace (default: the session's).
        runtime_environment: the interpreter: by default the server's Python of the client's
            major.minor when it has one, else its own; "server", "3.12" or a path pick one.
        join_timeout_s: how long the head waits for ``min_instances`` nodes to join its Ray
            cluster before the job fails.
        parallel: with ``target_instances > 1``, run the function on every instance (no Ray), with
            the ranks in ``MLJOBS_INSTANCE_ID``/``RANK``/``WORLD_SIZE``; ``job.distributed_result()``
            gives each instance's value.
        max_retries: how many times a job whose instance was lost (node lost, killed from outside,
            an internal error) runs again, as its next attempt (``MLJOBS_ATTEMPT``), with what its
            last attempt left in ``MLJOBS_CHECKPOINT_DIR``.
        retry_on_failure: retry the function's own failures (an exception) too.
        priority: the job's place in the pool's queue, before fair share (higher first; above the
            pool's ``max_priority`` only for admins); on a pool with preemption a higher one takes
            lower ones' instances.
        session: the session to submit with (default: the active one).

    To upload the function once and call it many times, register it:
    ``MLJobDefinition.register(fn, pool, stage_name)``.
    """
    options = dict(compute_pool=compute_pool, stage_name=stage_name, target_instances=target_instances,
                   min_instances=min_instances, pip_requirements=pip_requirements,
                   external_access_integrations=external_access_integrations, env_vars=env_vars, name=name,
                   database=database, schema=schema, runtime_environment=runtime_environment,
                   join_timeout_s=join_timeout_s, parallel=parallel, max_retries=max_retries,
                   retry_on_failure=retry_on_failure, priority=priority)

    def decorator(fn: Callable[P, R]) -> MLJobDefinition[P, R]:
        return MLJobDefinition(fn, options, imports, session)

    return decorator


def get_definition(name: str, session: Session | None = None) -> MLJobDefinition[Any, Any]:
    """A registered definition by name, ready to call."""
    session = session or get_active_session()
    return MLJobDefinition(info=session.request("GET", f"/definitions/{name}").json(), session=session)


def list_definitions(session: Session | None = None, *, include_remote: bool = False) -> pd.DataFrame:
    """Your registered definitions (every user's for an admin), as a DataFrame indexed by name;
    ``include_remote``: also ``@remote``'s own (``_REMOTE_...``: one per version of a function,
    the newest kept), which take room on their stages."""
    import pandas as pd

    session = session or get_active_session()
    rows = session.request("GET", "/definitions", params={"remote": include_remote}).json()
    df = pd.DataFrame(rows, columns=["name", *LIST_DEFINITIONS_COLUMNS])
    for col in ("created_time", "updated_time"):
        df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
    return df.set_index("name")
