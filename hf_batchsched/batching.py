"""The package's one batch counter and splitter: collated step batches (padded and packed rows) and probe batches.

A **padded** batch has one sequence per row (``input_ids`` of shape ``(rows, length)``, an ``attention_mask``).
A **packed** batch holds many sequences in one row, as trl's ``SFTTrainer(packing=True)``/``padding_free=True``
and ``transformers.DataCollatorWithFlattening`` produce: shape ``(1, total_tokens)``, no ``attention_mask``, and
the sequence boundaries given by ``position_ids`` that restart at 0 (or ``cu_seq_lens_q``, or ``seq_idx``).

``split_micro_chunks`` cuts a padded batch into groups of at most ``max_micro_batch_size`` rows and a packed row
at sequence boundaries into pieces of at most ``max_micro_batch_size`` sequences, so a chunk never holds more
tokens than a padded chunk of the same number of sequences would (the Trainer's micro-chunks).

``split_batch`` cuts any batch a ``DataLoader`` yields (a tensor, a mapping or a tuple/list of tensors, nested,
samples along dimension 0) into chunks of at most ``micro_batch_size`` rows, keeping everything else as is (the
probes' and BN recalibration's chunks). ``batch_rows`` counts those rows; both splitters slice with one function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import ConfigError, check_positive

__all__ = [
    "IGNORE_INDEX",
    "batch_len",
    "batch_rows",
    "count_batch",
    "packed_sequence_starts",
    "split_batch",
    "split_micro_chunks",
]

# Per-example inputs of common model families, tried first when looking for the batch dimension (a collator may
# add tensors that are not per-example, such as a shared 1-D ``position_ids``); any other tensor is the fallback.
_PER_EXAMPLE_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "input_features", "input_values")
# Sequence-boundary descriptions a flattening collator adds (recomputed for each chunk of a packed row).
_CU_SEQ_LENS_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k")
_MAX_LENGTH_KEYS = ("max_length_q", "max_length_k")
IGNORE_INDEX = -100


def batch_rows(batch: Any) -> int | None:
    """Samples in ``batch``: dim 0 of its first non-scalar tensor, looking inside mappings, tuples and lists.

    In a mapping the per-example inputs of common model families (``input_ids``, ``labels``, ``pixel_values``, ...)
    are tried first: a collator may add tensors that are not per-example, such as a shared 1-D ``position_ids``.
    ``None`` for a batch with no such tensor.

    >>> batch_rows({"attention_mask": torch.ones(3, 5), "labels": torch.zeros(3, 5)}), batch_rows({"n": 1})
    (3, None)
    >>> batch_rows({"position_ids": torch.arange(7), "input_ids": torch.ones(2, 7)})
    2
    """
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        values = [batch[key] for key in _PER_EXAMPLE_KEYS if key in batch] + list(batch.values())
    else:
        values = batch if isinstance(batch, (tuple, list)) else []
    return next((rows for rows in map(batch_rows, values) if rows is not None), None)


def batch_len(inputs: Mapping) -> int:
    """Rows of a collated batch (``batch_rows``); a ``ConfigError`` when it holds no tensor of samples."""
    rows = batch_rows(inputs)
    if rows is None:
        raise ConfigError(
            f"cannot find the batch dimension: the collated batch (keys {sorted(inputs)}) has no tensor; the data "
            "collator must return tensors"
        )
    return rows


def _slice_rows(batch: Any, start: int, stop: int, rows: int) -> Any:
    """``batch`` with rows ``start:stop`` of every tensor whose dim 0 is ``rows``; other values kept; same types."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == rows else batch
    if isinstance(batch, Mapping):
        return type(batch)({key: _slice_rows(value, start, stop, rows) for key, value in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice_rows(value, start, stop, rows) for value in batch)
    return batch


def split_batch(batch: Any, micro_batch_size: int | None) -> list[Any]:
    """Chunks of at most ``micro_batch_size`` samples, in order; ``[batch]`` when it fits or there is no limit.

    Tensors whose first dimension is the batch's sample count (``batch_rows``) are sliced; everything else
    (scalars, strings, a tensor of another length) is passed to every chunk unchanged. Containers keep their type.
    A batch with no tensor of samples cannot be split (``ConfigError``).

    >>> [chunk["x"].tolist() for chunk in split_batch({"x": torch.arange(5), "scale": 2.0}, 2)]
    [[0, 1], [2, 3], [4]]
    >>> split_batch("text", None)
    ['text']
    """
    if micro_batch_size is None:
        return [batch]
    check_positive("micro_batch_size", micro_batch_size)
    rows = batch_rows(batch)
    if rows is None:
        raise ConfigError(
            f"cannot split a batch of type {type(batch).__name__} with no tensor of samples; pass a tensor, a dict or "
            "a tuple of tensors with the samples along dimension 0"
        )
    if rows <= micro_batch_size:
        return [batch]
    return [_slice_rows(batch, start, start + micro_batch_size, rows) for start in range(0, rows, micro_batch_size)]


def packed_sequence_starts(inputs: Mapping) -> torch.Tensor | None:
    """Start offsets of the sequences packed into a one-row batch, or ``None`` for a batch of one sequence per row.

    Boundaries come from ``position_ids`` restarts (any step other than +1), else ``cu_seq_lens_q``, else
    ``seq_idx``. Padding that a collator appends with position 0 (``pad_to_multiple_of``) shows as one-token
    sequences. Raises a ``ConfigError`` for packed layouts that cannot be split exactly.

    >>> packed_sequence_starts({"input_ids": torch.ones(1, 6), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])})
    tensor([0, 3, 5])
    >>> packed_sequence_starts({"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3)}) is None
    True
    """
    positions, mask = inputs.get("position_ids"), inputs.get("attention_mask")
    cu_seq_lens, seq_idx = inputs.get("cu_seq_lens_q"), inputs.get("seq_idx")
    starts = None
    if torch.is_tensor(positions) and positions.dim() == 2 and positions.shape[1] > 1:
        restarts = positions.diff(dim=-1) != 1
        if torch.is_tensor(mask) and mask.dim() == 2:
            # generation-style positions step at padding; a restart between two real tokens is a packed row
            inside = restarts & mask[:, 1:].bool() & mask[:, :-1].bool()
            if bool(inside.any()):
                raise ConfigError(
                    "the collated rows pack several sequences (position_ids restart inside the attention_mask), but "
                    "a 2-D attention_mask makes the model attend across them; use a padding-free collator (trl "
                    "padding_free=True, transformers.DataCollatorWithFlattening), which returns no attention_mask"
                )
            return None
        if bool(restarts.any()):
            starts = torch.cat([torch.ones(positions.shape[0], 1, dtype=torch.bool), restarts], dim=1)
            if positions.shape[0] > 1:
                raise ConfigError(
                    f"the collated batch packs sequences into {positions.shape[0]} rows; micro-chunks split packed "
                    "batches of one flattened row: use trl padding_free=True or DataCollatorWithFlattening"
                )
            starts = starts[0].nonzero().flatten()
    elif torch.is_tensor(cu_seq_lens) and cu_seq_lens.dim() == 1 and cu_seq_lens.numel() > 2:
        starts = cu_seq_lens[:-1].long()
    elif torch.is_tensor(seq_idx) and seq_idx.dim() == 2 and seq_idx.shape[0] == 1 and seq_idx.shape[1] > 1:
        changes = seq_idx[0].diff() != 0
        if bool(changes.any()):
            starts = torch.cat([torch.zeros(1, dtype=torch.long), changes.nonzero().flatten() + 1])
    if starts is None or len(starts) < 2:
        return None
    if batch_len(inputs) != 1:
        raise ConfigError(
            f"the collated batch describes packed sequences but has {batch_len(inputs)} rows; micro-chunks split "
            "packed batches of one flattened row (trl padding_free=True, transformers.DataCollatorWithFlattening)"
        )
    return starts


def count_batch(inputs: Mapping) -> tuple[int, int]:
    """Examples and non-pad tokens in a collated batch: ``(num_examples, num_tokens)``.

    Examples are the batch dimension (dim 0) of the batch's tensors, whatever the modality (``input_ids``,
    ``labels``, ``pixel_values``, ...), or the packed sequences of a flattened row. Tokens are the sum of a 2-D
    ``attention_mask``, else the size of ``input_ids``, else 0: image or audio batches have no tokens.

    >>> count_batch({"input_ids": torch.ones(2, 3), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])})
    (2, 3)
    >>> count_batch({"pixel_values": torch.zeros(4, 1, 8, 8), "labels": torch.arange(4)})
    (4, 0)
    >>> count_batch({"input_ids": torch.ones(1, 5), "position_ids": torch.tensor([[0, 1, 0, 1, 2]])})
    (2, 5)
    """
    starts = packed_sequence_starts(inputs)
    num_examples = batch_len(inputs) if starts is None else len(starts)
    mask, input_ids = inputs.get("attention_mask"), inputs.get("input_ids")
    if torch.is_tensor(mask) and mask.dim() == 2:
        return num_examples, int(mask.sum())
    if torch.is_tensor(input_ids):
        return num_examples, int(input_ids.numel())
    return num_examples, 0


def _target_columns(chunk: Mapping, labels_shifted: bool) -> torch.Tensor | None:
    """``(rows, length)`` bool: the positions whose output enters the loss (a label is predicted from them)."""
    shift_labels, labels = chunk.get("shift_labels"), chunk.get("labels")
    if torch.is_tensor(shift_labels) and shift_labels.dim() == 2:
        return shift_labels != IGNORE_INDEX
    if not (torch.is_tensor(labels) and labels.dim() == 2):
        return None
    if not labels_shifted:
        return labels != IGNORE_INDEX
    targets = torch.zeros_like(labels, dtype=torch.bool)
    targets[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return targets


def _trim_padding(chunk: dict, trim_leading: bool, labels_shifted: bool) -> dict:
    """Cut the columns of a padded chunk that hold no real token in any row and predict no label."""
    mask = chunk["attention_mask"]
    keep = mask.bool().any(dim=0)
    targets = _target_columns(chunk, labels_shifted)
    if targets is not None:
        keep |= targets.any(dim=0)
    columns = keep.nonzero().flatten()
    seq_len = mask.shape[1]
    if not len(columns):
        return chunk
    low = int(columns[0]) if trim_leading else 0
    high = int(columns[-1]) + 1
    if low == 0 and high == seq_len:
        return chunk
    return {
        key: value[:, low:high] if torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == seq_len else value
        for key, value in chunk.items()
    }


def _split_packed(inputs: dict, starts: torch.Tensor, max_sequences: int, labels_shifted: bool) -> list[dict]:
    """Cut a flattened row at sequence boundaries into pieces of at most ``max_sequences`` sequences.

    One-token sequences (a collator's trailing padding, which carries no label) ride along with the chunk before
    them and are not counted.
    """
    total = next(v.shape[1] for v in (inputs.get("input_ids"), inputs.get("position_ids")) if torch.is_tensor(v))
    ends = torch.cat([starts[1:], torch.tensor([total])])
    lengths = ends - starts
    real = (lengths > 1).long()
    chunk_of_sequence = ((real.cumsum(0) - 1).clamp(min=0)) // max_sequences
    first_of_chunk = torch.ones_like(chunk_of_sequence, dtype=torch.bool)
    first_of_chunk[1:] = chunk_of_sequence[1:] != chunk_of_sequence[:-1]
    cuts = starts[first_of_chunk].tolist() + [total]
    if len(cuts) == 2:
        return [inputs]
    labels = inputs.get("labels")
    if labels_shifted and "shift_labels" not in inputs and torch.is_tensor(labels):
        cut_labels = labels[0, torch.tensor(cuts[1:-1])]
        if bool((cut_labels != IGNORE_INDEX).any()):
            raise ConfigError(
                "a packed row cannot be split exactly: the first token of a packed sequence has a label, so the "
                "whole row's shifted loss predicts it from the previous sequence; label the first token of every "
                "sequence -100 (trl's collator and DataCollatorWithFlattening do) or pass shift_labels"
            )
    chunks = []
    for low, high in zip(cuts[:-1], cuts[1:]):
        inside = (starts >= low) & (starts < high)
        chunk_starts, chunk_lengths = starts[inside] - low, lengths[inside]
        chunk = {}
        for key, value in inputs.items():
            if key in _CU_SEQ_LENS_KEYS and torch.is_tensor(value):
                chunk[key] = torch.cat([chunk_starts, torch.tensor([high - low])]).to(value.dtype)
            elif key in _MAX_LENGTH_KEYS:
                chunk[key] = int(chunk_lengths.max())
            elif torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == total:
                piece = value[:, low:high]
                chunk[key] = piece - piece[:, :1] if key == "seq_idx" else piece
            else:
                chunk[key] = value
        chunks.append(chunk)
    return chunks


def split_micro_chunks(
    inputs: dict, max_micro_batch_size: int, *, trim_leading: bool = False, labels_shifted: bool = True
) -> list[dict]:
    """Split a collated step batch into micro-chunks of at most ``max_micro_batch_size`` sequences.

    Padded batches are split by rows. Each chunk drops the columns in which no row has a real token
    (``attention_mask``) or a position that predicts a label: trailing ones always, leading ones (left padding)
    only with ``trim_leading``. A column just before a row's first labelled token is kept, so a causal LM's shifted
    loss (``labels_shifted``) keeps every term that ``num_items_in_batch`` counts.

    Packed batches (one flattened row, see ``packed_sequence_starts``) are cut at sequence boundaries; the
    ``position_ids``, ``cu_seq_lens_*``, ``max_length_*`` and ``seq_idx`` of each chunk describe its own sequences.

    >>> batch = {"input_ids": torch.tensor([[5, 6, 0], [7, 0, 0], [8, 9, 4]]),
    ...          "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])}
    >>> [chunk["input_ids"].tolist() for chunk in split_micro_chunks(batch, 2)]
    [[[5, 6], [7, 0]], [[8, 9, 4]]]
    >>> packed = {"input_ids": torch.arange(7)[None], "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]])}
    >>> [chunk["position_ids"].tolist() for chunk in split_micro_chunks(packed, 2)]
    [[[0, 1, 2, 0, 1]], [[0, 1]]]
    """
    starts = packed_sequence_starts(inputs)
    if starts is not None:
        return _split_packed(inputs, starts, max_micro_batch_size, labels_shifted)
    num_rows = batch_len(inputs)
    mask = inputs.get("attention_mask")
    padded = torch.is_tensor(mask) and mask.dim() == 2 and not bool(mask.all())
    if num_rows <= max_micro_batch_size and not padded:
        return [inputs]
    chunks = [
        _slice_rows(dict(inputs), start, start + max_micro_batch_size, num_rows)
        for start in range(0, num_rows, max_micro_batch_size)
    ]
    return [_trim_padding(chunk, trim_leading, labels_shifted) for chunk in chunks] if padded else chunks
