"""A DataConnector as a ``torch.utils.data.IterableDataset`` (needs torch)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mljobs.data.parts import Part, concat_batches, regroup, split_rows

__all__ = ["TorchDataset", "column_to_numpy"]

_SHUFFLE_WINDOW_BATCHES = 8


def column_to_numpy(col: pa.Array | pa.ChunkedArray, levels: list[Any] | None = None) -> np.ndarray:
    """A column as numpy: nulls in numbers become NaN, a dictionary (categorical) column its codes
    (positions in ``levels`` when given, so that every batch and file shares one code book; -1: null)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        if levels is not None:
            book = pc.index_in(col.dictionary, value_set=pa.array(levels, col.dictionary.type))
            col = pc.take(book, col.indices)
            return col.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        codes = col.indices.to_numpy(zero_copy_only=False)
        return np.where(col.is_null().to_numpy(zero_copy_only=False), -1, codes) if col.null_count else codes
    if col.null_count and (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        return col.cast(pa.float64() if col.type.bit_width > 32 else pa.float32()).to_numpy(zero_copy_only=False)
    return col.to_numpy(zero_copy_only=False)


def _tensor(values: np.ndarray) -> Any:
    if values.dtype.kind in "biuf":
        # Arrow's buffers are read-only; torch wants memory it may write.
        return torch.from_numpy(values if values.flags.writeable and values.flags.c_contiguous else values.copy())
    return values.tolist()  # strings and other objects stay Python values


class TorchDataset(IterableDataset):
    """Streams a data set's parts (a DataConnector's) batch by batch; each DataLoader worker reads
    its own shard."""

    def __init__(self, parts: Sequence[Part], *, batch_size: int | None, shuffle: bool,
                 drop_last_batch: bool, levels: dict[str, list[Any]] | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: use a positive number, or None for single rows")
        self.parts, self.batch_size = list(parts), batch_size
        self.shuffle, self.drop_last_batch = shuffle, drop_last_batch
        self.levels = dict(levels or {})

    def _source(self) -> list[Part]:
        """This DataLoader worker's parts: contiguous rows, as DataConnector.shard gives them."""
        info = get_worker_info()
        if info is None or info.num_workers == 1:
            return self.parts
        return split_rows(self.parts, [p.count_rows() for p in self.parts], info.num_workers)[info.id]

    def _record_batches(self) -> Iterator[pa.RecordBatch]:
        parts = list(self._source())
        rows = self.batch_size or 8192
        if not self.shuffle:
            for part in parts:
                yield from part.batches(rows, None)
            return
        # A window shuffle: the order of the parts, then the rows within a window of batches.
        rng = np.random.default_rng(None if get_worker_info() is None else get_worker_info().seed)
        rng.shuffle(parts)  # type: ignore[arg-type]
        window: list[pa.RecordBatch] = []
        for part in parts:
            for batch in part.batches(rows, None):
                window.append(batch)
                if len(window) == _SHUFFLE_WINDOW_BATCHES:
                    yield from _shuffled(window, rng, rows)
                    window = []
        if window:
            yield from _shuffled(window, rng, rows)

    def _batches(self) -> Iterator[pa.RecordBatch]:
        """Batches of exactly ``batch_size`` rows (the last one shorter, or dropped)."""
        size = self.batch_size
        assert size is not None
        for batch in regroup(self._record_batches(), size):
            if batch.num_rows == size or not self.drop_last_batch:
                yield batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batch_size is None:
            for batch in self._record_batches():
                arrays = {name: column_to_numpy(batch.column(i), self.levels.get(name))
                          for i, name in enumerate(batch.schema.names)}
                for r in range(batch.num_rows):
                    yield {name: values[r] for name, values in arrays.items()}
            return
        for batch in self._batches():
            yield {name: _tensor(column_to_numpy(batch.column(i), self.levels.get(name)))
                   for i, name in enumerate(batch.schema.names)}


def _shuffled(window: list[pa.RecordBatch], rng: np.random.Generator, rows: int) -> Iterator[pa.RecordBatch]:
    table = concat_batches(window)
    yield from table.take(rng.permutation(table.num_rows)).to_batches(max_chunksize=rows)
