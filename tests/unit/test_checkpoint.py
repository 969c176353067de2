"""A checkpoint folder is kept only once it has settled, and
swaps each copy into place whole (runtime/checkpoint.py: a node agent onto the stage, a local
supervisor into its run folder). On a stage (a local folder, or S3 through a moto server) a
writer lost at any step leaves the last whole copy for the next attempt."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from mljobs.runtime.agent import _Checkpoint
from mljobs.paths import CHECKPOINT_DIR
from mljobs.runtime.checkpoint import StageFolder
from mljobs.stages import Stage


def test_a_folder_is_kept_once_settled_and_swapped_in_whole(tmp_path):
    stage = Stage("S", str(tmp_path / "stage"))
    stage.ensure()
    work = tmp_path / "work"
    folder = work / CHECKPOINT_DIR
    folder.mkdir(parents=True)
    ckpt = _Checkpoint(stage, {"keep_checkpoint": True, "work_dir": str(work), "job_id": "J", "instance_id": 0})

    class Kept:  # the file as the next attempt finds it: through the pointer
        @staticmethod
        def exists() -> bool:
            return StageFolder(stage, "J/checkpoint/0/").kept() is not None

        @staticmethod
        def read_bytes() -> bytes:
            return stage.get_bytes(StageFolder(stage, "J/checkpoint/0/").kept() + "model.pt")

    kept = Kept()

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
    # one copy and its pointer: no copy left beside it
    name = (tmp_path / "stage" / "J" / "checkpoint" / "0" / "CURRENT").read_text()
    assert sorted(os.listdir(tmp_path / "stage" / "J" / "checkpoint" / "0")) == ["CURRENT", name]


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
    keeper = checkpoint.Keeper(folder, checkpoint.LocalFolder(run / checkpoint.SETTLED))
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
    keeper = checkpoint.Keeper(folder, checkpoint.LocalFolder(run / checkpoint.SETTLED, uid))
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


@pytest.fixture(params=["local", "s3"])
def stage(request, tmp_path) -> Stage:
    if request.param == "local":
        st = Stage("S", str(tmp_path / "stage"))
    else:
        request.getfixturevalue("s3_endpoint")
        bucket = f"ckpt-{uuid.uuid4().hex[:12]}"  # moto's buckets outlive its server, in this process
        st = Stage("S", f"s3://{bucket}/stages/S")
        st.fs.mkdir(bucket)
    st.ensure()
    return st


def _restored(folder: StageFolder, tmp_path, name: str = "out") -> dict[str, str] | None:
    out = tmp_path / name
    if not folder.restore(out):
        return None
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}


def _names(stage: Stage, prefix: str) -> set[str]:
    stage.fs.invalidate_cache()
    return {f["name"][len(prefix):].split("/", 1)[0] for f in stage.list(prefix)}


def test_a_copy_on_a_stage_is_whole_whichever_step_its_writer_was_lost_at(stage, tmp_path):
    from mljobs.runtime import checkpoint

    prefix = "J/checkpoint/0/"
    kept = StageFolder(stage, prefix)
    assert kept.kept() is None and _restored(kept, tmp_path, "none") is None  # nothing kept yet
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "model.pt").write_text("epoch 1")
    (work / "sub" / "step").write_text("1")
    keeper = checkpoint.Keeper(work, kept)
    keeper.keep(every_s=0.0)
    assert _restored(kept, tmp_path, "a") == {"model.pt": "epoch 1", "sub/step": "1"}
    assert _names(stage, prefix) == {"CURRENT", kept.kept()[len(prefix):].rstrip("/")}

    # lost mid-upload of the next copy (one file of two there), and lost after uploading it whole
    # but before naming it: the next attempt finds the first copy
    half = kept.part()
    stage.put_bytes(half + "model.pt", b"epoch 2")
    whole = kept.part()
    kept.upload_dir(work, whole)
    assert _restored(kept, tmp_path, "b") == {"model.pt": "epoch 1", "sub/step": "1"}
    # the next copy named: what lost writers left goes, and only the named copy stays
    (work / "model.pt").write_text("epoch 3")
    keeper.keep(every_s=0.0)
    assert _restored(kept, tmp_path, "c") == {"model.pt": "epoch 3", "sub/step": "1"}
    assert _names(stage, prefix) == {"CURRENT", kept.kept()[len(prefix):].rstrip("/")}

    # lost after naming the new copy, before removing the old one: the named one is restored
    first = kept.kept()
    (work / "model.pt").write_text("epoch 4")
    second = kept.part()
    kept.upload_dir(work, second)
    stage.put_bytes(prefix + "CURRENT", second[len(prefix):].rstrip("/").encode())
    assert _restored(kept, tmp_path, "d") == {"model.pt": "epoch 4", "sub/step": "1"}
    assert stage.exists(first + "model.pt")

    # the job can write on its stage: a pointer that names anything but a copy restores nothing
    stage.put_bytes(prefix + "CURRENT", b"../../OTHER/checkpoint/0")
    assert _restored(kept, tmp_path, "e") is None


def test_a_folder_kept_before_pointers_is_restored_as_it_is(stage, tmp_path):
    stage.put_bytes("J/checkpoint/1/model.pt", b"old layout")
    assert _restored(StageFolder(stage, "J/checkpoint/1/"), tmp_path) == {"model.pt": "old layout"}


def test_a_supervisor_lost_between_its_two_renames_leaves_its_last_copy_found(tmp_path):
    from mljobs.runtime import checkpoint

    root = tmp_path / "run" / checkpoint.SETTLED
    (root / "settled.old-4242").mkdir(parents=True)  # renamed aside whole; its successor never renamed in
    (root / "settled.old-4242" / "step").write_text("5")
    (root / "settled.part-4242").mkdir()
    assert checkpoint.LocalFolder.kept(root) == root / "settled.old-4242"
    (root / "settled").mkdir()
    assert checkpoint.LocalFolder.kept(root) == root / "settled"
    assert checkpoint.LocalFolder.kept(tmp_path / "nothing") is None


def test_a_copy_named_stays_when_tidying_up_after_it_fails(tmp_path, monkeypatch):
    """Removing the older copy after the pointer names the new one is only tidying: its failure
    leaves the new copy named and whole (the next commit tidies again), and a folder's placeholder
    object (an empty name under the prefix) is never taken for a copy to remove."""
    from mljobs.runtime import checkpoint

    stage = Stage("S", str(tmp_path / "stage"))
    stage.ensure()
    kept = StageFolder(stage, "J/checkpoint/0/")
    work = tmp_path / "work"
    work.mkdir()
    (work / "step").write_text("1")
    keeper = checkpoint.Keeper(work, kept)
    keeper.keep(every_s=0.0)
    first = kept.kept()
    remove = Stage.remove

    def refuse_old(self, prefix):
        if prefix.rstrip("/") == first.rstrip("/"):
            raise PermissionError(f"cannot remove {prefix}")
        return remove(self, prefix)

    monkeypatch.setattr(Stage, "remove", refuse_old)
    (work / "step").write_text("2")
    keeper.keep(every_s=0.0)
    assert kept.kept() != first and _restored(kept, tmp_path, "a") == {"step": "2"}
    assert keeper.seen is not None and stage.exists(first)  # left for the next commit
    monkeypatch.setattr(Stage, "remove", remove)
    listed = Stage.list
    monkeypatch.setattr(Stage, "list", lambda self, prefix="": [*listed(self, prefix), {"name": prefix, "size": 0}])
    (work / "step").write_text("3")
    keeper.keep(every_s=0.0)
    assert _restored(kept, tmp_path, "b") == {"step": "3"} and not stage.exists(first)


def test_an_earlier_attempt_still_running_never_overrides_a_later_one(stage, tmp_path):
    """A node presumed lost whose agent still runs (a partition): its copies never replace, nor
    remove, what the next attempt keeps, and its keeper stops once it sees that attempt's copy."""
    from mljobs.runtime import checkpoint

    prefix = "J/checkpoint/0/"
    work1, work2 = tmp_path / "w1", tmp_path / "w2"
    for w, text in ((work1, "attempt 1"), (work2, "attempt 2")):
        w.mkdir()
        (w / "step").write_text(text)
    old, new = StageFolder(stage, prefix, attempt=1), StageFolder(stage, prefix, attempt=2)
    old.keep(work1)
    under_way = new.part()  # attempt 2 uploads its first copy...
    new.upload_dir(work2, under_way)
    (work1 / "step").write_text("attempt 1, later")
    old.keep(work1)  # ...while attempt 1 still keeps its own: it leaves attempt 2's alone
    assert stage.exists(under_way + "step")
    new.commit(under_way)
    assert _restored(StageFolder(stage, prefix), tmp_path, "a") == {"step": "attempt 2"}
    keeper = checkpoint.Keeper(work1, old)
    (work1 / "step").write_text("attempt 1, later still")
    keeper.keep(every_s=0.0)  # refused: attempt 2's copy stays named, and this keeper stops
    assert old.superseded and _restored(StageFolder(stage, prefix), tmp_path, "b") == {"step": "attempt 2"}
    assert _names(stage, prefix) == {"CURRENT", under_way[len(prefix):].rstrip("/")}
    with pytest.raises(checkpoint.Superseded, match="attempt 2 keeps"):
        old.commit(old.part())
