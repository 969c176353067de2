"""Calls from a notebook: what cannot travel is named at submit; helpers beside it travel by value."""

from __future__ import annotations

import sqlite3
import sys

import pytest

from mljobs.client import payload as pl
from mljobs.errors import PayloadError


def test_unpicklable_global_and_magics_are_named():
    glb = {"conn": sqlite3.connect(":memory:"), "__builtins__": __builtins__}
    exec("def query():\n    return conn.execute('select 1').fetchall()\n", glb)
    with pytest.raises(PayloadError, match=r"uses the global 'conn' \(sqlite3\.Connection\)"):
        pl.pickle_call(glb["query"], (), {})

    def get_ipython():  # what an IPython shell puts in a notebook's namespace
        raise AssertionError("never called")

    get_ipython.__module__ = "IPython.core.interactiveshell"
    glb = {"get_ipython": get_ipython, "__builtins__": __builtins__}
    exec("def shell():\n    return get_ipython().getoutput('echo hi')\n", glb)
    with pytest.raises(PayloadError, match="uses IPython magics or shell escapes"):
        pl.pickle_call(glb["shell"], (), {})


def test_modules_beside_the_notebook_travel_by_value(tmp_path, monkeypatch):
    import cloudpickle

    (tmp_path / "nb_local_helpers.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import nb_local_helpers

    try:
        assert nb_local_helpers in pl._local_modules()
        glb = {"triple": nb_local_helpers.triple, "__builtins__": __builtins__}
        exec("def f(x):\n    return triple(x)\n", glb)
        blob = pl.pickle_call(glb["f"], (2,), {})
        # as in a job, which cannot import it: neither loaded, nor on the path, nor in the folder
        del sys.modules["nb_local_helpers"]
        sys.path.remove(str(tmp_path))
        monkeypatch.chdir(tmp_path.parent)
        call = cloudpickle.loads(blob)
        assert call["fn"](*call["args"]) == 6
        assert not cloudpickle.cloudpickle._is_registered_pickle_by_value(nb_local_helpers)
    finally:
        sys.modules.pop("nb_local_helpers", None)
