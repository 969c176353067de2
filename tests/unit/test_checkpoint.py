"""A checkpoint folder is kept only once it has settled, and
swaps each copy into place whole (runtime/checkpoint.py: a node agent onto the stage, a local
supervisor into its run folder)."""

from __future__ import annotations

import os
import time

import pytest

from mljobs.runtime.agent import _Checkpoint
from mljobs.paths import CHECKPOINT_DIR
from mljobs.stages import Stage


def test_a_folder_is_kept_once_settled_and_swapped_in_whole(tmp_path):
    stage = Stage("S", str(tmp_path / "stage"))
    stage.ensure()
    work = tmp_path / "work"
    folder = work / CHECKPOINT_DIR
    folder.mkdir(parents=True)
    ckpt = _Checkpoint(stage, {"keep_checkpoint": True, "work_dir": str(work), "job_id": "J", "instance_id": 0})
    kept = tmp_path / "stage" / "J" / "checkpoint" / "0" / "model.pt"

    def look() -> None:
        ckpt.last = 0.0  # a heartbeat has passed
        ckpt.keep(every_s=5.0)  # a look while it runs

    look()
    look()
    assert not (tmp_path / "stage" / "J").exists()  # an empty folder: nothing to keep, and no error
    (folder / "model.pt").write_bytes(b"epoch 1")
    look()
    assert not kept.exists()  # seen once: it may still be being written
    look()
    assert kept.read_bytes() == b"epoch 1"  # the same at two looks: kept
    with open(folder / "model.pt", "ab") as f:  # written in place, half-way at this look
        f.write(b" + half of epoch 2")
        f.flush()
        look()
        assert kept.read_bytes() == b"epoch 1"  # the last settled copy stays
        f.write(b" + the rest")
    os.utime(folder / "model.pt", ns=(1, 1))
    look()
    assert kept.read_bytes() == b"epoch 1"
    look()
    assert kept.read_bytes() == b"epoch 1 + half of epoch 2 + the rest"
    (folder / "model.pt").write_bytes(b"final")
    ckpt.keep(every_s=0.0)  # the instance ended: whatever it holds
    assert kept.read_bytes() == b"final"
    assert sorted(os.listdir(tmp_path / "stage" / "J" / "checkpoint")) == ["0"]  # no copy left beside it


def _wait(keeper, every_s: float = 2.0) -> None:
    """A look, then until the copy it may have started has ended."""
    keeper.last = 0.0
    keeper.keep(every_s=every_s)
    deadline = time.monotonic() + 30
    while keeper.pending is not None and time.monotonic() < deadline:
        time.sleep(0.01)
        keeper.keep(every_s=3600.0)  # only finishes the copy under way
    assert keeper.pending is None


def test_a_local_supervisor_keeps_its_settled_copy_in_its_run_folder(tmp_path):
    from mljobs.runtime import checkpoint

    folder, run = tmp_path / "work" / CHECKPOINT_DIR, tmp_path / "run"
    folder.mkdir(parents=True)
    run.mkdir()
    keeper = checkpoint.Keeper(folder, checkpoint.LocalFolder(run / checkpoint.SETTLED), "settled")
    settled = run / checkpoint.SETTLED / "settled" / "step"

    (folder / "step").write_text("5")
    _wait(keeper)
    assert not settled.exists()  # seen once: not settled yet
    _wait(keeper)
    assert settled.read_text() == "5"
    (folder / "step").write_text("9-partial")  # being rewritten: changed since the last look
    _wait(keeper)
    assert settled.read_text() == "5"
    _wait(keeper)
    assert settled.read_text() == "9-partial"  # unchanged at two looks: settled, swapped in whole
    assert sorted(os.listdir(run / checkpoint.SETTLED)) == ["settled"]  # no part or old copy beside it


@pytest.mark.skipif(os.geteuid() != 0, reason="a copy as another uid needs root (CI runs as root)")
def test_the_copy_is_made_as_the_jobs_uid_and_never_holds_up_the_supervisor(tmp_path):
    """As root, the copy is the job's: a file only root may read (here linked in by the job) is
    not copied; a named pipe makes the copy fail, not hang; :meth:`close` stops one under way."""
    from mljobs.runtime import checkpoint

    uid = 310077
    folder, run = tmp_path / "work" / CHECKPOINT_DIR, tmp_path / "run"
    folder.mkdir(parents=True)
    run.mkdir()
    for d in (tmp_path, tmp_path / "work", folder):
        d.chmod(0o755)
    secret = tmp_path / "secret"
    secret.write_text("root's")
    secret.chmod(0o600)
    (folder / "step").write_text("5")
    os.symlink(secret, folder / "link")  # kept as a link, never as what it points at
    keeper = checkpoint.Keeper(folder, checkpoint.LocalFolder(run / checkpoint.SETTLED, uid), "settled")
    _wait(keeper)
    _wait(keeper)
    kept = run / checkpoint.SETTLED / "settled"
    assert (kept / "step").read_text() == "5" and os.readlink(kept / "link") == str(secret)
    assert (kept / "step").stat().st_uid == uid  # made by the job's uid
    (tmp_path / "mine").mkdir(mode=0o700)  # a folder only root may enter: the job's uid cannot copy it
    (tmp_path / "mine" / "x").write_text("root's too")
    os.rename(tmp_path / "mine", folder / "sub")
    _wait(keeper)
    _wait(keeper)
    assert not (kept / "sub").exists() and (kept / "step").read_text() == "5"  # the copy failed; the last stays
    os.rename(folder / "sub", tmp_path / "mine")
    os.mkfifo(folder / "pipe")
    (folder / "step").write_text("6")
    t = time.monotonic()
    _wait(keeper)
    _wait(keeper)
    assert time.monotonic() - t < 10 and (kept / "step").read_text() == "5"  # a pipe: refused, not waited on
    os.unlink(folder / "pipe")
    _wait(keeper)
    keeper.last = 0.0
    keeper.keep(every_s=2.0)  # a copy starts...
    keeper.close()  # ...and is stopped: the last settled copy stays, nothing beside it
    assert sorted(os.listdir(run / checkpoint.SETTLED)) == ["settled"]
