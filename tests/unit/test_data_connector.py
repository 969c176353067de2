"""DataConnector (mljobs.data): conversions, files and stages, SQL, row shards, torch and Hugging Face.

Everything runs in-process on files under tmp_path: no server, no network, no Ray.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mljobs.data.connector as connector_mod
from mljobs.client.pools import stage_url
from mljobs.data import DataConnector
from mljobs.data.parts import TablePart
from mljobs.errors import InvalidArgumentError, NotFoundError

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402


# -- helpers ----------------------------------------------------------------------------------------
def sample_frame(n: int = 6) -> pd.DataFrame:
    """One column of each kind a trainer meets: int, float, bool, string, datetime, categorical."""
    return pd.DataFrame({
        "i": np.arange(n, dtype="int64"),
        "f": np.linspace(0.0, 1.0, n),
        "b": [k % 3 == 0 for k in range(n)],
        "s": [f"s{k}" for k in range(n)],
        "t": pd.date_range("2024-01-01", periods=n, freq="h"),
        "c": pd.Categorical([["x", "y", "z"][k % 3] for k in range(n)]),
    })


def id_frame(start: int, stop: int) -> pd.DataFrame:
    """Rows numbered ``start .. stop-1`` in column ``id``, with a value that follows from it."""
    ids = np.arange(start, stop, dtype="int64")
    return pd.DataFrame({"id": ids, "x": ids * 0.5})


def write_parquet(path: Path, df: pd.DataFrame, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=row_group_size)
    return path


def id_parts(tmp_path: Path, kind: str, sizes: list[int]) -> DataConnector:
    """A connector whose parts hold ``sizes`` rows each, ids numbered on across parts."""
    bounds = np.cumsum([0, *sizes])
    if kind == "tables":
        return DataConnector([TablePart(table=pa.Table.from_pandas(id_frame(a, b), preserve_index=False))
                              for a, b in zip(bounds[:-1], bounds[1:])])
    paths = [write_parquet(tmp_path / f"p{k:02d}.parquet", id_frame(a, b), row_group_size=3)
             for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return DataConnector.from_sources([str(p) for p in paths])


def ids_of(dc: DataConnector) -> list[int]:
    return dc.to_arrow().column("id").to_pylist()


# -- conversions -----------------------------------------------------------------------------------
def test_from_pandas_round_trip_keeps_dtypes_and_drops_the_index():
    df = sample_frame()
    out = DataConnector.from_pandas(df.set_axis(range(100, 106))).to_pandas()
    pd.testing.assert_frame_equal(out, df)  # dtypes checked too; the index is a fresh RangeIndex
    assert out["c"].cat.categories.tolist() == ["x", "y", "z"]
    assert str(out["t"].dtype).startswith("datetime64")


@pytest.mark.parametrize("kind", ["pandas", "polars", "arrow_table", "arrow_batch"])
def test_from_dataframe_round_trips(kind):
    df = sample_frame()
    if kind == "pandas":
        src: Any = df
    elif kind == "polars":
        import polars as pl
        src = pl.from_pandas(df)
    elif kind == "arrow_table":
        src = pa.Table.from_pandas(df, preserve_index=False)
    else:
        src = pa.RecordBatch.from_pandas(df, preserve_index=False)
    dc = DataConnector.from_dataframe(src)
    assert dc.count_rows() == len(df) == len(dc)
    assert dc.columns == list(df.columns)
    pd.testing.assert_frame_equal(dc.to_pandas(), df)


def test_nulls_in_int_float_and_string_columns():
    df = pd.DataFrame({"i": pd.array([1, None, 3], dtype="Int64"), "f": [1.5, None, np.nan],
                       "s": ["a", None, "c"]})
    out = DataConnector.from_pandas(df).to_pandas()
    pd.testing.assert_frame_equal(out, df)
    assert out["i"].isna().tolist() == [False, True, False]
    assert out["f"].isna().tolist() == [False, True, True]
    assert out["s"].isna().tolist() == [False, True, False]
    # Plain Arrow (no pandas metadata): an int column with a null comes back as float with NaN.
    table = pa.table({"i": pa.array([1, None, 3], pa.int64()), "s": pa.array(["a", None, "c"])})
    plain = DataConnector.from_dataframe(table).to_pandas()
    assert plain["i"].dtype == np.float64 and np.isnan(plain["i"][1]) and plain["i"][2] == 3
    assert plain["s"].tolist()[0] == "a" and pd.isna(plain["s"][1])


def test_from_dataframe_and_from_pandas_reject_other_types():
    with pytest.raises(InvalidArgumentError, match="list"):
        DataConnector.from_dataframe([1, 2, 3])
    with pytest.raises(InvalidArgumentError, match="from_dataframe"):
        DataConnector.from_pandas(pa.table({"a": [1]}))


@pytest.mark.parametrize("limit", [0, 1, 4, 6, 100])
def test_limit_in_memory(limit):
    df = sample_frame()
    out = DataConnector.from_pandas(df).to_pandas(limit=limit)
    pd.testing.assert_frame_equal(out, df.head(limit))


@pytest.mark.parametrize("limit", [0, 2, 7, 8, 9, 28, 50])
def test_limit_across_file_parts(tmp_path, limit):
    dc = id_parts(tmp_path, "files", [7, 1, 20])
    out = dc.to_pandas(limit=limit)
    assert out["id"].tolist() == list(range(min(limit, 28)))
    assert out.columns.tolist() == ["id", "x"] and out["id"].dtype == np.int64


def test_to_arrow_columns_and_check_columns():
    dc = DataConnector.from_pandas(sample_frame())
    assert dc.to_arrow(columns=["f", "i"]).column_names == ["f", "i"]
    assert dc.to_arrow(limit=2, columns=["s"]).to_pydict() == {"s": ["s0", "s1"]}
    with pytest.raises(InvalidArgumentError, match=r"'nope' not in the data; the columns are: i, f, b"):
        dc.to_arrow(columns=["i", "nope"])


# -- files -----------------------------------------------------------------------------------------
@pytest.fixture
def parquet_dir(tmp_path: Path) -> Path:
    """Three Parquet files of 5, 7 and 11 rows in row groups of 2, and files that are not data."""
    d = tmp_path / "pq"
    for name, (a, b) in {"part-0.parquet": (0, 5), "part-1.parquet": (5, 12), "part-2.pq": (12, 23)}.items():
        write_parquet(d / name, id_frame(a, b), row_group_size=2)
    (d / "_SUCCESS").write_text("")
    (d / "README.txt").write_text("not data")
    return d


def test_parquet_folder_reads_every_data_file_in_name_order(parquet_dir):
    assert pq.ParquetFile(parquet_dir / "part-1.parquet").num_row_groups == 4  # several row groups
    dc = DataConnector.from_sources(str(parquet_dir))
    assert dc.count_rows() == 23 and dc.columns == ["id", "x"]
    pd.testing.assert_frame_equal(dc.to_pandas(), id_frame(0, 23))
    assert "3 part(s): FilePart" in repr(dc)
    # A pathlib.Path works as well as a str.
    assert ids_of(DataConnector.from_sources(parquet_dir)) == list(range(23))
    assert ids_of(DataConnector.from_parquet(parquet_dir)) == list(range(23))
    picked = dc.to_arrow(columns=["x", "id"])
    assert picked.column_names == ["x", "id"] and picked.column("id").to_pylist() == list(range(23))


def test_parquet_glob_and_list(parquet_dir):
    assert ids_of(DataConnector.from_sources(str(parquet_dir / "part-*.parquet"))) == list(range(12))
    listed = DataConnector.from_sources([str(parquet_dir / "part-2.pq"), parquet_dir / "part-0.parquet"])
    assert ids_of(listed) == list(range(12, 23)) + list(range(5))  # the list's order, not name order
    batches = list(listed.iter_batches(batch_size=3))
    assert max(b.num_rows for b in batches) == 3
    assert [i for b in batches for i in b.column(0).to_pylist()] == ids_of(listed)


def test_parquet_files_whose_schemas_differ(tmp_path):
    d = tmp_path / "year=2024"  # a hive-style folder name adds no column
    d.mkdir()
    pq.write_table(pa.table({"id": pa.array([0, 1], pa.int64()), "s": pa.array(["a", "b"], pa.string())}),
                   d / "a.parquet")
    pq.write_table(pa.table({"id": pa.array([2], pa.int64()), "s": pa.array(["c"], pa.large_string()),
                             "extra": pa.array([1.5])}), d / "b.parquet")
    pq.write_table(pa.table({"id": pa.array([3], pa.int32()), "s": pa.array(["d"], pa.string())}),
                   d / "c.parquet")
    out = DataConnector.from_sources(str(d)).to_arrow()
    assert out.column("id").to_pylist() == [0, 1, 2, 3] and out.column("id").type == pa.int64()
    assert out.column("s").to_pylist() == ["a", "b", "c", "d"]
    assert out.column("extra").to_pylist() == [None, None, 1.5, None]
    same = DataConnector.from_sources([str(d / "a.parquet"), str(d / "a.parquet")]).to_arrow()
    assert same.column_names == ["id", "s"] and same.column("id").to_pylist() == [0, 1, 0, 1]


def test_csv_gz_and_parquet_mixed(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    full = pd.DataFrame({"id": np.arange(9, dtype="int64"), "x": np.arange(9) * 0.25,
                         "s": [f"row {k}" for k in range(9)]})
    write_parquet(d / "a.parquet", full.iloc[:3], row_group_size=2)
    full.iloc[3:6].to_csv(d / "b.csv", index=False)
    with gzip.open(d / "c.csv.gz", "wt") as f:
        full.iloc[6:].to_csv(f, index=False)
    for source in (str(d), [str(d / "a.parquet"), str(d / "b.csv"), str(d / "c.csv.gz")]):
        dc = DataConnector.from_sources(source)
        assert dc.count_rows() == 9
        out = dc.to_pandas()
        pd.testing.assert_frame_equal(out, full, check_dtype=False)
        assert out["id"].dtype == np.int64 and out["x"].dtype == np.float64
        assert dc.to_pandas(limit=5)["s"].tolist() == full["s"][:5].tolist()  # across parquet and CSV
    csv_only = DataConnector.from_sources(str(d / "*.csv*"))
    assert csv_only.to_pandas()["id"].tolist() == list(range(3, 9))
    for n in (2, 4):  # CSV parts narrowed by shards
        assert [i for s in csv_only.shards(n) for i in ids_of(s)] == list(range(3, 9))


def test_fsspec_url(tmp_path):
    import fsspec
    fs = fsspec.filesystem("memory")
    root = f"/mljobs-test-{tmp_path.name}"
    try:
        for k in range(3):
            with fs.open(f"{root}/p{k}.parquet", "wb") as f:
                pq.write_table(pa.Table.from_pandas(id_frame(3 * k, 3 * k + 3), preserve_index=False), f,
                               row_group_size=2)
        with fs.open(f"{root}/q.csv", "wb") as f:
            f.write(b"id,x\n9,4.5\n10,5.0\n")
        dc = DataConnector.from_sources(f"memory://{root}/")
        assert all(p.url.startswith("memory://") for p in dc._parts)
        assert ids_of(dc) == list(range(11))
        assert dc.to_pandas(limit=4)["id"].tolist() == [0, 1, 2, 3]
        assert ids_of(DataConnector.from_sources(f"memory://{root}/*.parquet")) == list(range(9))
        assert [ids_of(s) for s in dc.shards(2)] == [list(range(5)), list(range(5, 11))]
    finally:
        fs.rm(root, recursive=True)


def test_format_option(tmp_path):
    csv = tmp_path / "data.txt"
    id_frame(0, 4).to_csv(csv, index=False)
    with pytest.raises(InvalidArgumentError, match=r"data\.txt.*not a Parquet or CSV file name"):
        DataConnector.from_sources(str(csv))
    assert ids_of(DataConnector.from_sources(str(csv), format="csv")) == [0, 1, 2, 3]
    bin_file = write_parquet(tmp_path / "data.bin", id_frame(0, 3))
    assert ids_of(DataConnector.from_sources(str(bin_file), format="parquet")) == [0, 1, 2]
    with pytest.raises(InvalidArgumentError, match="format='json'"):
        DataConnector.from_sources(str(csv), format="json")


def test_source_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "data.parquet"
    with pytest.raises(NotFoundError, match="does not exist") as e:
        DataConnector.from_sources(str(missing))
    assert str(missing) in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("x")
    with pytest.raises(NotFoundError, match="holds no Parquet or CSV file") as e:
        DataConnector.from_sources(str(empty))
    assert str(empty) in str(e.value)
    pattern = str(tmp_path / "*.parquet")
    with pytest.raises(NotFoundError, match="matches no file") as e:
        DataConnector.from_sources(pattern)
    assert pattern in str(e.value)
    other = tmp_path / "model.pkl"
    other.write_bytes(b"\x80")
    with pytest.raises(InvalidArgumentError, match="not a Parquet or CSV file name") as e:
        DataConnector.from_sources(str(other))
    assert str(other) in str(e.value)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(InvalidArgumentError, match="not a readable Parquet file") as e:
        DataConnector.from_sources(str(broken))
    assert str(broken) in str(e.value)
    with pytest.raises(InvalidArgumentError, match="at least one path"):
        DataConnector.from_sources([])


# -- @stage paths ----------------------------------------------------------------------------------
def test_stage_paths_resolve_through_stage_url(tmp_path, monkeypatch):
    root = tmp_path / "stage-root"
    write_parquet(root / "train" / "a.parquet", id_frame(0, 4))
    write_parquet(root / "train" / "b.parquet", id_frame(4, 6))
    write_parquet(root / "other.parquet", id_frame(100, 101))
    calls: list[tuple[str, Any]] = []
    session = object()

    def fake_stage_url(name: str, session: Any = None) -> str:
        calls.append((name, session))
        return str(root) + "/"

    monkeypatch.setattr(connector_mod, "stage_url", fake_stage_url)
    assert ids_of(DataConnector.from_sources("@data/train/", session=session)) == list(range(6))
    assert calls == [("DATA", session)]
    assert ids_of(DataConnector.from_sources("@data/train/b.parquet")) == [4, 5]
    assert ids_of(DataConnector.from_sources("@data/train/*.parquet")) == list(range(6))
    assert sorted(ids_of(DataConnector.from_sources("@data"))) == [*range(6), 100]
    with pytest.raises(NotFoundError) as e:
        DataConnector.from_sources("@data/missing/")
    assert "@data/missing/" in str(e.value) and str(root) in str(e.value)
    assert "session.file.list('@stage/')" in str(e.value)


class FakeResponse:
    def __init__(self, body: Any) -> None:
        self.body = body

    def json(self) -> Any:
        return self.body


class FakeSession:
    def __init__(self, stages: list[dict[str, str]]) -> None:
        self.stages, self.requests = stages, []

    def request(self, method: str, path: str, **kwargs: Any) -> FakeResponse:
        self.requests.append((method, path))
        return FakeResponse(self.stages)


def test_stage_url_and_unknown_stage_error(tmp_path):
    session = FakeSession([{"name": "TRAIN", "url": str(tmp_path)},
                           {"name": "ARCHIVE", "url": "s3://bucket/a"}])
    assert stage_url("@train", session) == str(tmp_path)
    assert session.requests == [("GET", "/stages")]
    with pytest.raises(NotFoundError) as e:
        stage_url("nope", session)
    assert str(e.value) == ("no stage named @NOPE (stages you may use: @ARCHIVE, @TRAIN); "
                            "create it with mljobs.create_stage('NOPE')")
    with pytest.raises(NotFoundError, match=r"stages you may use: none\)"):
        stage_url("nope", FakeSession([]))
    # The same error from a connector whose @stage path names an unknown stage.
    with pytest.raises(NotFoundError, match=r"no stage named @NOPE \(stages you may use: @ARCHIVE, @TRAIN\)"):
        DataConnector.from_sources("@nope/data/", session=session)
    # A known stage, through the real stage_url: its folder is read.
    write_parquet(tmp_path / "d" / "a.parquet", id_frame(0, 3))
    assert ids_of(DataConnector.from_sources("@train/d/", session=session)) == [0, 1, 2]


# -- SQL -------------------------------------------------------------------------------------------
def test_from_sql_duckdb():
    import duckdb
    con = duckdb.connect()
    try:
        con.sql("CREATE TABLE t(id BIGINT, x DOUBLE, s VARCHAR, ok BOOLEAN)")
        con.sql("INSERT INTO t VALUES (1, 0.5, 'a', true), (2, NULL, NULL, false), (3, 1.5, 'c', NULL)")
        out = DataConnector.from_sql("SELECT * FROM t ORDER BY id", con).to_pandas()
        assert out["id"].tolist() == [1, 2, 3] and out["id"].dtype == np.int64
        assert out["x"].dtype == np.float64 and np.isnan(out["x"][1])
        assert out["s"][0] == "a" and pd.isna(out["s"][1])
        empty = DataConnector.from_sql("SELECT * FROM t WHERE id > 100", con)
        assert empty.count_rows() == 0 and empty.columns == ["id", "x", "s", "ok"]
        assert empty.schema.field("id").type == pa.int64()
        assert empty.to_pandas().columns.tolist() == ["id", "x", "s", "ok"]
    finally:
        con.close()


def test_from_sql_sqlalchemy_url_and_engine(tmp_path):
    import sqlalchemy as sa
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = sa.create_engine(url)
    try:
        with engine.begin() as c:
            c.execute(sa.text("CREATE TABLE t (id INTEGER, x REAL, s TEXT)"))
            c.execute(sa.text("INSERT INTO t VALUES (1, 0.5, 'a'), (2, NULL, 'b'), (3, 1.5, NULL)"))
        for connection in (url, engine):
            dc = DataConnector.from_sql("SELECT * FROM t ORDER BY id", connection)
            out = dc.to_pandas()
            assert out["id"].tolist() == [1, 2, 3]
            assert out["x"][0] == 0.5 and np.isnan(out["x"][1])
            assert out["s"][1] == "b" and pd.isna(out["s"][2])
            empty = DataConnector.from_sql("SELECT id, s FROM t WHERE id > 100", connection)
            assert empty.count_rows() == 0 and empty.columns == ["id", "s"]
            assert empty.to_pandas().columns.tolist() == ["id", "s"]
        with engine.connect() as c:  # a Connection works too
            assert ids_of(DataConnector.from_sql("SELECT id FROM t ORDER BY id", c)) == [1, 2, 3]
        with pytest.raises(InvalidArgumentError, match="from_sql takes"):
            DataConnector.from_sql("SELECT 1", 42)
    finally:
        engine.dispose()


# -- shards ----------------------------------------------------------------------------------------
UNEVEN = [5, 0, 1, 13, 2, 8]  # 29 rows; a part with no rows among them


@pytest.mark.parametrize("kind", ["tables", "files"])
@pytest.mark.parametrize("n", range(1, 8))
def test_shards_are_contiguous_disjoint_and_even(tmp_path, kind, n):
    dc = id_parts(tmp_path, kind, UNEVEN)
    total = sum(UNEVEN)
    assert dc.count_rows() == total
    shards = dc.shards(n)
    assert len(shards) == n
    got = [ids_of(s) for s in shards]
    assert [i for ids in got for i in ids] == list(range(total))  # every row once, in order
    sizes = [len(ids) for ids in got]
    assert max(sizes) - min(sizes) <= 1
    assert [s.count_rows() for s in shards] == sizes
    for ids in got:
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # contiguous
    for k, s in enumerate(shards):
        streamed = [i for b in s.iter_batches(batch_size=2) for i in b.column("id").to_pylist()]
        assert streamed == got[k]
        assert s.to_pandas()["x"].tolist() == [i * 0.5 for i in got[k]]
        assert ids_of(dc.shard(k, n)) == got[k]


@pytest.mark.parametrize("kind", ["tables", "files"])
def test_shards_of_a_shard(tmp_path, kind):
    dc = id_parts(tmp_path, kind, UNEVEN)
    middle = dc.shards(3)[1]
    inner = middle.shards(4)
    assert [i for s in inner for i in ids_of(s)] == ids_of(middle)
    assert max(s.count_rows() for s in inner) - min(s.count_rows() for s in inner) <= 1


@pytest.mark.parametrize("kind", ["tables", "files"])
def test_more_shards_than_rows(tmp_path, kind):
    dc = id_parts(tmp_path, kind, [2, 1])
    shards = dc.shards(7)
    assert [s.count_rows() for s in shards].count(0) == 4
    assert [i for s in shards for i in ids_of(s)] == [0, 1, 2]
    for s in shards:
        out = s.to_pandas()
        assert out.columns.tolist() == ["id", "x"]  # an empty shard keeps the columns
        assert len(out) == s.count_rows() <= 1
        assert s.to_pandas(limit=5).columns.tolist() == ["id", "x"]
        assert sum(b.num_rows for b in s.iter_batches()) == s.count_rows()
        assert sum(len(b["id"]) for b in s.to_torch_dataset(batch_size=2, drop_last_batch=False)) == len(out)
        assert s.to_huggingface_dataset().num_rows == len(out)


def test_shard_arguments_are_checked():
    dc = DataConnector.from_pandas(id_frame(0, 5))
    with pytest.raises(InvalidArgumentError, match="count must be at least 1"):
        dc.shards(0)
    for index in (-1, 3):
        with pytest.raises(InvalidArgumentError, match=r"index must be in \[0, 3\)"):
            dc.shard(index, 3)
    assert "shard 1 of 3" in repr(dc.shard(1, 3))


def test_pickled_table_shard_carries_only_its_rows():
    rows = 200_000
    dc = DataConnector.from_pandas(id_frame(0, rows))
    whole = len(pickle.dumps(dc))
    assert whole > rows * 16  # two 8-byte columns
    shard = dc.shards(10)[3]
    blob = pickle.dumps(shard)
    assert len(blob) < whole / 8
    back = pickle.loads(blob)
    assert back.count_rows() == rows // 10
    assert ids_of(back) == list(range(3 * rows // 10, 4 * rows // 10))
    assert back.to_pandas()["x"].iloc[-1] == (4 * rows // 10 - 1) * 0.5


def test_pickled_file_connector_is_small(tmp_path):
    path = write_parquet(tmp_path / "big.parquet", id_frame(0, 200_000), row_group_size=10_000)
    dc = DataConnector.from_sources(str(path))
    assert path.stat().st_size > 1_000_000
    blob = pickle.dumps(dc)
    assert len(blob) < 2_000
    shard = pickle.loads(pickle.dumps(dc.shard(2, 3)))
    ids = ids_of(shard)
    assert len(ids) == 66_667 and ids[0] == 133_333 and ids[-1] == 199_999


# -- torch -----------------------------------------------------------------------------------------
def torch_ids(ds: Any, **loader: Any) -> list[list[int]]:
    return [b["id"].tolist() for b in DataLoader(ds, **loader)]


@pytest.mark.parametrize("kind", ["tables", "files"])
def test_torch_batches_edges(tmp_path, kind):
    dc = id_parts(tmp_path, kind, [7, 1, 2])  # 10 rows; batches straddle parts and row groups
    kept = torch_ids(dc.to_torch_dataset(batch_size=4, drop_last_batch=True), batch_size=None)
    assert kept == [[0, 1, 2, 3], [4, 5, 6, 7]]
    every = torch_ids(dc.to_torch_dataset(batch_size=4, drop_last_batch=False), batch_size=None)
    assert every == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch_ids(dc.to_torch_dataset(batch_size=5), batch_size=None) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert torch_ids(dc.to_torch_dataset(batch_size=32), batch_size=None) == []
    whole = dc.to_torch_dataset(batch_size=32, drop_last_batch=False)
    assert torch_ids(whole, batch_size=None) == [list(range(10))]
    batch = next(iter(dc.to_torch_dataset(batch_size=3)))
    assert batch["x"].tolist() == [0.0, 0.5, 1.0]


def test_torch_empty_data():
    empty = DataConnector.from_pandas(id_frame(0, 0))
    for drop in (True, False):
        assert list(empty.to_torch_dataset(batch_size=4, drop_last_batch=drop)) == []
    assert list(empty.to_torch_dataset()) == []
    with pytest.raises(ValueError, match="batch_size=0"):
        empty.to_torch_dataset(batch_size=0)


def test_torch_rows_batched_by_the_dataloader(tmp_path):
    dc = id_parts(tmp_path, "files", [7, 1, 2])
    batches = list(DataLoader(dc.to_torch_dataset(), batch_size=4))
    assert [b["id"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches[0]["id"].dtype == torch.int64 and batches[0]["x"].dtype == torch.float64
    assert batches[2]["x"].tolist() == [4.0, 4.5]


@pytest.mark.parametrize("batch_size", [None, 4])
def test_torch_two_workers_read_every_row_once(tmp_path, batch_size):
    dc = id_parts(tmp_path, "files", UNEVEN)
    ds = dc.to_torch_dataset(batch_size=batch_size, drop_last_batch=False)
    loader = DataLoader(ds, batch_size=None if batch_size else 3, num_workers=2)
    ids = [i for b in loader for i in b["id"].tolist()]
    assert sorted(ids) == list(range(sum(UNEVEN)))
    assert len(ids) == len(set(ids))


def test_torch_shuffle_same_rows_other_order(tmp_path):
    dc = id_parts(tmp_path, "files", [300, 100, 200])
    ids = [i for b in dc.to_torch_dataset(batch_size=16, shuffle=True, drop_last_batch=False)
           for i in b["id"].tolist()]
    assert sorted(ids) == list(range(600)) and ids != list(range(600))
    rows = [int(r["id"]) for r in dc.to_torch_dataset(shuffle=True)]
    assert sorted(rows) == list(range(600)) and rows != list(range(600))
    again = [i for b in dc.to_torch_dataset(batch_size=16, shuffle=True, drop_last_batch=False)
             for i in b["id"].tolist()]
    assert again != ids  # each pass draws a new order


def test_torch_column_kinds():
    df = pd.DataFrame({
        "i64": np.arange(4, dtype="int64"), "i32": np.arange(4, dtype="int32"),
        "f64": [0.5, None, 2.5, 3.5], "f32": np.array([1, 2, 3, 4], dtype="float32"),
        "b": [True, False, True, False],
        "c": pd.Categorical(["b", "a", "c", "a"], categories=["a", "b", "c"]),
        "cn": pd.Categorical(["a", None, "b", "a"]),
        "n": pd.array([1, None, 3, 4], dtype="Int64"),
        "s": ["w", "x", "y", "z"],
    })
    batch = next(iter(DataConnector.from_pandas(df).to_torch_dataset(batch_size=4)))
    assert batch["i64"].dtype == torch.int64 and batch["i64"].tolist() == [0, 1, 2, 3]
    assert batch["i32"].dtype == torch.int32
    assert batch["f32"].dtype == torch.float32
    assert batch["f64"].dtype == torch.float64 and torch.isnan(batch["f64"][1]) and batch["f64"][2] == 2.5
    assert batch["b"].dtype == torch.bool and batch["b"].tolist() == [True, False, True, False]
    assert batch["c"].tolist() == [1, 0, 2, 0] and not batch["c"].is_floating_point()
    assert batch["cn"].tolist() == [0, -1, 1, 0]
    assert batch["n"].dtype == torch.float64 and torch.isnan(batch["n"][1]) and batch["n"][3] == 4
    assert batch["s"] == ["w", "x", "y", "z"]
    batch["f32"] += 1  # tensors own writable memory
    rows = list(DataConnector.from_pandas(df).to_torch_dataset())  # row mode: one dict per row
    assert [int(r["c"]) for r in rows] == [1, 0, 2, 0]
    assert rows[0]["f64"] == 0.5 and np.isnan(rows[1]["f64"])
    assert [r["s"] for r in rows] == ["w", "x", "y", "z"]


# -- Hugging Face ----------------------------------------------------------------------------------
def test_to_huggingface_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    dc = id_parts(tmp_path, "files", [7, 1, 20])
    ds = dc.to_huggingface_dataset()
    assert isinstance(ds, datasets.Dataset) and ds.num_rows == 28 and ds.column_names == ["id", "x"]
    assert ds["id"][:3] == [0, 1, 2] and ds[27]["x"] == 13.5
    stream = dc.to_huggingface_dataset(streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    rows = list(stream)
    assert len(rows) == 28 and set(rows[0]) == {"id", "x"}
    assert [r["id"] for r in rows] == list(range(28))
    mixed = DataConnector.from_pandas(sample_frame()).to_huggingface_dataset()
    assert mixed.num_rows == 6 and mixed.column_names == ["i", "f", "b", "s", "t", "c"]


def test_torch_codes_share_one_code_book_across_files(tmp_path):
    """Files written with their own dictionaries: a level has one code in every batch."""
    import torch

    pq.write_table(pa.table({"k": pa.array(["b", "a", None]).dictionary_encode()}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"k": pa.array(["c", "a", "c"]).dictionary_encode()}), tmp_path / "2.parquet")
    dc = DataConnector.from_sources(str(tmp_path))
    assert dc.category_levels() == {"k": ["a", "b", "c"]}
    codes = torch.cat([b["k"] for b in dc.to_torch_dataset(batch_size=2, drop_last_batch=False)])
    assert codes.tolist() == [1, 0, -1, 2, 0, 2]
