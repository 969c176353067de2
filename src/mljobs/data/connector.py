"""DataConnector: one handle on a data set, wherever it lives, that converts to what a trainer reads.

Arrow underneath: a connector is a list of parts (see :mod:`mljobs.data.parts`) read batch by
batch. Nothing is read when a connector is made from files; ``to_pandas`` and ``to_arrow`` are the
only conversions that hold the whole data set at once. A connector pickles small (file parts
travel as URLs), so it can be an argument of a ``@remote`` function, and ``shard(i, n)`` gives
worker ``i`` of ``n`` its own rows to read on its own node.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from mljobs.client.pools import stage_hidden, stage_url
from mljobs.client.session import get_active_session
from mljobs.data.parts import (DEFAULT_BATCH_ROWS, FilePart, Part, RefPart, TablePart, concat_batches,
                               concat_tables, file_format, split_rows)
from mljobs.errors import InvalidArgumentError, NotFoundError
from mljobs.stages import parse_stage_path

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DataConnector"]


class DataConnector:
    """A data set to train on: build one with a ``from_*`` constructor, read it with a ``to_*`` method.

    Example:
        >>> dc = DataConnector.from_sources("@data/train/")          # Parquet or CSV on a stage
        >>> dc.to_pandas(limit=5)
        >>> model = XGBEstimator().fit(dc, input_cols=[...], label_col="y")
    """

    def __init__(self, parts: Sequence[Part], *, shard_of: tuple[int, int] | None = None) -> None:
        self._parts = list(parts)
        self._shard_of = shard_of
        self._schema: pa.Schema | None = None
        self._rows: int | None = None

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_pandas(cls, df: pd.DataFrame) -> DataConnector:
        """A connector over a pandas DataFrame (its index is dropped)."""
        import pandas as pd

        if not isinstance(df, pd.DataFrame):
            raise InvalidArgumentError(f"from_pandas needs a pandas DataFrame, not {type(df).__name__}; "
                                       "use from_dataframe for polars or Arrow")
        return cls([TablePart(table=pa.Table.from_pandas(df, preserve_index=False))])

    @classmethod
    def from_dataframe(cls, df: Any) -> DataConnector:
        """A connector over a pandas or polars DataFrame, or a pyarrow Table or RecordBatch."""
        if isinstance(df, pa.Table):
            return cls([TablePart(table=df)])
        if isinstance(df, pa.RecordBatch):
            return cls([TablePart(table=pa.Table.from_batches([df]))])
        module = type(df).__module__.split(".")[0]
        if module == "pandas":
            return cls.from_pandas(df)
        if module == "polars":
            return cls([TablePart(table=df.to_arrow())])
        raise InvalidArgumentError(f"from_dataframe takes a pandas or polars DataFrame or a pyarrow Table, "
                                   f"not {type(df).__module__}.{type(df).__name__}")

    @classmethod
    def from_sql(cls, query: str, connection: Any) -> DataConnector:
        """The result of ``query`` on ``connection``: a SQLAlchemy URL or Engine, or a DuckDB connection.

        The result is fetched once, here, as Arrow; to read files in place on many nodes, use
        ``from_sources`` instead (DuckDB can write a query's result to Parquet first).
        """
        if type(connection).__module__.split(".")[0] in ("duckdb", "_duckdb"):
            result = connection.sql(query).arrow()  # a Table before DuckDB 1.4, a RecordBatchReader after
            table = result.read_all() if isinstance(result, pa.RecordBatchReader) else result
            return cls([TablePart(table=table)])
        import pandas as pd
        import sqlalchemy

        if isinstance(connection, str):
            engine = sqlalchemy.create_engine(connection)
            try:  # an engine made here is closed here: its pool would hold the database open
                return cls.from_sql(query, engine)
            finally:
                engine.dispose()
        if not isinstance(connection, (sqlalchemy.engine.Engine, sqlalchemy.engine.Connection)):
            raise InvalidArgumentError(f"from_sql takes a SQLAlchemy URL or Engine or a DuckDB connection, "
                                       f"not {type(connection).__name__}")
        df = pd.read_sql_query(sqlalchemy.text(query), connection)
        return cls([TablePart(table=pa.Table.from_pandas(df, preserve_index=False))])

    @classmethod
    def from_sources(cls, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                     format: str | None = None, storage_options: dict[str, Any] | None = None,
                     session: Any = None) -> DataConnector:
        """Parquet or CSV files: local paths, fsspec URLs (``s3://...``), or ``@stage/path`` paths.

        A folder means the Parquet and CSV files in it; a glob (``*``) is expanded. Only the
        Parquet footers are read here; the data are read where the connector (or its shard) is read.
        """
        if format not in (None, "parquet", "csv"):
            raise InvalidArgumentError(f"format={format!r}: use 'parquet', 'csv' or None (from the file names)")
        options = dict(storage_options or {})
        parts: list[Part] = []
        for source in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths):
            for url, fmt, stage_file in _expand(os.fspath(source) if isinstance(source, os.PathLike) else source,
                                                format, options, session):
                rows = None
                if fmt == "parquet":
                    try:
                        rows = FilePart(url=url, storage_options=options)._open_parquet().metadata.num_rows
                    except (pa.ArrowException, OSError) as e:
                        raise InvalidArgumentError(f"{url}: not a readable Parquet file ({e})") from None
                parts.append(FilePart(url=url, fmt=fmt, storage_options=options, rows=rows, stage_file=stage_file))
        if not parts:
            raise InvalidArgumentError("from_sources needs at least one path")
        return cls(parts)

    from_parquet = from_sources

    @classmethod
    def from_ray_dataset(cls, ds: Any) -> DataConnector:
        """A Ray dataset's blocks, left in Ray's object store: each worker fetches only its blocks."""
        import ray

        refs = ds.to_arrow_refs()
        count = ray.remote(num_cpus=0)(_count_rows_fn)
        rows = ray.get([count.remote(r) for r in refs]) if refs else []
        schema = ds.schema()
        arrow_schema = getattr(schema, "base_schema", None)
        if not isinstance(arrow_schema, pa.Schema):
            arrow_schema = None
        return cls([RefPart(ref=r, rows=n, block_schema=arrow_schema) for r, n in zip(refs, rows)])

    # -- what it holds ---------------------------------------------------------------------------
    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of the data (from the first part)."""
        if self._schema is None:
            self._schema = self._parts[0].schema() if self._parts else pa.schema([])
        return self._schema

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def count_rows(self) -> int:
        if self._rows is None:
            self._rows = sum(p.count_rows() for p in self._parts)
        return self._rows

    def __len__(self) -> int:
        return self.count_rows()

    def __repr__(self) -> str:
        kinds = sorted({type(p).__name__ for p in self._parts})
        shard = f", shard {self._shard_of[0]} of {self._shard_of[1]}" if self._shard_of else ""
        return f"DataConnector({len(self._parts)} part(s): {', '.join(kinds)}{shard})"

    def check_columns(self, columns: Iterable[str], what: str = "column") -> None:
        """Raise an error naming the columns that are missing and the ones there are."""
        have = self.columns
        missing = [c for c in columns if c not in have]
        if missing:
            raise InvalidArgumentError(f"{what} {', '.join(map(repr, missing))} not in the data; "
                                       f"the columns are: {', '.join(have)}")

    def category_levels(self, columns: Iterable[str] | None = None) -> dict[str, list[Any]]:
        """Every level of each categorical (Arrow dictionary) column among ``columns``, over the whole
        data set, sorted: the one code book for all shards.

        Each file, or each worker's shard, may hold its own dictionary; whatever turns levels into
        codes on many workers needs the same list everywhere. Reads only these columns."""
        names = self.columns if columns is None else list(columns)
        cols = [c for c in names if pa.types.is_dictionary(self.schema.field(c).type)]
        seen: dict[str, dict[Any, None]] = {c: {} for c in cols}
        if cols:
            for batch in self.iter_batches(columns=cols):
                for c in cols:
                    column = batch.column(c)
                    if pa.types.is_dictionary(column.type):
                        seen[c].update(dict.fromkeys(column.dictionary.to_pylist()))
                    else:  # a file whose column is plain
                        seen[c].update(dict.fromkeys(column.unique().to_pylist()))
        out = {}
        for c, levels in seen.items():
            values = [v for v in levels if v is not None]
            try:
                out[c] = sorted(values)
            except TypeError:  # mixed types: the order they were met in
                out[c] = values
        return out

    # -- sharding --------------------------------------------------------------------------------
    def shard(self, index: int, count: int) -> DataConnector:
        """Rows ``[index * N / count, (index + 1) * N / count)``: one worker's share, read in place."""
        if not 0 <= index < count:
            raise InvalidArgumentError(f"shard(index={index}, count={count}): index must be in [0, {count})")
        return self.shards(count)[index]

    def shards(self, count: int) -> list[DataConnector]:
        """``count`` connectors with disjoint, contiguous rows whose sizes differ by at most one."""
        if count < 1:
            raise InvalidArgumentError(f"shards(count={count}): count must be at least 1")
        counts = [p.count_rows() for p in self._parts]
        # A shard with no rows (more shards than rows) keeps a zero-row range of the first part,
        # so that it still has the data set's columns.
        empty = [self._parts[0].narrow(0, 0)] if self._parts else []
        return [DataConnector(parts or empty, shard_of=(i, count))
                for i, parts in enumerate(split_rows(self._parts, counts, count))]

    def get_shard(self) -> DataConnector:
        """This worker's shard inside a distributed ``train_func`` (its dataset_map holds shards);
        anywhere else, the whole data set."""
        return self

    # -- conversions -----------------------------------------------------------------------------
    def iter_batches(self, batch_size: int = DEFAULT_BATCH_ROWS, columns: list[str] | None = None
                     ) -> Iterator[pa.RecordBatch]:
        """Arrow record batches of at most ``batch_size`` rows, part after part, streamed."""
        for part in self._parts:
            yield from part.batches(batch_size, columns)

    def to_arrow(self, limit: int | None = None, columns: list[str] | None = None) -> pa.Table:
        """The data as one Arrow table (the first ``limit`` rows only, if given)."""
        if columns is not None:
            self.check_columns(columns)
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        if limit is not None:
            batches, left = [], limit
            # Stop as soon as the limit is reached, not a batch (or a file) later; limit=0 keeps a
            # zero-row slice of the first batch, whose dictionaries (categories) stay.
            for batch in self.iter_batches(min(max(limit, 1), DEFAULT_BATCH_ROWS), columns):
                batches.append(batch.slice(0, left))
                left -= batches[-1].num_rows
                if left <= 0:
                    break
            return concat_batches(batches) if batches else schema.empty_table()
        together = _read_parquet_files(self._parts, columns)
        if together is not None:
            return together
        tables = [p.read(columns) for p in self._parts]
        if not tables:
            return schema.empty_table()
        return concat_tables(tables)

    def to_pandas(self, limit: int | None = None) -> pd.DataFrame:
        """The data as one pandas DataFrame (the first ``limit`` rows only, if given)."""
        return self.to_arrow(limit).to_pandas()

    def to_torch_dataset(self, *, batch_size: int | None = None, shuffle: bool = False,
                         drop_last_batch: bool = True) -> Any:
        """A ``torch.utils.data.IterableDataset``.

        With ``batch_size`` it yields dicts of tensors of ``batch_size`` rows (use
        ``DataLoader(ds, batch_size=None)``); without, one dict per row for the DataLoader to batch.
        Each DataLoader worker reads its own share of the rows. ``shuffle`` shuffles the order of
        the parts and the rows within a window of batches, not the whole data set.
        """
        from mljobs.data.torch_dataset import TorchDataset

        return TorchDataset(self._parts, batch_size=batch_size, shuffle=shuffle, drop_last_batch=drop_last_batch,
                            levels=self.category_levels())

    def to_ray_dataset(self) -> Any:
        """A ``ray.data.Dataset``: files are read by Ray Data where they lie, tables go to the object store."""
        import ray.data

        files = [p for p in self._parts if isinstance(p, FilePart) and p.whole]
        if files and len(files) == len(self._parts) and len({(p.fmt, repr(p.storage_options)) for p in files}) == 1:
            fs, _ = fsspec.core.url_to_fs(files[0].url, **files[0].storage_options)
            paths = [fsspec.core.url_to_fs(p.url, **p.storage_options)[1] for p in files]
            reader = ray.data.read_parquet if files[0].fmt == "parquet" else ray.data.read_csv
            return reader(paths, filesystem=fs)
        if all(isinstance(p, RefPart) and p.whole for p in self._parts) and self._parts:
            return ray.data.from_arrow_refs([p.ref for p in self._parts])  # type: ignore[attr-defined]
        return ray.data.from_arrow([p.read(None) for p in self._parts] or [self.schema.empty_table()])

    def to_huggingface_dataset(self, *, streaming: bool = False) -> Any:
        """A Hugging Face ``datasets.Dataset`` (``streaming=True``: an ``IterableDataset`` read batch by batch).

        Needs the ``datasets`` package (``pip install datasets``).
        """
        try:
            import datasets
        except ImportError:
            raise InvalidArgumentError("to_huggingface_dataset needs the 'datasets' package: "
                                       "pip install datasets (or add it to the job's pip_requirements)") from None
        if streaming:
            return datasets.IterableDataset.from_generator(_rows, gen_kwargs={"connector": self})
        return datasets.Dataset(datasets.table.InMemoryTable(self.to_arrow()))


def _read_parquet_files(parts: list[Part], columns: list[str] | None) -> pa.Table | None:
    """Whole Parquet files on one filesystem, all with one schema, read as one pyarrow dataset (so
    several files are read at once, as ``pyarrow.parquet.read_table(folder)`` does); None otherwise.

    One file after the other is slower by the time pyarrow spends between files, more so on many
    cores; files whose schemas differ are left to ``concat_tables``, which promotes their types.
    """
    if len(parts) < 2 or not all(isinstance(p, FilePart) and p.fmt == "parquet" and p.whole for p in parts):
        return None
    located = [p._fs() for p in parts]  # type: ignore[attr-defined]
    fs = located[0][0]
    if any(other is not fs for other, _ in located):  # fsspec hands out one instance per options
        return None
    schemas = [p.schema() for p in parts]
    if any(not s.equals(schemas[0]) for s in schemas[1:]):
        return None
    return pq.read_table([path for _, path in located], columns=columns, partitioning=None,
                         filesystem=None if isinstance(fs, LocalFileSystem) else fs)


def _rows(connector: DataConnector) -> Iterator[dict[str, Any]]:
    for batch in connector.iter_batches():
        yield from batch.to_pylist()


def _expand(source: str, fmt: str | None, options: dict[str, Any],
            session: Any) -> list[tuple[str, str, str | None]]:
    """(url, format, stage file) for each file a source names, in name order; errors name the
    source. The stage file (``@STAGE/path``) is set for a local copy fetched through the control
    plane: another process (a worker on another node) fetches its own copy of it from there."""
    if not isinstance(source, str) or not source:
        raise InvalidArgumentError(f"a source path must be a non-empty string, not {source!r}")
    url = source
    fetched: tuple[str, str, str] | None = None  # (stage, its folder fetched, where it was put)
    if source.startswith("@"):
        stage, rel = parse_stage_path(source)
        root = stage_url(stage, session).rstrip("/")
        url = root + ("/" + rel if rel else "")
        if stage_hidden(root):
            url, fetched = _fetched(stage, rel, session)  # a sandboxed job (or another machine) does not see it
    fs, path = fsspec.core.url_to_fs(url, **options)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    unstrip = (lambda p: p) if protocol in ("file", "local") else (lambda p: f"{protocol}://{p}")
    where = f" (stage storage: {url})" if source.startswith("@") else ""
    try:
        if any(ch in path for ch in "*?["):
            found = sorted(fs.glob(path))
            if not found:
                raise NotFoundError(f"the source {source!r}{where} matches no file")
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if file_format(p) is not None)
            if not found:
                raise NotFoundError(f"the folder {source!r}{where} holds no Parquet or CSV file "
                                    "(*.parquet, *.pq, *.csv, *.csv.gz, *.tsv)")
        elif fs.exists(path):
            found = [path]
        else:
            hint = "list a stage with session.file.list('@stage/')" if source.startswith("@") else "check the path"
            raise NotFoundError(f"the source {source!r}{where} does not exist: {hint}")
    except (OSError, PermissionError) as e:
        raise NotFoundError(f"cannot read the source {source!r}{where}: {e}") from None
    out = []
    for p in found:
        kind = fmt or file_format(p)
        if kind is None:
            raise InvalidArgumentError(f"{unstrip(p)}: not a Parquet or CSV file name; pass format='parquet' "
                                       "or format='csv' to read it anyway")
        stage_file = None
        if fetched is not None:
            f_stage, f_rel, f_where = fetched
            local_rel = os.path.relpath(p, f_where) if f_rel.endswith("/") or not f_rel else None
            stage_file = f"@{f_stage}/" + (f"{f_rel.rstrip('/')}/{local_rel}".lstrip("/") if local_rel else f_rel)
        out.append((unstrip(p), kind, stage_file))
    return out


def _fetched(stage: str, rel: str, session: Any) -> tuple[str, tuple[str, str, str]]:
    """A local copy, through the control plane, of the stage files ``rel`` names (a file, a folder,
    or a glob, whose folder is copied): for a stage whose storage is a folder this process cannot
    see (a job's sandbox hides the server's; a client on another machine has none of it). The
    copy lives in the working folder (a job's own, removed with it) and the glob applies to it."""
    s = session or get_active_session()
    glob_at = next((i for i, part in enumerate(rel.split("/")) if any(ch in part for ch in "*?[")), None)
    fetch = "/".join(rel.split("/")[:glob_at]) + "/" if glob_at is not None else rel
    where = tempfile.mkdtemp(prefix=f"stage-{stage.lower()}-", dir=os.getcwd() if os.environ.get("MLJOBS_JOB_ID")
                             else None)
    got = s.file.get(f"@{stage}/{fetch}", where)
    if glob_at is not None:
        return os.path.join(where, *rel.split("/")[glob_at:]), (stage, fetch, where)
    if len(got) == 1 and not rel.endswith("/") and os.path.basename(got[0]) == os.path.basename(rel):
        return got[0], (stage, rel, where)  # one file
    return where, (stage, rel.rstrip("/") + "/" if rel else "", where)


def _count_rows_fn(table: pa.Table) -> int:
    return table.num_rows
