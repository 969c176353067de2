"""Packaging payloads: a pickled call, a file, or a directory, as one tar stream."""

from __future__ import annotations

import importlib.util
import inspect
import io
import os
import sys
import sysconfig
import tarfile
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cloudpickle

from mljobs.errors import InvalidArgumentError, LocalFileNotFoundError, PayloadError
from mljobs.paths import FUNCTION_PAYLOAD, IMPORTS_DIR
from mljobs.stages import skip

__all__ = ["pickle_call", "tar_call", "tar_file", "tar_directory", "check_function", "session_parameter"]

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


def pickle_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """cloudpickle the call; functions from the user's own modules travel by value."""
    module = sys.modules.get(fn.__module__)
    by_value = module is not None and _is_user_module(module)
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps({"fn": fn, "args": args, "kwargs": kwargs})
    except Exception as e:  # noqa: BLE001
        raise PayloadError(_which_unpicklable(fn, args, kwargs, e)) from e
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


def _which_unpicklable(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], err: Exception) -> str:
    try:
        cloudpickle.dumps(fn)
    except Exception as e:  # noqa: BLE001
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


def _add_tree(tar: tarfile.TarFile, root: Path, prefix: str) -> None:
    if root.is_file():
        tar.add(root, arcname=f"{prefix}{root.name}" if prefix.endswith("/") or not prefix else prefix)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not skip(d))
        rel = Path(dirpath).relative_to(root).as_posix()
        for f in sorted(filenames):
            if skip(f):
                continue
            tar.add(Path(dirpath) / f, arcname=f"{prefix}{'' if rel == '.' else rel + '/'}{f}", recursive=False)


def _add_imports(tar: tarfile.TarFile, imports: Iterable[Any]) -> None:
    """``imports``: local paths (a package folder or module file), or ``(path, "import.path")``."""
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
        _add_tree(tar, src, f"{IMPORTS_DIR}/{target}/" if src.is_dir() else f"{IMPORTS_DIR}/{target}")


def _tar(build: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        build(tar)
    return buf.getvalue()


def tar_call(pickled: bytes, imports: Iterable[Any] | None) -> bytes:
    return _tar(lambda t: (_add_bytes(t, FUNCTION_PAYLOAD, pickled), _add_imports(t, imports or [])))


def tar_file(path: Path, imports: Iterable[Any] | None) -> bytes:
    return _tar(lambda t: (t.add(path, arcname=path.name), _add_imports(t, imports or [])))


def tar_directory(path: Path, imports: Iterable[Any] | None) -> bytes:
    return _tar(lambda t: (_add_tree(t, path, ""), _add_imports(t, imports or [])))
