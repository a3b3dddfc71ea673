"""The train DataLoader of a batch ramp: one batch per optimizer step, this rank's share, drawn by a rank-aware
``RampBatchSampler`` over the dataset rows (``BatchRampTrainer.get_train_dataloader`` passes it the dataset and
collator the Trainer prepared).
"""

from __future__ import annotations

import functools
import math

import torch
from torch.utils.data import DataLoader
from transformers.trainer_utils import seed_worker

from .data.lengths import sample_lengths
from .data.sampler import RampBatchSampler
from .errors import ConfigError
from .launch import no_tokens_for_policy

__all__ = ["build_ramp_sampler", "ramp_dataloader"]


def build_ramp_sampler(
    dataset,
    batch_schedule,
    targs,
    *,
    lr_policy,
    seed: int,
    sampling_strategy: str,
    batch_size_multiple: int,
    rounding: str,
    consumed_rows: int,
    resumed_state: dict | None,
) -> RampBatchSampler:
    """This rank's ``RampBatchSampler`` for ``targs`` (the ``TrainingArguments``), at stream position
    ``consumed_rows``; ``resumed_state`` (a checkpoint's ramp state) is loaded into it, which refuses a position saved
    with other per-row counts."""
    total_rows = math.inf if targs.max_steps > 0 else math.ceil(targs.num_train_epochs * len(dataset))
    # One definition of a token for the clock, the token schedules and the checkpoint: the non-pad tokens of the
    # dataset rows (cheap for Arrow datasets; other datasets are read only when something counts tokens).
    token_columns = {"input_ids", "attention_mask"} & set(getattr(dataset, "column_names", None) or ())
    needs_tokens = lr_policy is not None and lr_policy.unit == "tokens"
    try:
        lengths = sample_lengths(dataset) if token_columns or needs_tokens else None
    except ConfigError as error:
        raise no_tokens_for_policy(lr_policy) from error
    sampler = RampBatchSampler(
        dataset,
        batch_schedule,
        rank=targs.process_index,
        world_size=targs.world_size,
        seed=seed,
        shuffle=sampling_strategy != "sequential",
        round_to=batch_size_multiple,
        rounding=rounding,
        total_rows=total_rows,
        lengths=lengths,
        group_by_length=sampling_strategy == "group_by_length",
        drop_last=targs.dataloader_drop_last,
        consumed_rows=consumed_rows,
    )
    if resumed_state is not None:
        clock = resumed_state["clock"]
        sampler.load_state_dict(
            {
                "consumed_rows": resumed_state["consumed_rows"],
                "consumed_samples": clock["consumed_samples"],
                "consumed_tokens": clock["consumed_tokens"],
            }
        )
    return sampler


def ramp_dataloader(dataset, sampler: RampBatchSampler, collator, targs, seed: int) -> DataLoader:
    """The DataLoader over ``sampler`` with the ``TrainingArguments``' worker settings. Not meant for
    ``accelerator.prepare``: accelerate would re-shard the batch sampler (``BatchSamplerShard``) and prefetch."""
    loader_kwargs = {}
    if targs.dataloader_num_workers > 0:
        loader_kwargs = {
            "prefetch_factor": targs.dataloader_prefetch_factor,
            "persistent_workers": targs.dataloader_persistent_workers,
            "worker_init_fn": functools.partial(
                seed_worker, num_workers=targs.dataloader_num_workers, rank=targs.process_index
            ),
        }
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=targs.dataloader_num_workers,
        pin_memory=targs.dataloader_pin_memory and targs.device.type == "cuda",
        # Its own generator: creating the iterator draws a base seed, which from the global generator would come
        # after a resume has restored the checkpoint's RNG state and shift every later dropout mask.
        generator=torch.Generator().manual_seed(seed),
        **loader_kwargs,
    )
