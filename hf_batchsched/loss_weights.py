"""How much each micro-chunk's loss counts in the step's gradient: the arithmetic behind ``BatchRampTrainer``'s
chunked ``training_step``, as pure functions of the chunks and of what the Trainer does with ``num_items_in_batch``.

A step batch of B samples runs as k micro-chunks. The Trainer's ``training_step``/``compute_loss`` scale each chunk's
loss either by the step's item count (a loss normalised by ``num_items_in_batch``: ``sum(chunk) / N_step``, times
the number of processes with ``average_tokens_across_devices``, then ``N_step`` is global) or by
``current_gradient_accumulation_steps`` (a per-example loss: the chunk mean divided by it); DDP then averages ranks.
:func:`chunk_loss_weights` gives, per chunk, the items its loss averages over on this rank and the factor by which
that mean enters this rank's accumulated gradient, so ``.grad / weight`` after chunk 1 is the gradient of chunk 1's
mean loss (see "Micro-chunk events" in ``docs/batch-ramp.md``).

Example (two chunks of a per-example loss, one process, the Trainer dividing by the accumulation):

>>> import torch
>>> chunks = [{"x": torch.zeros(3, 2)}, {"x": torch.zeros(1, 2)}]
>>> chunk_loss_weights(chunks, None, [4 / 3, 4.0], token_normalised=False, scaled_for_ga=False, items_scale=1,
...                    labels_shifted=True)
[(3, 0.75), (1, 0.25)]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .batching import batch_len

__all__ = ["chunk_accumulation", "chunk_loss_weights", "per_token_labels"]


def per_token_labels(inputs: Mapping) -> bool:
    """Whether the loss is token-level: integer labels with a sequence dimension (LM, token classification)."""
    if torch.is_tensor(inputs.get("shift_labels")):
        return True
    labels = inputs.get("labels")
    return torch.is_tensor(labels) and labels.dim() >= 2 and not labels.is_floating_point()


def chunk_accumulation(inputs: Mapping, chunks: list[dict], step_rows: int, world_size: int, packed: bool) -> list:
    """What the Trainer divides each chunk's loss by when it is not normalised by ``num_items_in_batch``: the
    inverse of the chunk's share of the global step batch (DDP then averages ranks); for a packed row, of the row's
    tokens (what trl scales a mixture-of-experts auxiliary loss by)."""
    if packed:
        return [inputs["input_ids"].shape[1] / chunk["input_ids"].shape[1] for chunk in chunks]
    return [step_rows / (batch_len(chunk) * world_size) for chunk in chunks]


def chunk_loss_weights(
    chunks: list[dict],
    num_items_in_batch,
    accumulation: list[float],
    *,
    token_normalised: bool,
    scaled_for_ga: bool,
    items_scale: int,
    labels_shifted: bool,
) -> list[tuple[int, float]]:
    """``(items, loss weight)`` of each chunk.

    Args:
        chunks (`list[dict]`): the step's micro-chunks (trimmed as they are run).
        num_items_in_batch: the Trainer's item count of the step (label tokens), used when ``token_normalised``.
        accumulation (`list[float]`): each chunk's ``current_gradient_accumulation_steps``.
        token_normalised (`bool`): the loss is normalised by ``num_items_in_batch``.
        scaled_for_ga (`bool`): the Trainer does not divide the loss by the accumulation itself.
        items_scale (`int`): the factor the Trainer multiplies a token-normalised loss by (processes with
            ``average_tokens_across_devices``, else 1).
        labels_shifted (`bool`): the model's loss shifts ``labels`` by one (a causal LM).
    """
    if token_normalised:
        step_items = float(
            num_items_in_batch.reshape(-1)[0] if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        )
    weights = []
    for chunk, chunk_accumulation in zip(chunks, accumulation):
        samples = batch_len(chunk)
        if token_normalised:  # label tokens counted like the Trainer's _get_num_items_in_batch, on the trimmed chunk
            labels = chunk.get("shift_labels")
            if labels is None:
                labels = chunk["labels"][..., 1:] if labels_shifted else chunk["labels"]
            items = int(labels.ne(-100).sum())
            weight = items_scale * items / step_items
        else:
            items, weight = samples, 1.0
        if not scaled_for_ga:
            weight /= chunk_accumulation
        weights.append((items, weight))
    return weights
