"""Packaging payloads: a pickled call, a file, or a directory, as one tar stream."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import io
import os
import sys
import sysconfig
import tarfile
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle

from mljobs.errors import InvalidArgumentError, LocalFileNotFoundError, PayloadError
from mljobs.paths import CALL_PAYLOAD, FUNCTION_PAYLOAD, IMPORTS_DIR
from mljobs.stages import skip

__all__ = ["pickle_call", "pickle_args", "tar_call", "tar_file", "tar_directory", "check_function", "session_parameter",
           "file_entries", "directory_entries", "import_entries", "tar_entries", "manifest", "tar_stream"]

_INSTALLED = {os.path.realpath(p) for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}}


def _is_user_module(module: types.ModuleType) -> bool:
    """A module the runtime may not have: not __main__, not stdlib, not installed in site-packages."""
    path = getattr(module, "__file__", None)
    if not path or module.__name__ == "__main__":
        return False
    real = os.path.realpath(path)
    return not any(real.startswith(root + os.sep) for root in _INSTALLED)


def check_function(fn: Callable[..., Any]) -> None:
    """Refuse what a job cannot call: non-functions and ``*args``/``**kwargs`` signatures."""
    if not callable(fn) or inspect.isclass(fn):
        raise InvalidArgumentError(f"@remote needs a function, got {fn!r}")
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            star = "*" if p.kind == p.VAR_POSITIONAL else "**"
            raise InvalidArgumentError(
                f"@remote function {fn.__qualname__!r} has {star}{p.name}; remote functions need explicit "
                "parameters (list them, or pass one list/dict argument instead)"
            )


def session_parameter(fn: Callable[..., Any], session_cls: type) -> str | None:
    """The parameter annotated ``Session`` (required or defaulting to None), if any."""
    try:
        hints = {k: v for k, v in inspect.get_annotations(fn, eval_str=False).items()}
    except Exception:  # noqa: BLE001
        hints = {}
    for p in inspect.signature(fn).parameters.values():
        ann = hints.get(p.name, p.annotation)
        name = ann if isinstance(ann, str) else getattr(ann, "__name__", "")
        if ann is session_cls or (isinstance(name, str) and name.split(".")[-1].split("|")[0].strip() == "Session"):
            if p.default is not inspect.Parameter.empty and p.default is not None:
                raise InvalidArgumentError(
                    f"parameter {p.name!r} of {fn.__qualname__!r} is a Session: it must be required or default "
                    "to None (the job passes its own session)"
                )
            return p.name
    return None


# roots -> {module name: (the module, whether it is local to those roots)}
_LOCAL_CACHE: dict[frozenset[str], dict[str, tuple[object, bool]]] = {}


def _local_modules() -> list[types.ModuleType]:
    """Top-level modules and packages imported from the caller's own folder: the working directory
    (a notebook's) or the running script's. A job's runtime cannot import them (its ``sys.path``
    has neither folder), so whatever a call uses from them must travel by value. Each module is
    looked at once per set of folders (a process imports thousands; a call looks only at new ones)."""
    here = os.getcwd()
    roots = {here, os.path.realpath(here)}
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        roots |= {os.path.dirname(os.path.abspath(main_file)), os.path.dirname(os.path.realpath(main_file))}
    seen = _LOCAL_CACHE.setdefault(frozenset(roots), {})
    out = []
    for name, module in list(sys.modules.items()):
        entry = seen.get(name)
        if entry is None or entry[0] is not module:  # new, or the name now holds another module
            entry = seen[name] = (module, _is_local(name, module, roots))
        if entry[1]:
            out.append(module)
    return out


def _is_local(name: str, module: object, roots: set[str]) -> bool:
    path = getattr(module, "__file__", None)
    if "." in name or name == "__main__" or not isinstance(module, types.ModuleType) or not path:
        return False
    path = os.path.abspath(path)
    top = os.path.dirname(os.path.dirname(path) if os.path.basename(path) == "__init__.py" else path)
    return top in roots and _is_user_module(module)


def _registered_by_value(module: types.ModuleType) -> bool:
    check = getattr(cloudpickle.cloudpickle, "_is_registered_pickle_by_value", None)
    return bool(check is not None and check(module))


def _code_names(code: types.CodeType) -> set[str]:
    """Every global name a function's code (nested functions and comprehensions included) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _check_ipython(fn: Callable[..., Any]) -> None:
    """Refuse a function that uses IPython magics or shell escapes: they need the notebook's shell."""
    code = getattr(fn, "__code__", None)
    shell_fn = getattr(fn, "__globals__", {}).get("get_ipython")
    if code is None or shell_fn is None or "get_ipython" not in _code_names(code):
        return
    if not str(getattr(shell_fn, "__module__", "") or "").startswith(("IPython", "ipykernel")):
        return
    raise PayloadError(
        f"function {fn.__qualname__!r} uses IPython magics or shell escapes (%magic, !command, or "
        "get_ipython()), which exist only in the notebook's own kernel, not in a job: call the library "
        "instead (e.g. subprocess.run([...]) for !command, time.perf_counter() for %time), and install "
        "packages with @remote(..., pip_requirements=[...]) rather than %pip")


