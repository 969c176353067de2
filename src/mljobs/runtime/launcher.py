"""Runs one payload inside an instance and writes its result envelope.

The envelope is a plain-pickled dict, written to a temporary file and renamed into place, so a
half-written result is never read::

    {"ok": True, "value": <cloudpickle bytes>, "repr": <the value's repr, at most REPR_CHARS>}
    {"ok": False, "exc_type": "mod.Name", "exc_message": str, "traceback": str,
     "exc_pickle": <cloudpickle bytes> | None, "exit_code": int | None}

Both hold only builtins (dicts, strings, bytes, ints), so the server reads the summary fields
with :func:`summarize_envelope`, which refuses every global and never unpickles the value.

``main`` can run in-process (forked from the supervisor, or called by a test) or as
``python -m mljobs.runtime.launcher RUN_DIR`` in another interpreter.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import reprlib
import runpy
import sys
import traceback
from typing import Any

import cloudpickle

from mljobs import trace
from mljobs.paths import CALL_PAYLOAD, CHECKPOINT_DIR, FUNCTION_PAYLOAD, IMPORTS_DIR

__all__ = ["main", "run_payload", "check_versions", "write_envelope", "read_envelope", "exception_envelope",
           "summarize_envelope", "bounded_repr", "REPR_CHARS"]

REPR_CHARS = 4000  # the most of a result's repr an envelope keeps (for the dashboard)

_INTERNAL_FILES = {os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>"}


class PayloadExit(Exception):
    """A script ended with a non-zero ``sys.exit`` or a command with a non-zero exit code."""

    def __init__(self, code: object) -> None:
        super().__init__(f"the payload exited with code {code}")
        self.code = code


def check_versions(client_python: str, client_cloudpickle: str, *, runtime_python: str | None = None,
                   runtime_cloudpickle: str | None = None) -> str | None:
    """Why pickles from this client cannot load in the runtime, or None when they can.

    The runtime is this interpreter unless ``runtime_python`` / ``runtime_cloudpickle`` name another.
    """
    here_py = runtime_python or "%d.%d.%d" % sys.version_info[:3]
    here_cp = runtime_cloudpickle or cloudpickle.__version__
    if client_python:
        client_mm = client_python.split(".")[:2]
        here = ".".join(here_py.split(".")[:2])
        if client_mm != here.split("."):
            return (
                f"the client runs Python {client_python} but the runtime runs Python {here_py}: "
                f"pickled functions only load on the same major.minor. Use Python {here} on the client, "
                f"install Python {'.'.join(client_mm)} on the server (it is then picked automatically), "
                "or submit a file or directory (submit_file / submit_directory), which does not pickle code."
            )
    if client_cloudpickle and client_cloudpickle.split(".")[0] != here_cp.split(".")[0]:
        return (
            f"the client has cloudpickle {client_cloudpickle} but the runtime has "
            f"{here_cp}: install cloudpickle=={here_cp} on the client"
        )
    return None


def _script_globals(path: str, args: list[str]) -> dict[str, Any]:
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(path))
    return runpy.run_path(path, run_name="__main__")


def _run_command(command: list[str], args: list[str], app: str) -> Any:
    """Run an entrypoint given as a command; Python ones run in-process so __return__ works."""
    head, rest = command[0], command[1:]
    if os.path.basename(head) in ("python", "python3") or head == sys.executable:
        if rest[:1] == ["-m"] and len(rest) >= 2:
            sys.argv = [rest[1], *rest[2:], *args]
            sys.path.insert(0, app)
            return runpy.run_module(rest[1], run_name="__main__", alter_sys=True).get("__return__")
        if rest and rest[0].endswith(".py"):
            return _script_globals(os.path.join(app, rest[0]), [*rest[1:], *args]).get("__return__")
    import subprocess  # only a command payload needs it (the spare that runs a job does not import it ahead)

    code = subprocess.call([*command, *args], cwd=os.getcwd())
    if code != 0:
        raise PayloadExit(code)
    return None


def run_payload(launch: dict[str, Any], session_factory: Any = None) -> Any:
    """Run the payload described by ``launch`` and return its value (raises what it raises)."""
    app = os.fspath(launch["app_dir"])
    imports_root = os.path.join(app, IMPORTS_DIR)
    if os.path.isdir(imports_root):
        sys.path.insert(0, imports_root)
    # kept on the job's stage across attempts: restored before this one, saved after it
    checkpoint = os.path.join(launch.get("work_dir") or os.getcwd(), CHECKPOINT_DIR)
    os.makedirs(checkpoint, exist_ok=True)
    os.environ["MLJOBS_CHECKPOINT_DIR"] = checkpoint
    kind = launch["payload_kind"]
    if kind == "function":
        with open(os.path.join(app, FUNCTION_PAYLOAD), "rb") as f:
            call = cloudpickle.load(f)
        try:  # a definition's call: its arguments travel apart from the function (its defaults)
            with open(os.path.join(app, CALL_PAYLOAD), "rb") as f:
                given = cloudpickle.load(f)
            call = {"fn": call["fn"], "args": tuple(given["args"]) or tuple(call["args"]),
                    "kwargs": {**call["kwargs"], **given["kwargs"]}}
        except FileNotFoundError:
            pass
        kwargs = dict(call["kwargs"])
        param = launch.get("session_param")
        if param and kwargs.get(param) is None and session_factory is not None:
            kwargs[param] = session_factory()
        sys.path.insert(0, app)
        return call["fn"](*call["args"], **kwargs)
    entry = launch["entrypoint"]
    args = list(launch.get("args") or [])
    if len(entry) == 1 and entry[0].endswith(".py"):
        return _script_globals(os.path.join(app, entry[0]), args).get("__return__")
    return _run_command(entry, args, app)


def _user_traceback(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename in _INTERNAL_FILES
                              or os.path.abspath(tb.tb_frame.f_code.co_filename) in _INTERNAL_FILES):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def exception_envelope(exc: BaseException) -> dict[str, Any]:
    exc_pickle: bytes | None
    try:
        exc_pickle = cloudpickle.dumps(exc)
        pickle.loads(exc_pickle)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        exc_pickle = None
    return {
        "ok": False,
        "exc_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "exc_message": str(exc),
        "traceback": _user_traceback(exc),
        "exc_pickle": exc_pickle,
        "exit_code": exc.code if isinstance(exc, PayloadExit) else None,
    }


def write_envelope(path: str | os.PathLike[str], envelope: dict[str, Any]) -> None:
    """Write the envelope atomically; for a failure also ``error.json`` beside it, which the
    server reads (the server never unpickles what a payload wrote)."""
    path = os.fspath(path)
    if not envelope["ok"]:
        summary = {k: envelope[k] for k in ("exc_type", "exc_message", "exit_code")}
        err = os.path.join(os.path.dirname(path), "error.json")
        with open(err + ".tmp", "w") as f:
            json.dump(summary, f, default=str)
        os.replace(err + ".tmp", err)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(envelope, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def read_envelope(data: bytes) -> dict[str, Any]:
    return pickle.loads(data)


class _BuiltinsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the envelope names {module}.{name}; an envelope holds only builtins")


def summarize_envelope(data: bytes) -> dict[str, Any]:
    """An envelope's fields without its value or exception object, safe to read in the server: the
    outer pickle may hold only builtins (anything else raises ``pickle.UnpicklingError``), and the
    job's own pickles inside it stay bytes, never loaded."""
    env = _BuiltinsOnly(io.BytesIO(data)).load()
    if not isinstance(env, dict) or "ok" not in env:
        raise pickle.UnpicklingError("not a result envelope")
    return {k: v for k, v in env.items() if k not in ("value", "exc_pickle")}


