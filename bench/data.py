"""DataConnector over Parquet: to_pandas beside pyarrow's own reader, and the memory of streaming to torch.

    python bench/data.py [--rows 2000000] [--cols 20] [--files 8] [--row-group 65536]
                         [--runs 5] [--batch 4096]

One data set, written to a temp folder: --rows rows of --cols float64 columns as Parquet, in --files
files with row groups of --row-group rows. Then, side by side:
- to_pandas: best of --runs wall times of `DataConnector.from_sources(dir).to_pandas()` and of
  `pyarrow.parquet.read_table(dir).to_pandas()`, taken in turns (ABBA), and their ratio (pyarrow's time
  over the connector's: the goal is 0.8x or more);
- streaming: the peak memory of a child process that reads the whole data set through
  `to_torch_dataset(batch_size=--batch)` (every tensor summed), less the child's own after its
  imports and a warm-up, beside one batch's size and the whole data set's; and, for scale, the same
  figure for children that load it all with the connector's `to_pandas()` and with pyarrow's.
Memory is the child's resident set: its peak (VmHWM) less its size (VmRSS) when the read starts,
the peak reset there through /proc/self/clear_refs. (The child's ru_maxrss would not do: Linux
carries the parent's resident set, at the fork, over into it.) Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def write_data(folder: Path, rows: int, cols: int, files: int, row_group: int) -> int:
    """The data set as Parquet files; returns its size in memory (bytes of float64 values)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    bounds = [rows * k // files for k in range(files + 1)]
    for k in range(files):
        n = bounds[k + 1] - bounds[k]
        table = pa.table({f"c{j:02d}": rng.standard_normal(n) for j in range(cols)})
        pq.write_table(table, folder / f"part-{k:04d}.parquet", row_group_size=row_group)
    os.sync()  # no writeback of the new files during the timings
    return rows * cols * 8


def best_of(runs: int, fns: dict[str, object]) -> dict[str, float]:
    """The best wall time of each function over ``runs`` rounds, the functions taken in turns, in
    the opposite order every other round (the one that runs second finds memory the first freed)."""
    best = {name: float("inf") for name in fns}
    for r in range(runs):
        for name, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
            t = time.perf_counter()
            fn()  # type: ignore[operator]
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, folder: str, batch: int) -> None:
    """In a child: read the data set (``stream``, ``full`` or ``pyarrow``), print memory figures as JSON."""
    import importlib

    import pyarrow.parquet as pq
    import torch

    importlib.import_module("pandas")  # imported before the baseline, as a trainer would have it

    from mljobs.data import DataConnector

    # Warm-up on a few rows, so that the baseline holds the code paths the read will page in.
    first = sorted(Path(folder).glob("*.parquet"))[0]
    small = DataConnector.from_dataframe(next(DataConnector.from_sources(str(first)).iter_batches(64)))
    for b in small.to_torch_dataset(batch_size=16):
        sum(float(t.sum()) for t in b.values())
    small.to_pandas()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the present size
    base = _status_kib("VmRSS")
    t = time.perf_counter()
    rows = batches = 0
    dc = DataConnector.from_sources(folder)
    if mode == "stream":
        total = torch.zeros((), dtype=torch.float64)
        for b in dc.to_torch_dataset(batch_size=batch, drop_last_batch=False):
            for tensor in b.values():
                total += tensor.sum()
            rows += len(next(iter(b.values())))
            batches += 1
    else:
        df = dc.to_pandas() if mode == "full" else pq.read_table(folder).to_pandas()
        rows, batches = len(df), 1
        sum(float(df[c].to_numpy().sum()) for c in df.columns)  # column by column: no copy of the frame
    elapsed = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    print(json.dumps({"base_kib": base, "peak_kib": peak, "rows": rows, "batches": batches, "s": elapsed}))


def run_child(mode: str, folder: Path, batch: int) -> dict[str, float]:
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--batch", str(batch)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=path)).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--cols", type=int, default=20)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--row-group", type=int, default=65_536)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--child", choices=["stream", "full", "pyarrow"])
    ap.add_argument("--folder")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.folder, a.batch)
        return
    sys.path.insert(0, str(ROOT / "src"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mljobs.data import DataConnector

    folder = Path(tempfile.mkdtemp(prefix="mljobs-bench-data-"))
    try:
        size = write_data(folder, a.rows, a.cols, a.files, a.row_group)
        on_disk = sum(p.stat().st_size for p in folder.iterdir())
        print(f"data: {a.rows:,} rows x {a.cols} float64 columns = {size / MiB:.0f} MiB in memory; "
              f"{a.files} Parquet files ({on_disk / MiB:.0f} MiB), row groups of {a.row_group:,} rows; "
              f"pyarrow {pa.__version__}, {os.cpu_count()} CPUs")

        def connector() -> None:
            df = DataConnector.from_sources(str(folder)).to_pandas()
            assert df.shape == (a.rows, a.cols)

        def pyarrow_read() -> None:
            df = pq.read_table(str(folder)).to_pandas()
            assert df.shape == (a.rows, a.cols)

        t = best_of(a.runs, {"connector": connector, "pyarrow": pyarrow_read})
        print(f"{'to_pandas, best of ' + str(a.runs):<44}{'seconds':>10}{'rows/s':>14}{'vs pyarrow':>12}")
        for name, label in (("pyarrow", "pyarrow.parquet.read_table(dir).to_pandas()"),
                            ("connector", "DataConnector.from_sources(dir).to_pandas()")):
            print(f"{label:<44}{t[name]:>10.3f}{a.rows / t[name]:>14,.0f}{t['pyarrow'] / t[name]:>11.2f}x")
        goal = "meets" if t["pyarrow"] / t["connector"] >= 0.8 else "MISSES"
        print(f"connector speed {t['pyarrow'] / t['connector']:.2f}x pyarrow's: {goal} the 0.8x goal")

        batch_bytes = a.batch * a.cols * 8
        s, f, p = (run_child(mode, folder, a.batch) for mode in ("stream", "full", "pyarrow"))
        print(f"{'peak memory in a child, over its baseline':<44}{'MiB':>10}{'x batch':>14}{'% of data':>12}")
        for label, m in ((f"to_torch_dataset(batch_size={a.batch})", s),
                         ("connector to_pandas() (for scale)", f), ("pyarrow to_pandas() (for scale)", p)):
            extra = (m["peak_kib"] - m["base_kib"]) * 1024
            print(f"{label:<44}{extra / MiB:>10.1f}{extra / batch_bytes:>14.1f}{100 * extra / size:>11.1f}%")
        print(f"one batch: {batch_bytes / MiB:.2f} MiB ({a.batch} rows); one row group: "
              f"{a.row_group * a.cols * 8 / MiB:.1f} MiB; whole data set: {size / MiB:.0f} MiB")
        rate = s["rows"] / s["s"]
        print(f"the stream read {s['rows']:,} rows in {s['batches']:,} batches, {rate:,.0f} rows/s; "
              f"child baselines {s['base_kib'] / 1024:.0f}, {f['base_kib'] / 1024:.0f} and "
              f"{p['base_kib'] / 1024:.0f} MiB")
        if s["rows"] != a.rows:
            print(f"WARNING: the stream gave {s['rows']:,} rows, not {a.rows:,}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