def _dumps_by_value(obj: Any, module: types.ModuleType | None) -> bytes:
    """cloudpickle ``obj`` with the user's own modules by value: ``module`` when it is not
    installed, and every module imported from the working directory or the script's folder (a
    notebook's helpers). A notebook's functions and classes live in ``__main__``, which cloudpickle
    always pickles by value."""
    by_value = [module] if module is not None and _is_user_module(module) else []
    by_value += [m for m in _local_modules() if m is not module]
    registered = []
    for m in by_value:
        if not _registered_by_value(m):
            cloudpickle.register_pickle_by_value(m)
            registered.append(m)
    try:
        return cloudpickle.dumps(obj)
    finally:
        for m in registered:
            cloudpickle.unregister_pickle_by_value(m)


def pickle_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """cloudpickle the call; functions from the user's own modules travel by value."""
    _check_ipython(fn)
    try:
        return _dumps_by_value({"fn": fn, "args": args, "kwargs": kwargs}, sys.modules.get(fn.__module__))
    except Exception as e:  # noqa: BLE001
        raise PayloadError(_which_unpicklable(fn, args, kwargs, e)) from e


def pickle_args(qualname: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                module: types.ModuleType | None = None) -> bytes:
    """cloudpickle a registered function's call: only its arguments (the function is on the
    server); ``module``, the function's, travels by value as :func:`pickle_call` sends it."""
    try:
        return _dumps_by_value({"args": args, "kwargs": kwargs}, module)
    except Exception as e:  # noqa: BLE001
        for label, value in [*((f"#{i}", v) for i, v in enumerate(args)), *kwargs.items()]:
            try:
                cloudpickle.dumps(value)
            except Exception as ve:  # noqa: BLE001
                raise PayloadError(f"argument {label!r} of {qualname} ({type(value).__name__}) cannot be pickled: "
                                   f"{type(ve).__name__}: {ve}") from e
        raise PayloadError(f"the arguments of {qualname} cannot be pickled: {type(e).__name__}: {e}") from e


def _hint(value: Any) -> str:
    if type(value).__name__ == "Session" and type(value).__module__.startswith("mljobs"):
        return ("a job has its own Session: give the function a parameter annotated Session, or call "
                "get_active_session() inside it")
    return "create it inside the function (or pass what it needs, e.g. a path or a URL, as an argument)"


