"""Stage folders the server writes from a job's files: checkpoints (upload_dir) and a definition's
payload linked into a job (copy_dir)."""

from __future__ import annotations

import os
from pathlib import Path

from mljobs.stages import Stage


def test_upload_dir_keeps_plain_files_only_and_replaces_what_was_there(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("the server's")
    ck = tmp_path / "ck"
    (ck / "sub").mkdir(parents=True)
    (ck / "model.pt").write_bytes(b"weights")
    (ck / "sub" / "step").write_text("5")
    os.symlink(secret, ck / "link-to-secret")  # a job's link must not make the server copy its target
    os.symlink(tmp_path, ck / "dir-link")
    os.mkfifo(ck / "fifo")
    stage = Stage("S", str(tmp_path / "stage"))
    stage.ensure()
    stage.put_bytes("J/checkpoint/0/stale", b"old")
    assert stage.upload_dir(ck, "J/checkpoint/0/", link=True) == 2
    names = sorted(f["name"] for f in stage.list("J/checkpoint/0/"))
    assert names == ["J/checkpoint/0/model.pt", "J/checkpoint/0/sub/step"]
    kept = Path(stage.local_path("J/checkpoint/0/model.pt"))
    assert kept.read_bytes() == b"weights" and kept.samefile(ck / "model.pt")  # a link, not a copy
    # without link (a folder still being written: a node's live checkpoint), copies
    assert stage.upload_dir(ck, "J/checkpoint/0/") == 2
    assert not Path(stage.local_path("J/checkpoint/0/model.pt")).samefile(ck / "model.pt")


def test_copy_dir_links_between_local_folders(tmp_path: Path) -> None:
    stage = Stage("S", str(tmp_path / "stage"))
    stage.ensure()
    stage.put_bytes("_definitions/u/D/1/app/function.pkl", b"fn")
    stage.put_bytes("_definitions/u/D/1/app/.imports/m.py", b"x = 1")
    assert stage.copy_dir("_definitions/u/D/1/app/", stage, "JOB/app/") == 2
    a = Path(stage.local_path("JOB/app/function.pkl"))
    assert a.samefile(stage.local_path("_definitions/u/D/1/app/function.pkl"))
    assert stage.get_bytes("JOB/app/.imports/m.py") == b"x = 1"
