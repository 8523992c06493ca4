"""Reading training records from files into SparseBatches.

CSV and Parquet through pyarrow (its readers are vectorized and stream in
blocks); every batch but the last holds `batch_size` records, and the last
is padded with weight-0 rows so that shapes stay static.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

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


def iter_batches(paths: str | Sequence[str], sparse: Sequence[SparseFeature],
                 dense: Sequence[DenseFeature] = (), label: str | None = "label", batch_size: int = 4096,
                 label_threshold: float | None = None) -> Iterator[SparseBatch]:
    """SparseBatches of `batch_size` records from the files, in order, one pass."""
    import pyarrow as pa

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    columns = list(dict.fromkeys([f.source for f in sparse] + [f.source for f in dense] + ([label] if label else [])))
    pending: list = []
    held = 0

    def flush(table):
        return records_to_batch(table, sparse, dense, label, batch_size, label_threshold)

    for path in paths:
        for rb in _record_batches(str(path), columns, batch_size):
            pending.append(rb)
            held += rb.num_rows
            while held >= batch_size:
                table = pa.Table.from_batches(pending)
                yield flush(table.slice(0, batch_size))
                rest = table.slice(batch_size)
                pending = rest.to_batches()
                held = rest.num_rows
    if held:
        yield flush(pa.Table.from_batches(pending))