def _captured(fn: Callable[..., Any]) -> list[tuple[str, str, Any]]:
    """(kind, name, value) of the globals and closure variables a function's code uses."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return []
    out: list[tuple[str, str, Any]] = []
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
        try:
            out.append(("closure variable", name, cell.cell_contents))
        except ValueError:  # an empty cell
            continue
    glb = getattr(fn, "__globals__", {})
    out += [("global", name, glb[name]) for name in sorted(_code_names(code)) if name in glb]
    return out


def _which_unpicklable(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], err: Exception) -> str:
    try:
        cloudpickle.dumps(fn)
    except Exception as e:  # noqa: BLE001
        for kind, name, value in _captured(fn):
            if isinstance(value, types.ModuleType):
                continue
            try:
                cloudpickle.dumps(value)
            except Exception as ve:  # noqa: BLE001
                return (f"function {fn.__qualname__!r} cannot be pickled: it uses the {kind} {name!r} "
                        f"({type(value).__module__}.{type(value).__qualname__}), which cannot be pickled "
                        f"({type(ve).__name__}: {ve}); {_hint(value)}")
        return (f"function {fn.__qualname__!r} cannot be pickled ({type(e).__name__}: {e}); it may capture an "
                "open file, lock, connection or client: create those inside the function")
    params = list(inspect.signature(fn).parameters)
    for i, value in enumerate(args):
        try:
            cloudpickle.dumps(value)
        except Exception as e:  # noqa: BLE001
            label = params[i] if i < len(params) else f"#{i}"
            return f"argument {label!r} ({type(value).__name__}) cannot be pickled: {type(e).__name__}: {e}"
    for k, value in kwargs.items():
        try:
            cloudpickle.dumps(value)
        except Exception as e:  # noqa: BLE001
            return f"argument {k!r} ({type(value).__name__}) cannot be pickled: {type(e).__name__}: {e}"
    return f"the call cannot be pickled: {type(err).__name__}: {err}"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


# -- a payload's files: (name in the payload, local path) ------------------------------------------
Entries = list[tuple[str, Path]]


def _tree_entries(root: Path, prefix: str) -> Entries:
    if root.is_file():
        return [(f"{prefix}{root.name}" if prefix.endswith("/") or not prefix else prefix, root)]
    out: Entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not skip(d))
        rel = Path(dirpath).relative_to(root).as_posix()
        for f in sorted(filenames):
            path = Path(dirpath) / f
            if not skip(f) and path.is_file():
                out.append((f"{prefix}{'' if rel == '.' else rel + '/'}{f}", path))
    return out


def import_entries(imports: Iterable[Any] | None) -> Entries:
    """``imports``: local paths (a package folder or module file), or ``(path, "import.path")``."""
    out: Entries = []
    for item in imports or []:
        path, dotted = (item if isinstance(item, (tuple, list)) else (item, None))
        src = Path(path)
        if not src.exists():
            spec = importlib.util.find_spec(str(path)) if isinstance(path, str) and "/" not in str(path) else None
            if spec is None or not spec.origin:
                raise LocalFileNotFoundError(f"imports: {str(path)!r} is neither a local path nor an importable module")
            src = Path(spec.origin).parent if spec.submodule_search_locations else Path(spec.origin)
        if dotted:
            parts = dotted.split(".")
            target = "/".join(parts) + ("" if src.is_dir() else ".py")
        else:
            target = src.name
        out += _tree_entries(src, f"{IMPORTS_DIR}/{target}/" if src.is_dir() else f"{IMPORTS_DIR}/{target}")
    return out


def file_entries(path: Path, imports: Iterable[Any] | None) -> Entries:
    return [(path.name, path), *import_entries(imports)]


def directory_entries(path: Path, imports: Iterable[Any] | None) -> Entries:
    return [*_tree_entries(path, ""), *import_entries(imports)]


def _tar(build: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    # dereference: a link to a file sends the file, as the hashed path for large payloads does
    with tarfile.open(fileobj=buf, mode="w", dereference=True) as tar:
        build(tar)
    return buf.getvalue()


def tar_entries(entries: Entries) -> bytes:
    """A small payload's files as one tar in memory."""
    return _tar(lambda t: [t.add(path, arcname=name, recursive=False) for name, path in entries])


def tar_call(pickled: bytes, imports: Iterable[Any] | None, call: bytes | None = None) -> bytes:
    """A function's payload: its pickle, its imports' files and (``call``: the arguments pickled
    apart, :func:`pickle_args`) the call, which the launcher applies to it."""
    return _tar(lambda t: (_add_bytes(t, FUNCTION_PAYLOAD, pickled),
                           *([_add_bytes(t, CALL_PAYLOAD, call)] if call is not None else []),
                           [t.add(p, arcname=n, recursive=False) for n, p in import_entries(imports)]))


def tar_file(path: Path, imports: Iterable[Any] | None) -> bytes:
    return tar_entries(file_entries(path, imports))


def tar_directory(path: Path, imports: Iterable[Any] | None) -> bytes:
    return tar_entries(directory_entries(path, imports))


# -- large payloads: sent by content hash (mljobs.server.uploads) ----------------------------------
# (device, inode, size, mtime_ns) -> sha256: a file unchanged since this process last hashed it
_HASHES: dict[tuple[int, int, int, int], str] = {}


def manifest(entries: Entries) -> list[list[Any]]:
    """``[[name, sha256, size, mode], ...]`` of a payload's files."""
    out = []
    for name, path in entries:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        digest = _HASHES.get(key)
        if digest is None:
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
            digest = _HASHES[key] = sha.hexdigest()
        out.append([name, digest, st.st_size, st.st_mode & 0o777])
    return out


def tar_stream(entries: Entries, sizes: dict[str, int]) -> Iterator[bytes]:
    """A tar of ``entries``, produced as it is sent (a file at a time, 1 MiB at a time); each file
    is sent with the size its manifest gave (``sizes``), so one that changed meanwhile fails the
    server's hash check instead of corrupting the archive."""
    for name, path in entries:
        info = tarfile.TarInfo(name)
        info.size, info.mode = sizes[name], 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        left = info.size
        with open(path, "rb") as f:
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    raise PayloadError(f"{path} became shorter while it was being sent; submit again")
                left -= len(chunk)
                yield chunk
        if info.size % tarfile.BLOCKSIZE:
            yield tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)
