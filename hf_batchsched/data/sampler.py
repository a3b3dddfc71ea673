"""``RampBatchSampler``: per-rank index lists whose sizes follow a batch-size schedule.

The sampler reads the data as one **stream** of dataset rows: the concatenation of one shuffled permutation per
pass over the dataset (pass ``p`` is shuffled by a local ``torch.Generator`` seeded with ``seed + p``, like
``DistributedSampler``). Every optimizer step takes the next rows of the stream, as many as the schedule's global
batch size at the stream position, and gives rank ``r`` the ``r``-th of ``world_size`` equal contiguous blocks.
Hence:

- the state is just the stream position (``consumed_rows``); the samples and tokens consumed before it are a pure
  function of it (cumulative counts over the stream), so resuming needs no data iteration and no replay of the
  schedule (Megatron's design);
- within a pass every row is seen exactly once over all ranks, nothing is dropped or duplicated;
- **a step that straddles a pass boundary takes the rest of its rows from the next pass's permutation** (so every
  step has the scheduled size); only the very last step of the stream may be short, rounded down to a multiple of
  ``world_size`` (the dropped ``< world_size`` rows are logged), or dropped with ``drop_last``.

Units. The schedule is a function of consumed **samples** (sequences) or **tokens** (non-pad tokens of the rows,
``sample_lengths``). A row is one sequence unless it packs several (a ``seq_lengths`` column, from trl's
``pack_dataset``): then a step takes the most whole rows whose sequences fit in the scheduled size (at least one
row per rank), and ``consumed_samples`` counts sequences. Sizes are rounded *down* to multiples of ``round_to``
(``world_size`` by default), never up, by the package's one rounding (``schedules.batch_base.RoundedBatch``).

Batch sizes are decided lazily, when a batch is drawn, from the stream position: a schedule that changes online is
honoured while the order stays a deterministic function of ``(seed, schedule, position)``. Planning (``plan``,
``__len__``) walks the same steps on cumulative counts: one permutation and one cumulative sum per pass, so it is
linear in the number of rows.

Example:

>>> sampler = RampBatchSampler(10, lambda consumed: 2 if consumed < 4 else 4, rank=0, world_size=2, seed=0)
>>> sampler.plan()
[2, 2, 4, 2]
>>> [len(batch) for batch in sampler]
[1, 1, 2, 1]
>>> sampler.state_dict()["consumed_rows"]  # what was yielded
10
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import math
import numbers
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigError, check_integer, check_positive
from ..schedules.batch_base import RoundedBatch
from ..schedules.batch_config import as_batch_schedule
from .lengths import sample_lengths, sequence_counts

__all__ = ["DrawnStep", "RampBatchSampler"]

logger = logging.getLogger(__name__)

ROUNDINGS = ("down", "error")


@dataclasses.dataclass(frozen=True)
class DrawnStep:
    """One yielded step batch: its rows, samples and tokens over all ranks and on this rank, and the stream position
    after it (tokens are 0 when the lengths are unknown)."""

    rows: int
    samples: int
    tokens: int
    local_samples: int
    local_tokens: int
    consumed_rows: int
    consumed_samples: int
    consumed_tokens: int


@dataclasses.dataclass(frozen=True)
class _Pass:
    order: torch.Tensor  # the pass's permutation of the dataset rows
    cumulative_tokens: np.ndarray | None  # tokens of the first k rows of the pass, k = 0..N
    cumulative_sequences: np.ndarray | None  # sequences of the first k rows of the pass (packed rows only)


class RampBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's index list for each optimizer step; global sizes follow ``batch_schedule``.

    Pass it to a ``DataLoader`` as ``batch_sampler``. It is already rank-aware: do not let another layer
    (``DistributedSampler``, accelerate's ``BatchSamplerShard``) shard it again.

    It follows the ``DistributedSampler`` idioms: ``state_dict()`` reports the position after the batches yielded so
    far, and with the default length (one pass) ``set_epoch(e)`` makes the next iteration yield pass ``e``.

    Args:
        data_source (`Sized` or `int`): the dataset (``datasets.Dataset`` or any map-style torch dataset), or its
            number of rows.
        batch_schedule (`BatchSchedule`, `int`, `dict`, `str` or `Callable`): global batch size as a function of
            consumed samples (or tokens, when its ``.unit`` is ``"tokens"``); an ``int`` or a config is read by
            ``hf_batchsched.schedules.batch_config.as_batch_schedule``.
        rank (`int`, *optional*, defaults to `0`): this process's data-parallel rank.
        world_size (`int`, *optional*, defaults to `1`): number of data-parallel ranks.
        seed (`int`, *optional*, defaults to `0`): pass ``p`` is shuffled with a generator seeded with ``seed + p``.
        shuffle (`bool`, *optional*, defaults to `True`): ``False`` reads every pass in dataset order.
        round_to (`int`, *optional*): global sizes are rounded down to multiples of this (defaults to
            ``world_size``; must be a multiple of it). A size below ``round_to`` is refused, never raised.
        rounding (`str`, *optional*, defaults to `"down"`): ``"down"`` rounds a size down to a multiple of
            ``round_to`` and logs it; ``"error"`` raises a ``ConfigError`` instead.
        total_rows (`int`, *optional*): length of the stream in rows (e.g. ``num_train_epochs * len(dataset)``);
            ``math.inf`` for an endless stream (the Trainer's ``max_steps`` mode). Defaults to *epoch mode*: each
            iteration runs to the end of the pass it starts in (select the pass with ``set_epoch``).
        lengths (`Sequence[int]`, *optional*): non-pad tokens per row; needed by token-clocked schedules and
            ``group_by_length`` (computed with ``sample_lengths`` when omitted and a dataset is given). When known,
            ``consumed_tokens`` counts them.
        sequences (`Sequence[int]`, *optional*): sequences packed into each row; computed with ``sequence_counts``
            (a ``seq_lengths`` column) when omitted and a dataset is given; ``None`` means one per row.
        group_by_length (`bool`, *optional*, defaults to `False`): order each step batch by length (longest first)
            and deal it to the ranks in turn, so each micro-chunk holds rows of similar length (less padding). The
            rows of each step are the same as without it.
        drop_last (`bool`, *optional*, defaults to `False`): drop the last step of the stream when it is shorter than
            the scheduled size.
        consumed_rows (`int`, *optional*, defaults to `0`): stream position the next iteration starts at.
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
        total_rows: int | None = None,
        lengths: Sequence[int] | None = None,
        sequences: Sequence[int] | None = None,
        group_by_length: bool = False,
        drop_last: bool = False,
        consumed_rows: int = 0,
    ):
        if isinstance(data_source, torch.utils.data.IterableDataset):
            raise ConfigError(
                "RampBatchSampler needs a map-style dataset with a length (an IterableDataset cannot be shuffled "
                "or resumed by position); convert it, e.g. datasets.Dataset.from_generator(...)"
            )
        self.num_rows = data_source if isinstance(data_source, int) else len(data_source)
        check_positive("dataset size", self.num_rows)
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
        # The one rounding (schedules.batch_base.RoundedBatch): down to round_to, or refused; never raised.
        mode = "error" if rounding == "error" else "down"
        self.rounded_schedule = RoundedBatch(self.batch_schedule, self.round_to, mode=mode, never_raise=True)
        check_integer("seed", seed)
        self.rank, self.world_size, self.seed, self.shuffle, self.rounding = rank, world_size, seed, shuffle, rounding
        self.group_by_length, self.drop_last = bool(group_by_length), bool(drop_last)
        self.epoch_mode = total_rows is None
        if not self.epoch_mode:
            self.total_rows = total_rows if total_rows == math.inf else int(total_rows)
            check_positive("total_rows", self.total_rows, allow_inf=True)
        if lengths is None and (self.unit == "tokens" or self.group_by_length):
            if isinstance(data_source, int):
                need = "a token-clocked batch schedule" if self.unit == "tokens" else "group_by_length"
                raise ConfigError(f"{need} needs `lengths` (non-pad tokens per sample)")
            lengths = sample_lengths(data_source)
        if sequences is None and not isinstance(data_source, int):
            sequences = sequence_counts(data_source)
        self.lengths = self._per_row("lengths", lengths)
        self.sequences = self._per_row("sequences", sequences)
        self.tokens_per_pass = int(self.lengths.sum()) if self.lengths is not None else 0
        self.samples_per_pass = int(self.sequences.sum()) if self.sequences is not None else self.num_rows
        self.consumed_rows = int(consumed_rows)
        check_positive("consumed_rows", self.consumed_rows, allow_zero=True)
        self._passes: collections.OrderedDict[int, _Pass] = collections.OrderedDict()
        self._drawn: collections.deque[DrawnStep] = collections.deque()
        self._warned_rounding = self._warned_packed = False

    def _per_row(self, name: str, values) -> np.ndarray | None:
        if values is None:
            return None
        values = np.asarray(values, dtype=np.int64).reshape(-1)
        if len(values) != self.num_rows:
            raise ConfigError(f"{name} has {len(values)} entries for a dataset of {self.num_rows} rows")
        return values

    # ---- state ---------------------------------------------------------------------------------
    @property
    def consumed_samples(self) -> int:
        """Samples (sequences) in the stream before ``consumed_rows``."""
        return self.samples_before(self.consumed_rows)

    @property
    def consumed_tokens(self) -> int:
        """Non-pad tokens in the stream before ``consumed_rows`` (0 when the lengths are unknown)."""
        return self.tokens_before(self.consumed_rows)

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of data pass ``epoch`` (in epoch mode, it yields that pass)."""
        check_positive("epoch", epoch, allow_zero=True)
        self.consumed_rows = int(epoch) * self.num_rows

    def state_dict(self) -> dict:
        """The position after the last yielded batch (``pass_index``/``position`` are derived, for reading)."""
        return {
            "consumed_rows": self.consumed_rows,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "pass_index": self.consumed_rows // self.num_rows,
            "position": self.consumed_rows % self.num_rows,
            "seed": self.seed,
            "num_rows": self.num_rows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved stream position; refuses a state saved for another dataset, seed or token count."""
        for key in ("num_rows", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(
                    f"sampler state was saved with {key}={state[key]} but this sampler has "
                    f"{key}={getattr(self, key)}; resume with the same dataset and seed"
                )
        rows = int(state["consumed_rows"])
        for key, count in (("consumed_samples", self.samples_before), ("consumed_tokens", self.tokens_before)):
            if key == "consumed_tokens" and self.lengths is None:
                continue
            if key in state and int(state[key]) != count(rows):
                raise ConfigError(
                    f"sampler state has {key}={state[key]}, but the {rows} rows before its position hold "
                    f"{count(rows)}: it was saved with other per-row counts (lengths); resume with the same dataset"
                )
        self.consumed_rows = rows

    def at_position(self, consumed_rows: int) -> RampBatchSampler:
        """A copy that starts at another stream position (same data, schedule and caches), e.g. to plan a run."""
        other = copy.copy(self)
        other.consumed_rows = int(consumed_rows)
        return other

    def __copy__(self) -> RampBatchSampler:
        """A shallow copy shares the data, schedule and caches, not the steps drawn and not yet taken."""
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__, _drawn=collections.deque())
        return other

    # ---- cumulative counts over the stream -----------------------------------------------------
    def _pass(self, pass_index: int) -> _Pass:
        if pass_index in self._passes:
            self._passes.move_to_end(pass_index)
            return self._passes[pass_index]
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + pass_index)
            order = torch.randperm(self.num_rows, generator=generator)
        else:
            order = torch.arange(self.num_rows)
        positions = order.numpy()

        def cumulative(values):
            return None if values is None else np.concatenate(([0], np.cumsum(values[positions])))

        entry = _Pass(order, cumulative(self.lengths), cumulative(self.sequences))
        self._passes[pass_index] = entry
        while len(self._passes) > 3:  # a step spans at most two passes; keep one more for the planner
            self._passes.popitem(last=False)
        return entry

    def samples_before(self, row: int) -> int:
        """Samples (sequences) in the first ``row`` rows of the stream."""
        if self.sequences is None:
            return int(row)
        pass_index, offset = divmod(int(row), self.num_rows)
        within = int(self._pass(pass_index).cumulative_sequences[offset]) if offset else 0
        return pass_index * self.samples_per_pass + within

    def tokens_before(self, row: int) -> int:
        """Non-pad tokens in the first ``row`` rows of the stream (0 when the lengths are unknown)."""
        if self.lengths is None:
            return 0
        pass_index, offset = divmod(int(row), self.num_rows)
        within = int(self._pass(pass_index).cumulative_tokens[offset]) if offset else 0
        return pass_index * self.tokens_per_pass + within

    def _last_row_within(self, samples: int) -> int:
        """The furthest stream position whose preceding rows hold at most ``samples`` samples (packed rows)."""
        pass_index = samples // self.samples_per_pass
        cumulative = self._pass(pass_index).cumulative_sequences
        offset = int(np.searchsorted(cumulative, samples - pass_index * self.samples_per_pass, side="right")) - 1
        return pass_index * self.num_rows + offset

    # ---- sizes ---------------------------------------------------------------------------------
    def global_batch_size(self, consumed_samples: int, consumed_tokens: int = 0) -> int:
        """The schedule's global batch size (in samples) at a clock reading, rounded down to ``round_to``."""
        clock = consumed_tokens if self.unit == "tokens" else consumed_samples
        value = self.batch_schedule(clock)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ConfigError(
                f"the batch schedule {self.batch_schedule!r} returned {value!r} at {self.unit}={clock}; it must "
                "return a positive integer (the global batch size)"
            )
        requested = int(value)
        size = self._round(requested, clock)
        if size > self.samples_per_pass:
            raise ConfigError(
                f"the batch schedule asks for a global batch of {requested} (effective {size}) at {self.unit}="
                f"{clock}, more than the {self.samples_per_pass} samples in the dataset; cap the schedule at the "
                "dataset size (Smith et al. stop growing the batch near N/10)"
            )
        return size

    def _round(self, requested: int, clock: int) -> int:
        if requested < 1:
            raise ConfigError(f"the batch schedule returned {requested}; batch sizes must be >= 1")
        try:
            size = self.rounded_schedule.round(requested, clock)
        except ConfigError as error:
            raise ConfigError(f"{error} (batch_size_multiple; world_size={self.world_size})") from None
        if size != requested:
            log = logger.debug if self._warned_rounding else logger.warning
            log(
                "RampBatchSampler: global batch size %d rounded down to %d (a multiple of %d)%s",
                requested,
                size,
                self.round_to,
                "" if self._warned_rounding else "; further roundings are logged at DEBUG level",
            )
            self._warned_rounding = True
        return size

    def _rows_for(self, row: int, size: int) -> int:
        """Rows of the step that starts at ``row`` with ``size`` samples: ``size``, or for packed rows the most whole
        rows (a multiple of ``world_size``, at least one per rank) whose sequences fit in ``size``."""
        if self.sequences is None:
            return size
        rows = self._last_row_within(self.samples_before(row) + size) - row
        rows -= rows % self.world_size
        if rows < self.world_size:
            rows = self.world_size
            if not self._warned_packed:
                logger.warning(
                    "RampBatchSampler: the scheduled batch of %d sequences is smaller than %d packed rows hold; the "
                    "step takes one row per rank",
                    size,
                    self.world_size,
                )
                self._warned_packed = True
        return rows

    def _end(self, start: int) -> float:
        return (start // self.num_rows + 1) * self.num_rows if self.epoch_mode else self.total_rows

    def _steps(self, start: int, end: float, max_steps: int | None = None) -> Iterator[tuple[int, int]]:
        """``(first_row, end_row)`` of each step from ``start``; the schedule is read when a step is asked for."""
        row, count = start, 0
        while row < end and (max_steps is None or count < max_steps):
            size = self.global_batch_size(self.samples_before(row), self.tokens_before(row))
            rows = self._rows_for(row, size)
            remaining = end - row
            if rows > remaining:
                if self.drop_last:
                    return
                rows = int(remaining - remaining % self.world_size)
                if remaining % self.world_size:
                    logger.warning(
                        "RampBatchSampler: the stream ends with %d rows, not a multiple of world_size=%d; the last %d "
                        "are dropped",
                        remaining,
                        self.world_size,
                        remaining % self.world_size,
                    )
                if rows <= 0:
                    return
            yield row, row + rows
            row += rows
            count += 1

    def plan(self, max_steps: int | None = None) -> list[int]:
        """Global batch sizes (samples) of every step from the current position to the end (or ``max_steps``).

        Exact for schedules that are pure functions of the clock; an online (adaptive) schedule is evaluated with
        its current state. Linear in the rows planned: one permutation and one cumulative sum per pass.
        """
        return [self.samples_before(last) - self.samples_before(first) for first, last in self.plan_rows(max_steps)]

    def plan_rows(self, max_steps: int | None = None) -> list[tuple[int, int]]:
        """``(first_row, end_row)`` stream positions of every step ``plan`` lists."""
        end = self._end(self.consumed_rows)
        if max_steps is None and end == math.inf:
            raise ConfigError("an endless sampler (total_rows=math.inf) can only plan a given number of steps")
        return list(self._steps(self.consumed_rows, end, max_steps))

    # ---- iteration -----------------------------------------------------------------------------
    def _stream_slice(self, start: int, size: int) -> torch.Tensor:
        """Dataset rows at stream positions ``[start, start + size)``, crossing into the next pass's permutation."""
        pieces, position = [], start
        while position < start + size:
            pass_index, offset = divmod(position, self.num_rows)
            take = min(start + size - position, self.num_rows - offset)
            pieces.append(self._pass(pass_index).order[offset : offset + take])
            position += take
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def take_drawn_step(self) -> DrawnStep | None:
        """The oldest yielded step batch not taken yet (first in, first out), or ``None``.

        A ``DataLoader`` yields batches in the order their index lists were drawn (also with worker processes and
        prefetching), so a consumer that takes one entry per step batch gets that batch's counts and position.
        """
        return self._drawn.popleft() if self._drawn else None

    def __iter__(self) -> Iterator[list[int]]:
        self._drawn.clear()
        start = self.consumed_rows
        for first, last in self._steps(start, self._end(start)):
            indices = self._stream_slice(first, last - first)
            per_rank = len(indices) // self.world_size
            if self.group_by_length:
                longest_first = np.argsort(-self.lengths[indices.numpy()], kind="stable")
                share = indices[torch.from_numpy(longest_first[self.rank :: self.world_size])]
            else:
                share = indices[self.rank * per_rank : (self.rank + 1) * per_rank]
            samples_before, tokens_before = self.samples_before(first), self.tokens_before(first)
            self.consumed_rows = last  # the state reflects what was yielded
            consumed_samples, consumed_tokens = self.samples_before(last), self.tokens_before(last)
            rows = share.numpy()
            self._drawn.append(
                DrawnStep(
                    rows=last - first,
                    samples=consumed_samples - samples_before,
                    tokens=consumed_tokens - tokens_before,
                    local_samples=len(rows) if self.sequences is None else int(self.sequences[rows].sum()),
                    local_tokens=0 if self.lengths is None else int(self.lengths[rows].sum()),
                    consumed_rows=last,
                    consumed_samples=consumed_samples,
                    consumed_tokens=consumed_tokens,
                )
            )
            yield share.tolist()

    def __len__(self) -> int:
        if not self.epoch_mode and self.total_rows == math.inf:
            raise TypeError("an endless RampBatchSampler has no length")
        return sum(1 for _ in self._steps(self.consumed_rows, self._end(self.consumed_rows)))
