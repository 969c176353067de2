"""The pieces a DataConnector is made of, and how they are split into shards.

A part is one unit of data with a known place: an in-memory Arrow table, a file (Parquet or
CSV, any fsspec URL), or a block of a Ray dataset in the object store. A part can be narrowed to
a row range ``[start, stop)``; a shard is a list of such ranges, so that N workers each read only
their own rows, straight from where the data lie.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

__all__ = ["Part", "TablePart", "FilePart", "RefPart", "split_rows", "file_format", "concat_tables",
           "concat_batches", "combine_batches", "regroup"]

DEFAULT_BATCH_ROWS = 65_536

_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv", ".tsv": "csv"}


def file_format(path: str) -> str | None:
    """``"parquet"`` or ``"csv"`` from a file name, or None for any other file."""
    low = path.lower()
    for ext, fmt in _FORMATS.items():
        if low.endswith(ext):
            return fmt
    return None


def concat_tables(tables: list[pa.Table]) -> pa.Table:
    """One table from tables whose types may differ a little, as files of one data set do (a CSV
    file's ``string`` beside a Parquet file's ``large_string``, ``int64`` in one CSV file and
    ``double`` in the next): such columns are promoted to the wider type."""
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


def concat_batches(batches: list[pa.RecordBatch]) -> pa.Table:
    """One table from record batches, promoting column types as :func:`concat_tables` does."""
    schema = batches[0].schema
    if all(b.schema.equals(schema) for b in batches):
        return pa.Table.from_batches(batches)
    return concat_tables([pa.Table.from_batches([b]) for b in batches])


def combine_batches(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """One record batch holding the rows of ``batches`` (copied), for batches with rows."""
    table = concat_batches(batches).combine_chunks()
    return pa.RecordBatch.from_arrays([c.chunk(0) for c in table.columns], schema=table.schema)


@dataclass(frozen=True)
class Part:
    """One unit of data; ``start``/``stop`` narrow it to a row range (``stop`` None: to the end)."""

    start: int = 0
    stop: int | None = None

    def count_rows(self) -> int:
        raise NotImplementedError

    def schema(self) -> pa.Schema:
        raise NotImplementedError

    def batches(self, batch_rows: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def read(self, columns: list[str] | None) -> pa.Table:
        """The whole range as one table (the fast path of ``to_pandas``)."""
        return pa.Table.from_batches(list(self.batches(DEFAULT_BATCH_ROWS, columns)),
                                     schema=_select(self.schema(), columns))

    def narrow(self, start: int, stop: int) -> Part:
        """Rows ``[start, stop)`` of this part's range."""
        return dataclasses.replace(self, start=self.start + start, stop=self.start + stop)

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop is None


def _select(schema: pa.Schema, columns: list[str] | None) -> pa.Schema:
    return schema if columns is None else pa.schema([schema.field(c) for c in columns])


def _window(batches: Iterator[pa.RecordBatch], start: int, stop: int | None) -> Iterator[pa.RecordBatch]:
    """The rows ``[start, stop)`` of a stream of batches, without reading past ``stop``."""
    seen = 0
    for batch in batches:
        lo, hi = seen, seen + batch.num_rows
        seen = hi
        if hi <= start:
            continue
        if stop is not None and lo >= stop:
            return
        a = max(start - lo, 0)
        b = batch.num_rows if stop is None else min(stop - lo, batch.num_rows)
        if b > a:
            yield batch if (a, b) == (0, batch.num_rows) else batch.slice(a, b - a)
        if stop is not None and hi >= stop:
            return