def bounded_repr(value: Any, limit: int = REPR_CHARS) -> str:
    """``repr(value)`` shortened to ``limit`` characters (containers abbreviated by reprlib first)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset, r.maxstring, r.maxother = 4, 50, 50, 50, 50, 2000, limit
    try:
        text = r.repr(value)
    except Exception as e:  # a broken __repr__ must not cost the job its result
        text = f"<{type(value).__name__} whose repr failed: {type(e).__name__}: {e}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _session_factory() -> Any:
    # Imported here, not at the top: the client (httpx) costs ~100 ms and only payloads that
    # ask for a session need it.
    from mljobs.client.session import Session

    return Session.builder.getOrCreate()


def main(launch: dict[str, Any]) -> int:
    """Run the payload and write the envelope; 0 on success, 1 when the payload failed."""
    result_path = launch["result_file"]
    problem = check_versions(launch.get("client_python", ""), launch.get("client_cloudpickle", ""))
    if problem and launch["payload_kind"] == "function":
        envelope = {"ok": False, "exc_type": "mljobs.errors.VersionMismatchError", "exc_message": problem,
                    "traceback": problem + "\n", "exc_pickle": None, "exit_code": None}
        write_envelope(result_path, envelope)
        print(problem, file=sys.stderr)
        return 1
    trace.mark(launch.get("job_id", ""), "launcher.start")
    try:
        value = run_payload(launch, _session_factory)
    except SystemExit as e:
        if e.code in (None, 0):
            value = None
        else:
            exc = PayloadExit(e.code)
            exc.__traceback__ = e.__traceback__
            envelope = exception_envelope(exc)
            write_envelope(result_path, envelope)
            return 1
    except BaseException as e:  # noqa: BLE001 - every failure travels as data
        envelope = exception_envelope(e)
        sys.stderr.write(envelope["traceback"])
        write_envelope(result_path, envelope)
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        envelope = {"ok": True, "value": cloudpickle.dumps(value), "repr": bounded_repr(value)}
    except Exception as e:  # noqa: BLE001
        err = TypeError(f"the job's result of type {type(value).__name__} cannot be pickled: {e}")
        write_envelope(result_path, exception_envelope(err))
        print(err, file=sys.stderr)
        return 1
    trace.mark(launch.get("job_id", ""), "launcher.payload.returned")
    write_envelope(result_path, envelope)
    trace.mark(launch.get("job_id", ""), "launcher.result.written")
    return 0


if __name__ == "__main__":
    with open(os.path.join(sys.argv[1], "launch.json")) as f:
        sys.exit(main(json.load(f)))
