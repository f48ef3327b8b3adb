"""Readers of columnar tables through pyarrow (`pip install fasttrain[parquet]`): Parquet files and Hugging Face
`datasets` folders, one document per row of DataConfig.text_column. A `datasets` folder (`save_to_disk`) is
state.json, whose "_data_files" lists its shards, dataset_info.json, and the shards as Arrow IPC streams, so
pyarrow reads it without `datasets` installed; each shard is a file of its own to the workers."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fasttrain.data.formats import Skip, missing_column
from fasttrain.data.sources import Documents, ReadOptions, SourceFile

PYARROW_MISSING = "parquet and datasets folders (pyarrow not installed: pip install fasttrain[parquet])"


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise Skip(PYARROW_MISSING) from None
    return pyarrow


def read_parquet(f: SourceFile, opts: ReadOptions) -> Documents:
    try:
        pa = _pyarrow()
        try:
            table = pa.parquet.ParquetFile(f.path)
            if opts.text_column not in table.schema_arrow.names:
                raise Skip(missing_column(opts.text_column))
            return _documents(pa, table.iter_batches(batch_size=8192, columns=[opts.text_column]), opts.text_column)
        except (pa.ArrowException, OSError) as exc:
            raise Skip("corrupt parquet") from exc
    except Skip as exc:
        return Documents([], {str(exc): 1})


def read_hf_dataset(f: SourceFile, opts: ReadOptions) -> Documents:
    """One Arrow shard of a `datasets` folder (discovery lists them from state.json; the folder itself when
    state.json could not be read)."""
    try:
        pa = _pyarrow()
        if Path(f.path).is_dir():
            raise Skip("corrupt datasets folder (state.json)")
        try:
            with pa.memory_map(f.path) as source:
                reader = pa.ipc.open_stream(source)
                if opts.text_column not in reader.schema.names:
                    raise Skip(missing_column(opts.text_column))
                at = reader.schema.get_field_index(opts.text_column)
                return _documents(pa, (b.select([at]) for b in reader), opts.text_column)
        except (pa.ArrowException, OSError) as exc:
            raise Skip("corrupt datasets shard (not an Arrow stream)") from exc
    except Skip as exc:
        return Documents([], {str(exc): 1})


def _documents(pa, batches: Iterable, column: str) -> Documents:
    """The non-empty strings of the one-column record batches; Skip when the column does not hold strings."""
    texts = []
    for batch in batches:
        values = batch.column(0)
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise Skip(f"text column {column!r} is not strings")
        texts += [t for t in values.to_pylist() if t]
    return Documents(texts)