def regroup(batches: Iterable[pa.RecordBatch], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Batches of exactly ``batch_rows`` rows (the last one shorter) from batches of any sizes.

    A batch long enough is sliced, not copied; only rows that straddle two incoming batches (a row
    group's or a CSV block's end, a part's end) are copied into one batch.
    """
    pending: list[pa.RecordBatch] = []
    have = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        pending.append(batch)
        have += batch.num_rows
        if have < batch_rows:
            continue
        whole = pending[0] if len(pending) == 1 else combine_batches(pending)
        off = 0
        while whole.num_rows - off >= batch_rows:
            yield whole.slice(off, batch_rows)
            off += batch_rows
        rest = whole.slice(off)
        pending, have = ([rest] if rest.num_rows else []), rest.num_rows
    if have:
        yield pending[0] if len(pending) == 1 else combine_batches(pending)


@dataclass(frozen=True)
class TablePart(Part):
    """An Arrow table held in memory (from pandas, polars, Arrow or a SQL query's result)."""

    table: pa.Table = field(default=None, repr=False)  # type: ignore[assignment]

    def _view(self) -> pa.Table:
        stop = self.table.num_rows if self.stop is None else self.stop
        return self.table if self.whole else self.table.slice(self.start, stop - self.start)

    def count_rows(self) -> int:
        return self._view().num_rows

    def schema(self) -> pa.Schema:
        return self.table.schema

    def batches(self, batch_rows: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        view = self._view()
        if columns is not None:
            view = view.select(columns)
        yield from view.to_batches(max_chunksize=batch_rows)

    def read(self, columns: list[str] | None) -> pa.Table:
        view = self._view()
        return view if columns is None else view.select(columns)

    def __reduce__(self) -> tuple[Any, ...]:
        # Only this part's rows travel: a pickled slice would carry the whole buffers it points
        # into, the Arrow IPC format writes just the rows in range.
        view = self._view()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, view.schema) as writer:
            writer.write_table(view)
        return (_table_part, (sink.getvalue(),))


def _table_part(ipc: pa.Buffer) -> TablePart:
    return TablePart(table=pa.ipc.open_stream(ipc).read_all())


_copies: dict[str, str] = {}  # stage file -> this process's local copy of it
_copies_lock = threading.Lock()


def _local_copy(stage_file: str) -> str:
    """This process's copy of a stage file, fetched once through the control plane (the job's
    own session) into a temporary folder of the working folder (a job's own, removed with it)."""
    with _copies_lock:
        got = _copies.get(stage_file)
        if got is not None and os.path.exists(got):
            return got
        from mljobs.client.session import get_active_session

        where = tempfile.mkdtemp(prefix="stage-part-", dir=os.getcwd() if os.environ.get("MLJOBS_JOB_ID") else None)
        files = get_active_session().file.get(stage_file, where)
        if len(files) != 1:
            raise FileNotFoundError(f"{stage_file}: expected one file on the stage, found {len(files)}")
        _copies[stage_file] = files[0]
        return files[0]


@dataclass(frozen=True)
class FilePart(Part):
    """One Parquet or CSV file at an fsspec URL; read where the part is read, never before."""

    url: str = ""
    fmt: str = "parquet"
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    rows: int | None = None  # known for Parquet from its footer; counted on demand for CSV
    # "@STAGE/path" of a local copy made through the control plane (a sandboxed job cannot see a
    # stage's folder): where the copy is not (a worker on another instance), it makes its own
    stage_file: str | None = None

    def _fs(self) -> tuple[Any, str]:
        url = self.url
        if self.stage_file is not None and "://" not in url and not os.path.exists(url):
            url = _local_copy(self.stage_file)
        fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
        return fs, path

    def _open_parquet(self) -> pq.ParquetFile:
        fs, path = self._fs()
        if isinstance(fs, LocalFileSystem):
            return pq.ParquetFile(path)
        return pq.ParquetFile(fs.open(path, "rb"))

    def _csv_reader(self) -> pacsv.CSVStreamingReader:
        fs, path = self._fs()
        parse = pacsv.ParseOptions(delimiter="\t") if path.lower().endswith(".tsv") else None
        stream = fs.open(path, "rb", compression="infer")
        return pacsv.open_csv(stream, parse_options=parse,
                              read_options=pacsv.ReadOptions(block_size=8 << 20))

    def count_rows(self) -> int:
        if self.stop is not None and self.stop <= self.start:
            return 0  # an empty range (an empty shard's): no need to read a CSV file to count it
        total = self.rows
        if total is None:
            total = sum(b.num_rows for b in self._csv_reader())
        stop = total if self.stop is None else min(self.stop, total)
        return max(stop - self.start, 0)

    def schema(self) -> pa.Schema:
        if self.fmt == "parquet":
            return self._open_parquet().schema_arrow
        return self._csv_reader().schema

    def batches(self, batch_rows: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        def row_groups() -> Iterator[pa.RecordBatch]:
            # One row group at a time: pyarrow's iter_batches over many row groups holds about the
            # whole file in memory before the last batch, so a stream would not be bounded by a
            # row group, and a narrowed part skips the groups outside its range without reading them.
            pf = self._open_parquet()
            row = 0
            for i in range(pf.metadata.num_row_groups):
                lo = row
                row += pf.metadata.row_group(i).num_rows
                if row <= self.start:
                    continue
                if self.stop is not None and lo >= self.stop:
                    return
                yield from _window(pf.iter_batches(batch_size=batch_rows, row_groups=[i], columns=columns),
                                   max(self.start - lo, 0), None if self.stop is None else self.stop - lo)

        if self.fmt == "parquet":
            # Batches do not span row groups: join the short ones at the ends of row groups.
            yield from regroup(row_groups(), batch_rows)
            return
        reader = self._csv_reader()
        stream = (b if columns is None else b.select(columns) for b in reader)
        yield from regroup(_window(stream, self.start, self.stop), batch_rows)

    def read(self, columns: list[str] | None) -> pa.Table:
        if self.fmt == "parquet" and self.whole:
            fs, path = self._fs()
            if isinstance(fs, LocalFileSystem):
                return pq.read_table(path, columns=columns)
            return pq.read_table(path, columns=columns, filesystem=fs)
        return super().read(columns)


@dataclass(frozen=True)
class RefPart(Part):
    """A block of a Ray dataset in Ray's object store (``ray.data.Dataset.to_arrow_refs``)."""

    ref: Any = field(default=None, repr=False)
    rows: int = 0
    block_schema: pa.Schema | None = field(default=None, repr=False)

    def _table(self) -> pa.Table:
        import ray  # only a connector made from a Ray dataset holds a RefPart

        table = ray.get(self.ref)
        stop = table.num_rows if self.stop is None else self.stop
        return table if self.whole else table.slice(self.start, stop - self.start)

    def count_rows(self) -> int:
        stop = self.rows if self.stop is None else min(self.stop, self.rows)
        return max(stop - self.start, 0)

    def schema(self) -> pa.Schema:
        return self.block_schema if self.block_schema is not None else self._table().schema

    def batches(self, batch_rows: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        table = self._table()
        yield from (table if columns is None else table.select(columns)).to_batches(max_chunksize=batch_rows)

    def read(self, columns: list[str] | None) -> pa.Table:
        table = self._table()
        return table if columns is None else table.select(columns)


def split_rows(parts: list[Part], counts: list[int], n: int) -> list[list[Part]]:
    """Split the rows of ``parts`` (with ``counts`` rows each) into ``n`` contiguous shards whose
    sizes differ by at most one row; a part that straddles two shards is narrowed in each."""
    total = sum(counts)
    bounds = [total * i // n for i in range(n + 1)]
    shards: list[list[Part]] = [[] for _ in range(n)]
    offset = 0
    for part, count in zip(parts, counts):
        lo, hi = offset, offset + count
        offset = hi
        for s in range(n):
            a, b = max(lo, bounds[s]), min(hi, bounds[s + 1])
            if a < b:
                shards[s].append(part if (a, b) == (lo, hi) else part.narrow(a - lo, b - lo))
    return shards
