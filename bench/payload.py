"""submit_directory of a large directory: client and server peak memory, upload speed, resubmission.

    python bench/payload.py [--mb 500] [--files 50] [--base REF]

Each side (the working tree, and REF's code with ``--base``) starts a real server (the tests'
ServerProc, a fresh MLJOBS_HOME) and, in a client process of its own, submits a directory of
``--files`` random files holding ``--mb`` MB in all, twice: first as it is, then with one file
changed. It prints, per side: the first submission's seconds and MB/s (submit call to the job
handle), the client's peak resident memory (``ru_maxrss`` of the client process), the server's
(its ``VmHWM``), and the second submission's seconds. The floor beside them is ``cp -r`` of the
same directory on the same disk (what any upload through a local stage costs at least).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_dir(root: Path, mb: int, files: int) -> None:
    (root / "data").mkdir(parents=True)
    (root / "main.py").write_text("import os\nprint(sum(f.stat().st_size for f in os.scandir('data')))\n")
    chunk = max(1, mb * 2**20 // files)
    for i in range(files):
        with open(root / "data" / f"part-{i:04d}.bin", "wb") as f:
            f.write(os.urandom(chunk))


def client(url: str, folder: str) -> None:
    """The client side of a half, in its own process so its peak memory is its own."""
    import mljobs

    s = mljobs.Session(url=url)
    out = {}
    for label in ("first", "second"):
        if label == "second":  # one file changed
            with open(Path(folder) / "data" / "part-0000.bin", "r+b") as f:
                f.write(os.urandom(4096))
        t = time.perf_counter()
        job = mljobs.submit_directory(folder, "DEFAULT_POOL", entrypoint="main.py", stage_name="bench", session=s)
        out[label] = time.perf_counter() - t
        assert job.wait(timeout=600) == "DONE", job.get_logs()
    out["client_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def half(tree: Path, folder: Path) -> dict[str, float]:
    sys.path.insert(0, str(tree / "tests"))
    from conftest import ServerProc  # the tests' real-server helper, from the tree under test

    home = Path(tempfile.mkdtemp(prefix="mljobs-bench-payload-"))
    srv = ServerProc(home)
    srv.start()
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "src"), os.environ.get("PYTHONPATH", "")]))
        out = subprocess.run([sys.executable, __file__, "--client", srv.url, str(folder)], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"the client for {tree} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        status = Path(f"/proc/{srv.proc.pid}/status").read_text()
        result["server_peak_mb"] = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]) / 1024
        return result
    finally:
        srv.stop()
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--base", help="a git ref to compare the working tree with, in the same run")
    ap.add_argument("--client", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--half", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.client:
        client(*a.client)
        return
    if a.half:
        print(json.dumps(half(Path(a.half[0]), Path(a.half[1]))))
        return
    sides: list[tuple[str, Path]] = [("working tree", ROOT)]
    worktree = None
    if a.base:
        worktree = Path(tempfile.mkdtemp(prefix="mljobs-base-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), a.base], check=True,
                       capture_output=True)
        sides.insert(0, (f"base {a.base}", worktree))
    scratch = Path(tempfile.mkdtemp(prefix="mljobs-bench-dir-"))
    try:
        make_dir(scratch / "src", a.mb, a.files)
        t = time.perf_counter()
        subprocess.run(["cp", "-r", str(scratch / "src"), str(scratch / "copy")], check=True)
        floor = time.perf_counter() - t
        shutil.rmtree(scratch / "copy")
        print(f"{a.mb} MB in {a.files} files; floor `cp -r` {floor:.2f} s ({a.mb / floor:.0f} MB/s)")
        print(f"{'side':<28} {'first s':>8} {'MB/s':>6} {'client MB':>10} {'server MB':>10} {'one changed s':>14}")
        for label, tree in sides:
            folder = scratch / f"dir-{len(label)}"
            shutil.copytree(scratch / "src", folder)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "src"), os.environ.get("PYTHONPATH", "")]))
            out = subprocess.run([sys.executable, __file__, "--half", str(tree), str(folder)], env=env,
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"the half for {tree} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{label:<28} {r['first']:>8.2f} {a.mb / r['first']:>6.0f} {r['client_peak_mb']:>10.0f} "
                  f"{r['server_peak_mb']:>10.0f} {r['second']:>14.2f}", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)


if __name__ == "__main__":
    main()
