"""Large payloads go by content hash (mljobs.server.uploads): what the stage has is not sent again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import textwrap

import pytest

import mljobs
from mljobs.client.jobs import LARGE_PAYLOAD
from mljobs.errors import InvalidArgumentError, NotFoundError
from mljobs.stages import tar_bytes

MAIN = textwrap.dedent("""
    import hashlib, os
    files = {}
    for d, _, fs in os.walk("."):
        for f in fs:
            p = os.path.relpath(os.path.join(d, f))
            with open(p, "rb") as fh:
                files[p] = hashlib.sha256(fh.read()).hexdigest()
    __return__ = (files, oct(os.stat("tool.sh").st_mode))
""")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sent(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("payload: ")]


def test_a_large_directory_is_sent_once_and_a_changed_file_alone_after(lite, sqlite_server, tmp_path, caplog):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (root / "main.py").write_text(MAIN)
    (root / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "tool.sh").chmod(0o755)
    blobs = {f"data/part-{i}.bin": os.urandom(LARGE_PAYLOAD // 3 + i) for i in range(4)}
    for name, data in blobs.items():
        (root / name).write_bytes(data)
    lib = tmp_path / "helpers.py"  # an import beside the directory travels too
    lib.write_text("X = 1\n")
    caplog.set_level(logging.INFO, logger="mljobs.client")

    job = mljobs.submit_directory(root, "DEFAULT_POOL", entrypoint="main.py", stage_name="big", imports=[lib],
                                  session=lite)
    files, executable = job.result(timeout=120)
    assert {k: v for k, v in files.items() if k.startswith("data/")} == {k: _sha(v) for k, v in blobs.items()}
    assert "main.py" in files and "tool.sh" in files and any(k.endswith("helpers.py") for k in files)
    assert executable == "0o100755"  # the file's mode travels with it
    assert _sent(caplog)[-1].startswith("payload: 7 files (") and "0 already on @BIG, 7 sent" in _sent(caplog)[-1]

    changed = os.urandom(1000)
    (root / "data" / "part-0.bin").write_bytes(changed)
    job2 = mljobs.submit_directory(root, "DEFAULT_POOL", entrypoint="main.py", stage_name="big", imports=[lib],
                                   session=lite)
    files2, _ = job2.result(timeout=120)
    assert files2["data/part-0.bin"] == _sha(changed)
    assert files2["data/part-3.bin"] == _sha(blobs["data/part-3.bin"])
    assert "6 already on @BIG, 1 sent (1000 B)" in _sent(caplog)[-1]

    stage = sqlite_server.home / "stages" / "BIG"
    assert os.listdir(stage / ".mljobs" / "uploads") == []  # each upload became its job's app folder
    # the first job's files are its own: the blobs are copies, not links to them
    assert os.stat(stage / job.id / "app" / "data" / "part-1.bin").st_nlink == 1

    # a definition registered from the same directory goes by content hash too: nothing is sent
    defn = mljobs.MLJobDefinition.register(root, "DEFAULT_POOL", "big", entrypoint="main.py", imports=[lib],
                                           session=lite)
    assert "7 already on @BIG, 0 sent" in _sent(caplog)[-1]
    files3, _ = defn().result(timeout=120)
    assert files3 == files2
    assert os.listdir(stage / ".mljobs" / "uploads") == []


def test_bad_uploads_are_refused_and_change_nothing(lite, sqlite_server):
    good = os.urandom(1000)
    manifest = [["main.py", _sha(b"print(1)\n"), 9, 0o644], ["data.bin", _sha(good), len(good), 0o644]]
    with pytest.raises(InvalidArgumentError, match="leaves the payload folder"):
        lite.request("POST", "/stages/up/uploads", json={"files": [["../x.py", _sha(b""), 0, 0o644]]})
    with pytest.raises(InvalidArgumentError, match="hex SHA-256"):
        lite.request("POST", "/stages/up/uploads", json={"files": [["x.py", "abc", 0, 0o644]]})
    with pytest.raises(InvalidArgumentError, match="'a' both as a file and as a folder"):
        lite.request("POST", "/stages/up/uploads", json={"files": [["a", _sha(b""), 0, 0o644], ["a/b", _sha(b""), 0, 0o644]]})
    with pytest.raises(NotFoundError, match="does not exist"):
        lite.request("PUT", "/stages/up/uploads/" + "0" * 32, content=b"")
    with pytest.raises(InvalidArgumentError, match="mljobs' own"):  # no planted blob for a later upload to reuse
        lite.request("PUT", f"/stages/up/files/.mljobs/blobs/{_sha(good)}", content=os.urandom(1000))

    up = lite.request("POST", "/stages/up/uploads", json={"files": manifest}).json()
    assert sorted(up["missing"]) == ["data.bin", "main.py"]

    with pytest.raises(InvalidArgumentError, match="does not match the SHA-256"):  # same size, other bytes
        lite.request("PUT", f"/stages/up/uploads/{up['id']}", content=tar_bytes({"data.bin": os.urandom(1000)}))
    with pytest.raises(InvalidArgumentError, match="not in its manifest"):
        lite.request("PUT", f"/stages/up/uploads/{up['id']}", content=tar_bytes({"other.bin": good}))
    assert not (sqlite_server.home / "stages" / "UP" / ".mljobs" / "blobs").exists()  # nothing kept
    spec = {"compute_pool": "DEFAULT_POOL", "stage_name": "up", "payload_kind": "directory", "entrypoint": ["main.py"]}

    with pytest.raises(InvalidArgumentError, match="missing 2 of its files"):
        lite.request("POST", "/jobs", data={"spec": json.dumps(spec), "upload": up["id"]})

    got = lite.request("PUT", f"/stages/up/uploads/{up['id']}", content=tar_bytes({"main.py": b"print(1)\n", "data.bin": good}))
    assert got.json() == {"files": 2, "bytes": 1009}
    info = lite.request("POST", "/jobs", data={"spec": json.dumps(spec), "upload": up["id"]}).json()
    assert mljobs.get_job(info["id"], session=lite).wait(timeout=60) == "DONE"
    with pytest.raises(NotFoundError, match="already used"):  # an upload makes one job
        lite.request("POST", "/jobs", data={"spec": json.dumps(spec), "upload": up["id"]})
