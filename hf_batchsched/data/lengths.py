"""Per-row token and sequence counts of a dataset, read as whole columns (vectorised for ``datasets.Dataset``).

These two counts are the sampler's definition of the training clock's units:

- a **token** is a non-pad token of a dataset row: the sum of its ``attention_mask``, else the length of its
  ``input_ids`` (``sample_lengths``);
- a **sample** is a sequence: one per row, or, for rows that pack several sequences (trl's ``pack_dataset`` adds
  a ``seq_lengths`` column), the number of sequences in the row (``sequence_counts``).

>>> from datasets import Dataset
>>> rows = Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "attention_mask": [[1, 1, 0], [1, 1]]})
>>> sample_lengths(rows).tolist()
[2, 2]
>>> packed = Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [9, 10]], "seq_lengths": [[3, 1], [2]]})
>>> sequence_counts(packed).tolist()
[2, 1]
>>> sequence_counts(rows) is None
True
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

__all__ = ["sample_lengths", "sequence_counts"]

#: The column trl's ``pack_dataset`` (strategies ``"bfd"`` and ``"bfd_split"``) adds: the lengths of the sequences
#: packed into each row.
SEQUENCE_LENGTHS_COLUMN = "seq_lengths"


def _arrow_column(dataset, name: str):
    """Column ``name`` of a ``datasets.Dataset`` as one pyarrow array, honouring ``select``/``shuffle`` indices."""
    table = dataset.with_format("arrow", columns=[name])[:]
    return table.column(name).combine_chunks()


def _list_sums(column) -> np.ndarray:
    """Per-row sums of a pyarrow list column: one ``reduceat`` over the flattened values (empty rows sum to 0)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if not len(lengths):
        return lengths
    values = np.append(column.flatten().to_numpy(zero_copy_only=False), 0)  # a sentinel: every start is an index
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    sums = np.add.reduceat(values, starts, dtype=np.int64)
    return np.where(lengths > 0, sums, 0)


def sample_lengths(dataset) -> np.ndarray:
    """Non-pad token count of every row (``int64``): the sum of ``attention_mask``, else the length of ``input_ids``.

    A ``datasets.Dataset`` is read as whole Arrow columns (no per-row Python); any other map-style dataset is read
    row by row.
    """
    columns = getattr(dataset, "column_names", None)
    if columns is not None and hasattr(dataset, "with_format"):
        import pyarrow.compute as pc

        if "attention_mask" in columns:
            return _list_sums(_arrow_column(dataset, "attention_mask"))
        if "input_ids" in columns:
            column = _arrow_column(dataset, "input_ids")
            return pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.empty(len(dataset), dtype=np.int64)
    for index in range(len(dataset)):
        row = dataset[index]
        if "attention_mask" in row:
            lengths[index] = int(np.asarray(row["attention_mask"]).sum())
        elif "input_ids" in row:
            lengths[index] = len(row["input_ids"])
        else:
            raise ConfigError("token counting needs 'attention_mask' or 'input_ids' in every sample")
    return lengths


def sequence_counts(dataset) -> np.ndarray | None:
    """Sequences packed into each row (from a ``seq_lengths`` column), or ``None`` when every row is one sequence."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None and hasattr(dataset, "with_format"):
        if SEQUENCE_LENGTHS_COLUMN not in columns:
            return None
        import pyarrow.compute as pc

        column = _arrow_column(dataset, SEQUENCE_LENGTHS_COLUMN)
        counts = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        if len(dataset) == 0 or SEQUENCE_LENGTHS_COLUMN not in dataset[0]:
            return None
        counts = np.array([len(dataset[index][SEQUENCE_LENGTHS_COLUMN]) for index in range(len(dataset))])
    if (counts < 1).any():
        raise ConfigError(
            f"row {int(np.argmin(counts))} of the dataset has an empty {SEQUENCE_LENGTHS_COLUMN!r} list; every packed "
            "row must hold at least one sequence"
        )
    return counts if (counts != 1).any() else None
