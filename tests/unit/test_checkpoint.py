"""A checkpoint folder is kept only once it has settled, and
swaps each copy into place whole (runtime/checkpoint.py: a node agent onto the stage, a local
supervisor into its run folder)."""

from __future__ import annotations

import os

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


def test_a_local_supervisor_keeps_its_settled_copy_in_its_run_folder(tmp_path):
    from mljobs.runtime import checkpoint

    folder, run = tmp_path / "work" / CHECKPOINT_DIR, tmp_path / "run"
    folder.mkdir(parents=True)
    run.mkdir()
    keeper = checkpoint.Keeper(folder, checkpoint.LocalFolder(run), checkpoint.SETTLED)
    settled = run / checkpoint.SETTLED / "step"

    def look() -> None:
        keeper.last = 0.0
        keeper.keep(every_s=2.0)

    (folder / "step").write_text("5")
    look()
    assert not settled.exists()  # seen once: not settled yet
    look()
    assert settled.read_text() == "5"
    (folder / "step").write_text("9-partial")  # being rewritten: changed since the last look
    look()
    assert settled.read_text() == "5"
    look()
    assert settled.read_text() == "9-partial"  # unchanged at two looks: settled, swapped in whole
    assert sorted(os.listdir(run)) == [checkpoint.SETTLED]  # no part or old copy left beside it
