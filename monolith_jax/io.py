"""Reading training records from files into SparseBatches.

CSV and Parquet through pyarrow (its readers are vectorized and stream in
blocks); every batch but the last holds `batch_size` records, and the last
is padded with weight-0 rows so that shapes stay static.

`shuffle=N` passes the records through a shuffle buffer of N records (as
`tf.data`'s `shuffle`): records, not batches, are mixed, across batch and
file boundaries, while memory stays bounded by the buffer. One pass is one
pass: for several epochs give `Trainer.fit` a function that makes a new
pass, with a new seed if each epoch should see another order:

    seeds = itertools.count()
    trainer.fit(lambda: iter_batches(paths, ..., shuffle=100_000, seed=next(seeds)), epochs=3)
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from monolith_jax.features import DenseFeature, SparseBatch, SparseFeature, records_to_batch


def _record_batches(path: str, columns: list[str], block_rows: int):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    ext = os.path.splitext(path)[1].lower()
    if ext in (".parquet", ".pq"):
        yield from pq.ParquetFile(path).iter_batches(batch_size=block_rows, columns=columns)
    elif ext in (".csv", ".tsv"):
        parse = pcsv.ParseOptions(delimiter="\t" if ext == ".tsv" else ",")
        convert = pcsv.ConvertOptions(include_columns=columns)
        yield from pcsv.open_csv(path, parse_options=parse, convert_options=convert,
                                 read_options=pcsv.ReadOptions(block_size=1 << 22))
    else:
        raise ValueError(f"{path}: unknown file type {ext!r} (use .csv, .tsv or .parquet)")


def _check_buffer(shuffle) -> int | None:
    if shuffle is None:
        return None
    if isinstance(shuffle, bool) or not isinstance(shuffle, (int, np.integer)) or shuffle < 1:
        raise ValueError(f"shuffle takes the shuffle buffer's size in records (an int >= 1, e.g. "
                         f"shuffle=100_000) or None for file order, got {shuffle!r}")
    return int(shuffle)


def shuffle_records(blocks: Iterable, buffer_size: int, seed: int = 0) -> Iterator:
    """Record blocks (pyarrow Tables or RecordBatches) -> the same records in
    a random order, through a buffer of `buffer_size` records, as
    `tf.data`'s shuffle.

    The buffer fills first; then for each next record one drawn at random
    from the buffer leaves and the new record takes its place (vectorized:
    up to `buffer_size` records at a time draw distinct places); at the end
    the rest leave shuffled. So at most `buffer_size` records wait here
    (besides the block being read), the record in output position j is one
    of the first j + buffer_size read (buffer_size=1: file order), and a
    buffer at least the size of the data gives a uniform permutation. The
    same seed gives the same order. Yields pyarrow Tables."""
    import pyarrow as pa

    size = _check_buffer(buffer_size)
    if size is None:
        raise ValueError("shuffle_records needs a buffer_size")
    rng = np.random.default_rng(seed)
    held = None                             # pa.Table: the records read and not compacted away
    slots = np.zeros(0, np.int64)           # rows of `held` in the buffer
    for block in blocks:
        t = pa.Table.from_batches([block]) if isinstance(block, pa.RecordBatch) else block
        if t.num_rows == 0:
            continue
        start = 0 if held is None else held.num_rows
        held = t if held is None else pa.concat_tables([held, t])
        new = np.arange(start, start + t.num_rows)
        fill = min(size - slots.size, new.size)
        slots, new = np.concatenate([slots, new[:fill]]), new[fill:]
        leaving = []
        for lo in range(0, new.size, size):
            incoming = new[lo:lo + size]
            places = rng.choice(size, incoming.size, replace=False)   # distinct, in random order
            leaving.append(slots[places])
            slots[places] = incoming
        if leaving:
            yield held.take(np.concatenate(leaving))
        if held.num_rows > 2 * size + t.num_rows:
            # Records that left pin the blocks they came in; copying the
            # buffer out keeps memory within about twice the buffer, at O(1)
            # per record.
            held, slots = held.take(slots), np.arange(slots.size)
    if slots.size:
        yield held.take(slots[rng.permutation(slots.size)])


def iter_batches(paths: str | Sequence[str], sparse: Sequence[SparseFeature],
                 dense: Sequence[DenseFeature] = (), label="label", batch_size: int = 4096,
                 label_threshold: float | None = None, shuffle: int | None = None,
                 seed: int = 0) -> Iterator[SparseBatch]:
    """SparseBatches of `batch_size` records from the files, one pass: in file
    order, or with `shuffle=N` through a shuffle buffer of N records
    (`shuffle_records`; deterministic for a given `seed`). label: a column,
    None, or a job's heads (`records_to_batch`)."""
    import pyarrow as pa

    buffer_size = _check_buffer(shuffle)
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    label_cols = ([label] if label else []) if label is None or isinstance(label, str) else [h.label for h in label]
    columns = list(dict.fromkeys([f.source for f in sparse] + [f.source for f in dense] + label_cols))

    def blocks():
        for path in paths:
            yield from _record_batches(str(path), columns, batch_size)

    source = blocks() if buffer_size is None else shuffle_records(blocks(), buffer_size, seed)
    pending: list = []
    held = 0

    def flush(table):
        return records_to_batch(table, sparse, dense, label, batch_size, label_threshold)

    for block in source:
        pending.extend(block.to_batches() if isinstance(block, pa.Table) else [block])
        held += block.num_rows
        while held >= batch_size:
            table = pa.Table.from_batches(pending)
            yield flush(table.slice(0, batch_size))
            rest = table.slice(batch_size)
            pending = rest.to_batches()
            held = rest.num_rows
    if held:
        yield flush(pa.Table.from_batches(pending))
