"""Whether a step batch can be cut into micro-chunks exactly: the checks on a packed (flattened) batch, and the test
that decides whether a chunk's leading (left) padding columns may be cut. Pure functions of the batch, the chunks
and the model's outputs; ``BatchRampTrainer`` reads the model's settings and runs the model, and passes them here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .batching import IGNORE_INDEX, packed_sequence_starts, split_micro_chunks
from .errors import ConfigError

__all__ = ["check_packed_batch", "has_left_padding", "leading_trim_candidate", "trimmed_outputs_agree"]


def check_packed_batch(inputs: Mapping, num_items_in_batch, attn_implementation, drawn_samples: int | None) -> None:
    """Refuse a packed step batch that cannot be chunked exactly: a loss that does not take ``num_items_in_batch``,
    no ``position_ids`` under eager/sdpa attention (``attn_implementation``: the model config's), or more
    multi-token sequences than the dataset rows it came from hold (``drawn_samples``; ``None``: not from the ramp's
    sampler, not checked)."""
    if num_items_in_batch is None:
        raise ConfigError(
            "packed batches need their loss normalised over the step's label tokens (num_items_in_batch), but "
            "this model's forward does not take it; use a model whose forward accepts **kwargs, or pass "
            "compute_loss_func"
        )
    if "position_ids" not in inputs and attn_implementation in ("eager", "sdpa"):
        raise ConfigError(
            "the packed batch has no position_ids: eager/sdpa attention builds the block-diagonal mask from them "
            "and would attend across the packed sequences; make the collator return position_ids"
        )
    if drawn_samples is not None:
        starts = packed_sequence_starts(inputs)
        total = inputs["input_ids"].shape[1]
        multi_token = int(((torch.cat([starts[1:], torch.tensor([total])]) - starts) > 1).sum())
        if multi_token > drawn_samples:
            raise ConfigError(
                f"the packed batch holds {multi_token} sequences but its dataset rows hold {drawn_samples}: "
                "the rows pack sequences without a 'seq_lengths' column, so the clock would count rows; add the "
                "column (trl.pack_dataset does) or let the collator flatten one sequence per row"
            )


def has_left_padding(inputs: Mapping) -> bool:
    """Whether a padded batch has a row whose first column is padding."""
    mask = inputs.get("attention_mask")
    return torch.is_tensor(mask) and mask.dim() == 2 and not bool(mask[:, 0].all())


def leading_trim_candidate(inputs: Mapping, max_micro_batch_size: int) -> tuple[dict, dict, int] | None:
    """The first micro-chunk that trimming would cut leading columns from: ``(untrimmed, trimmed, columns removed)``,
    or ``None`` when no chunk loses any."""
    for untrimmed in split_micro_chunks(inputs, max_micro_batch_size, labels_shifted=True):
        trimmed = split_micro_chunks(untrimmed, max_micro_batch_size, trim_leading=True, labels_shifted=True)[0]
        removed = untrimmed["attention_mask"].shape[1] - trimmed["attention_mask"].shape[1]
        if removed:
            return untrimmed, trimmed, removed
    return None


def trimmed_outputs_agree(full_logits, cut_logits, removed: int, trimmed: Mapping, device) -> bool:
    """Whether a chunk's fp32 logits without its ``removed`` leading columns (``cut_logits``) match those with them
    (``full_logits``) at every position that holds a real token or predicts a label, to fp32 rounding."""
    if not (torch.is_tensor(full_logits) and torch.is_tensor(cut_logits) and full_logits.dtype == torch.float32):
        return False
    kept = full_logits[:, removed:]
    relevant = trimmed["attention_mask"].bool().to(device)
    labels = trimmed.get("labels")
    if torch.is_tensor(labels):
        relevant[:, :-1] |= labels[:, 1:].to(device) != IGNORE_INDEX
    difference = (kept - cut_logits).abs().amax(dim=-1)[relevant]
    scale = max(1.0, float(kept.abs().amax()))
    return bool(difference.numel()) and float(difference.max()) <= 1e-4 * scale
