"""The launcher, run in-process (no server, no subprocess)."""

from __future__ import annotations

import json
import pickle
import sys

import cloudpickle

from mljobs.runtime import launcher


def _launch(tmp_path, **kw):
    app = tmp_path / "app"
    app.mkdir(exist_ok=True)
    return {"app_dir": str(app), "result_file": str(tmp_path / "result.pkl"), "payload_kind": "file",
            "entrypoint": ["main.py"], "args": [], "client_python": "", "client_cloudpickle": "", **kw}


def _envelope(tmp_path):
    return pickle.loads((tmp_path / "result.pkl").read_bytes())


def test_function_payload(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    launch = _launch(tmp_path, payload_kind="function")
    (tmp_path / "app" / "function.pkl").write_bytes(
        cloudpickle.dumps({"fn": lambda a, b=1: a + b, "args": (2,), "kwargs": {"b": 5}}))
    assert launcher.main(launch) == 0
    env = _envelope(tmp_path)
    assert env["ok"] and cloudpickle.loads(env["value"]) == 7


def test_script_return_argv_and_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "app" / "main.py").parent.mkdir(exist_ok=True)
    (tmp_path / "app" / "main.py").write_text("import sys\n__return__ = sys.argv[1:]\n")
    assert launcher.main(_launch(tmp_path, args=["a", "b"])) == 0
    assert cloudpickle.loads(_envelope(tmp_path)["value"]) == ["a", "b"]
    (tmp_path / "app" / "main.py").write_text("def f():\n    raise KeyError('k')\nf()\n")
    assert launcher.main(_launch(tmp_path)) == 1
    env = _envelope(tmp_path)
    assert env["exc_type"] == "builtins.KeyError" and "in f" in env["traceback"]
    assert "launcher.py" not in env["traceback"] and "runpy" not in env["traceback"]
    assert json.loads((tmp_path / "error.json").read_text())["exc_type"] == "builtins.KeyError"


def test_sys_exit_codes(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "app").mkdir(exist_ok=True)
    (tmp_path / "app" / "main.py").write_text("import sys\nsys.exit(0)\n")
    assert launcher.main(_launch(tmp_path)) == 0
    (tmp_path / "app" / "main.py").write_text("import sys\nsys.exit(3)\n")
    assert launcher.main(_launch(tmp_path)) == 1
    assert _envelope(tmp_path)["exit_code"] == 3


def test_version_check_names_both():
    msg = launcher.check_versions("3.10.1", "")
    assert "3.10.1" in msg and "%d.%d" % sys.version_info[:2] in msg
    assert launcher.check_versions("%d.%d.0" % sys.version_info[:2], cloudpickle.__version__) is None
    assert "cloudpickle" in launcher.check_versions("", "1.0.0")
