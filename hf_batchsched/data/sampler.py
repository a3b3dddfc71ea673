"""``RampBatchSampler``: per-rank index lists whose sizes follow a batch-size schedule.

The sampler reads the data as one **stream**: the concatenation of one shuffled permutation per pass over
the dataset (pass ``p`` is shuffled by a local ``torch.Generator`` seeded with ``seed + p``, like
``DistributedSampler``). Every optimizer step takes the next ``B`` indices of the stream, where ``B`` is the
schedule's global batch size at the stream position, and gives rank ``r`` the ``r``-th of ``world_size`` equal
contiguous blocks. Hence:

- the state is just the stream position (``consumed_samples``, plus ``consumed_tokens`` for token-clocked
  schedules): resuming needs no data iteration and no replay of the schedule (Megatron's design);
- within a pass every sample is seen exactly once over all ranks, nothing is dropped or duplicated;
- **a step that straddles a pass boundary takes the rest of its samples from the next pass's permutation**
  (so every step has the scheduled size); only the very last step of the stream (at ``total_samples``) may be
  short, rounded down to a multiple of ``world_size`` (the dropped ``< world_size`` samples are logged).

Batch sizes are decided lazily, when a batch is drawn, from the stream position (samples or tokens, both
counted by the sampler itself from what it has yielded, so DataLoader prefetching cannot change them): a
schedule that changes online is honoured while the order stays a deterministic function of
``(seed, schedule, position)``.

Example:

>>> sampler = RampBatchSampler(10, lambda consumed: 2 if consumed < 4 else 4, rank=0, world_size=2, seed=0)
>>> sampler.plan()
[2, 2, 4, 2]
>>> [len(batch) for batch in sampler]
[1, 1, 2, 1]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from ..errors import ConfigError, check_positive

__all__ = ["RampBatchSampler", "as_batch_schedule", "sample_lengths"]

logger = logging.getLogger(__name__)

ROUNDINGS = ("down", "error")


def as_batch_schedule(schedule) -> Callable[[float], int]:
    """Turn an ``int`` (constant), a config (a dict or a Megatron-style string such as ``"0:32 2M:64"``, through
    ``hf_batchsched.schedules.batch.batch_schedule_from_config``) or a callable into a schedule.

    A schedule is any callable ``consumed -> int`` (the global batch size); its optional ``.unit`` attribute
    says what ``consumed`` counts (``"samples"``, the default, or ``"tokens"``).

    >>> as_batch_schedule(32)(1000)
    32
    """
    if isinstance(schedule, bool):
        raise ConfigError(f"batch_schedule must be an int, a config dict or a callable, got {schedule!r}")
    if isinstance(schedule, int):
        check_positive("batch_schedule", schedule)
        return _Constant(schedule)
    if isinstance(schedule, (dict, str)):
        try:
            from ..schedules.batch import batch_schedule_from_config
        except ImportError as error:  # pragma: no cover - the module ships with the package
            raise ConfigError("batch_schedule configs need hf_batchsched.schedules.batch") from error
        return batch_schedule_from_config(schedule)
    if callable(schedule):
        unit = getattr(schedule, "unit", "samples")
        if unit not in ("samples", "tokens"):
            raise ConfigError(
                f"a batch schedule must be a function of consumed 'samples' or 'tokens', got unit {unit!r}; "
                "build it on one of those clocks"
            )
        return schedule
    raise ConfigError(f"batch_schedule must be an int, a config dict or a callable, got {type(schedule).__name__}")


class _Constant:
    unit = "samples"

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, consumed: float) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return f"constant({self.batch_size})"


def sample_lengths(dataset) -> list[int]:
    """Non-pad token count of every sample: the sum of ``attention_mask``, else the length of ``input_ids``."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None:  # datasets.Dataset: read whole columns, no per-row decoding
        if "attention_mask" in columns:
            return [int(sum(mask)) for mask in dataset["attention_mask"]]
        if "input_ids" in columns:
            return [len(ids) for ids in dataset["input_ids"]]
    lengths = []
    for index in range(len(dataset)):
        row = dataset[index]
        if "attention_mask" in row:
            lengths.append(int(sum(row["attention_mask"])))
        elif "input_ids" in row:
            lengths.append(len(row["input_ids"]))
        else:
            raise ConfigError("token counting needs 'attention_mask' or 'input_ids' in every sample")
    return lengths


class RampBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's index list for each optimizer step; global sizes follow ``batch_schedule``.

    Pass it to a ``DataLoader`` as ``batch_sampler``. It is already rank-aware: do not let another layer
    (``DistributedSampler``, accelerate's ``BatchSamplerShard``) shard it again.

    Args:
        data_source (`Sized` or `int`): the dataset (``datasets.Dataset`` or any map-style torch dataset), or its
            length.
        batch_schedule (`Callable` or `int`): global batch size as a function of consumed samples (or tokens, when
            its ``.unit`` is ``"tokens"``); an ``int`` is a constant schedule.
        rank (`int`, *optional*, defaults to `0`): this process's data-parallel rank.
        world_size (`int`, *optional*, defaults to `1`): number of data-parallel ranks.
        seed (`int`, *optional*, defaults to `0`): pass ``p`` is shuffled with a generator seeded with ``seed + p``.
        shuffle (`bool`, *optional*, defaults to `True`): ``False`` reads every pass in dataset order.
        round_to (`int`, *optional*): global sizes are made multiples of this (defaults to ``world_size``; the
            Trainer uses ``max_micro_batch_size * world_size``). Must be a multiple of ``world_size``.
        rounding (`str`, *optional*, defaults to `"down"`): ``"down"`` rounds a size down to a multiple of
            ``round_to`` (at least ``round_to``) and logs it; ``"error"`` raises a ``ConfigError`` instead.
        total_samples (`int`, *optional*): length of the stream (e.g. ``num_train_epochs * len(dataset)``);
            defaults to one pass; ``math.inf`` for an endless stream (the Trainer's ``max_steps`` mode).
        lengths (`Sequence[int]`, *optional*): non-pad tokens per sample; needed by token-clocked schedules
            (computed with ``sample_lengths`` when omitted and a dataset is given).
        consumed_samples (`int`, *optional*, defaults to `0`): stream position the next iteration starts at.
        consumed_tokens (`int`, *optional*, defaults to `0`): tokens consumed before ``consumed_samples``.
    """

    def __init__(
        self,
        data_source,
        batch_schedule,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        round_to: int | None = None,
        rounding: str = "down",
        total_samples: int | None = None,
        lengths: Sequence[int] | None = None,
        consumed_samples: int = 0,
        consumed_tokens: int = 0,
    ):
        if isinstance(data_source, torch.utils.data.IterableDataset):
            raise ConfigError(
                "RampBatchSampler needs a map-style dataset with a length (an IterableDataset cannot be shuffled "
                "or resumed by position); convert it, e.g. datasets.Dataset.from_generator(...)"
            )
        self.num_samples = data_source if isinstance(data_source, int) else len(data_source)
        check_positive("dataset size", self.num_samples)
        check_positive("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.round_to = world_size if round_to is None else int(round_to)
        check_positive("round_to", self.round_to)
        if self.round_to % world_size:
            raise ConfigError(f"round_to={self.round_to} must be a multiple of world_size={world_size}")
        if rounding not in ROUNDINGS:
            raise ConfigError(f"unknown rounding {rounding!r}; valid choices: {', '.join(ROUNDINGS)}")
        self.batch_schedule = as_batch_schedule(batch_schedule)
        self.unit = getattr(self.batch_schedule, "unit", "samples")
        self.rank, self.world_size, self.seed, self.shuffle, self.rounding = rank, world_size, seed, shuffle, rounding
        if total_samples is None:
            total_samples = self.num_samples
        self.total_samples = total_samples if total_samples == math.inf else int(total_samples)
        check_positive("total_samples", self.total_samples)
        if lengths is None and self.unit == "tokens":
            if isinstance(data_source, int):
                raise ConfigError("a token-clocked batch schedule needs `lengths` (non-pad tokens per sample)")
            lengths = sample_lengths(data_source)
        if lengths is not None and len(lengths) != self.num_samples:
            raise ConfigError(f"lengths has {len(lengths)} entries for a dataset of {self.num_samples} samples")
        self.lengths = None if lengths is None else torch.as_tensor(list(lengths), dtype=torch.long)
        self.consumed_samples = int(consumed_samples)
        self.consumed_tokens = int(consumed_tokens)
        self._warned_rounding = False

    # ---- state ---------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of data pass ``epoch``."""
        self.consumed_samples = epoch * self.num_samples
        self.consumed_tokens = epoch * int(self.lengths.sum()) if self.lengths is not None else 0

    def state_dict(self) -> dict:
        """The position the next iteration starts at (``pass_index``/``position`` are derived, for reading)."""
        return {
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "pass_index": self.consumed_samples // self.num_samples,
            "position": self.consumed_samples % self.num_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved stream position; refuses a state saved for another dataset size or seed."""
        for key in ("num_samples", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(
                    f"sampler state was saved with {key}={state[key]} but this sampler has "
                    f"{key}={getattr(self, key)}; resume with the same dataset and seed"
                )
        self.consumed_samples = int(state["consumed_samples"])
        self.consumed_tokens = int(state.get("consumed_tokens", 0))

    # ---- sizes ---------------------------------------------------------------------------------
    def global_batch_size(self, consumed_samples: int, consumed_tokens: int = 0) -> int:
        """The effective global batch size at a stream position: the schedule's value, rounded, capped at the end."""
        clock = consumed_tokens if self.unit == "tokens" else consumed_samples
        requested = int(self.batch_schedule(clock))
        size = self._round(requested)
        if size > self.num_samples:
            raise ConfigError(
                f"the batch schedule asks for a global batch of {requested} (effective {size}) at {self.unit}="
                f"{clock}, more than the {self.num_samples} samples in the dataset; cap the schedule at the "
                "dataset size (Smith et al. stop growing the batch near N/10)"
            )
        remaining = self.total_samples - consumed_samples
        if size > remaining:
            size = remaining - remaining % self.world_size
            if remaining % self.world_size:
                logger.warning(
                    "RampBatchSampler: the stream ends with %d samples, not a multiple of world_size=%d; the last "
                    "%d are dropped",
                    remaining,
                    self.world_size,
                    remaining % self.world_size,
                )
        return size

    def _round(self, requested: int) -> int:
        if requested < 1:
            raise ConfigError(f"the batch schedule returned {requested}; batch sizes must be >= 1")
        if requested % self.round_to == 0:
            return requested
        if self.rounding == "error":
            raise ConfigError(
                f"global batch size {requested} is not a multiple of max_micro_batch_size * world_size = "
                f"{self.round_to}; change the schedule or use rounding='down'"
            )
        size = max(self.round_to, requested - requested % self.round_to)
        log = logger.debug if self._warned_rounding else logger.warning
        log(
            "RampBatchSampler: global batch size %d rounded to %d (a multiple of micro batch x world size = %d)%s",
            requested,
            size,
            self.round_to,
            "" if self._warned_rounding else "; further roundings are logged at DEBUG level",
        )
        self._warned_rounding = True
        return size

    def plan(self, max_steps: int | None = None) -> list[int]:
        """Global batch sizes of every step from the current position to the end of the stream (or ``max_steps``).

        Exact for schedules that are pure functions of the clock; an online (adaptive) schedule is evaluated with
        its current state.
        """
        if max_steps is None and self.total_samples == math.inf:
            raise ConfigError("an endless sampler (total_samples=math.inf) can only plan a given number of steps")
        sizes, samples, tokens = [], self.consumed_samples, self.consumed_tokens
        while samples < self.total_samples and (max_steps is None or len(sizes) < max_steps):
            size = self.global_batch_size(samples, tokens)
            if size <= 0:
                break
            if self.unit == "tokens":
                tokens += int(self.lengths[self._stream_slice(samples, size)].sum())
            samples += size
            sizes.append(size)
        return sizes

    # ---- iteration -----------------------------------------------------------------------------
    def _permutation(self, pass_index: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator()
        generator.manual_seed(self.seed + pass_index)
        return torch.randperm(self.num_samples, generator=generator)

    def _stream_slice(self, start: int, size: int, cache: dict | None = None) -> torch.Tensor:
        """Global stream indices ``[start, start + size)``, crossing pass boundaries into the next permutation."""
        cache = {} if cache is None else cache
        pieces, position = [], start
        while position < start + size:
            pass_index, offset = divmod(position, self.num_samples)
            if pass_index not in cache:
                cache.clear()
                cache[pass_index] = self._permutation(pass_index)
            take = min(start + size - position, self.num_samples - offset)
            pieces.append(cache[pass_index][offset : offset + take])
            position += take
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def __iter__(self) -> Iterator[list[int]]:
        samples, tokens, cache = self.consumed_samples, self.consumed_tokens, {}
        while samples < self.total_samples:
            size = self.global_batch_size(samples, tokens)
            if size <= 0:
                return
            global_indices = self._stream_slice(samples, size, cache)
            per_rank = size // self.world_size
            if self.lengths is not None:
                tokens += int(self.lengths[global_indices].sum())
            samples += size
            yield global_indices[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()

    def __len__(self) -> int:
        if self.total_samples == math.inf:
            raise TypeError("an endless RampBatchSampler has no length")
        return len(self.plan())
