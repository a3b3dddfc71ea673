"""RampBatchSampler: literal per-rank lists, coverage, determinism, resume, set_epoch, units, bad input."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import Dataset

from hf_batchsched.data import RampBatchSampler, sample_lengths
from hf_batchsched.errors import ConfigError
from hf_batchsched.schedules.batch import PiecewiseBatch


def ramp(consumed: float) -> int:
    """2 for the first 4 samples, then 4 (a global size)."""
    return 2 if consumed < 4 else 4


def both_ranks(**kwargs) -> list[list[list[int]]]:
    """Index lists of ranks 0 and 1 for the same configuration."""
    return [list(RampBatchSampler(rank=rank, world_size=2, **kwargs)) for rank in (0, 1)]


def test_literal_per_rank_lists_unshuffled():
    rank0, rank1 = both_ranks(data_source=10, batch_schedule=ramp, shuffle=False, total_rows=20)
    # global stream 0..9, 0..9; steps of 2, 2, 4, 4 (the step at position 8 straddles into pass 1), 4, 4
    assert rank0 == [[0], [2], [4, 5], [8, 9], [2, 3], [6, 7]]
    assert rank1 == [[1], [3], [6, 7], [0, 1], [4, 5], [8, 9]]


def test_straddling_step_takes_rest_from_next_pass_permutation():
    sampler = RampBatchSampler(10, 4, seed=3, total_rows=20)
    batches = list(sampler)
    assert [len(batch) for batch in batches] == [4, 4, 4, 4, 4]
    stream = [index for batch in batches for index in batch]
    first_pass, second_pass = stream[:10], stream[10:]
    assert sorted(first_pass) == sorted(second_pass) == list(range(10))
    assert first_pass == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert second_pass == torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()


@pytest.mark.parametrize("num_samples", [37, 40])
def test_every_sample_once_per_pass_across_ranks(num_samples):
    schedule = lambda consumed: 4 if consumed < 30 else 12  # noqa: E731
    per_rank = both_ranks(data_source=num_samples, batch_schedule=schedule, seed=1, total_rows=3 * num_samples)
    assert len(per_rank[0]) == len(per_rank[1])
    stream = [index for step in zip(*per_rank) for lists in step for index in lists]
    for start in range(0, len(stream), num_samples):
        seen = stream[start : start + num_samples]
        # the last pass may miss < world_size samples at the very end of the stream (logged)
        assert len(seen) == len(set(seen)) and len(seen) >= num_samples - 1
    global_sizes = [len(a) + len(b) for a, b in zip(*per_rank)]
    planned = RampBatchSampler(num_samples, schedule, world_size=2, total_rows=3 * num_samples).plan()
    assert global_sizes == planned and set(planned[:-1]) == {4, 12}


def test_deterministic_and_seed_dependent():
    kwargs = dict(data_source=20, batch_schedule=ramp, total_rows=40)
    assert list(RampBatchSampler(seed=5, **kwargs)) == list(RampBatchSampler(seed=5, **kwargs))
    assert list(RampBatchSampler(seed=5, **kwargs)) != list(RampBatchSampler(seed=6, **kwargs))


def test_resume_from_state_equals_continuation():
    full = RampBatchSampler(13, ramp, rank=1, world_size=2, seed=2, total_rows=39)
    sizes = full.plan()
    batches = list(full)
    for k in range(1, len(sizes)):
        resumed = RampBatchSampler(13, ramp, rank=1, world_size=2, seed=2, total_rows=39)
        resumed.load_state_dict(dict(full.state_dict(), consumed_rows=sum(sizes[:k]), consumed_samples=sum(sizes[:k])))
        assert resumed.state_dict()["pass_index"] == sum(sizes[:k]) // 13
        assert list(resumed) == batches[k:]


def test_state_dict_reflects_the_batches_yielded():
    """After 47 batches the state is the position after them, and a sampler loaded from it yields the rest."""
    sampler = RampBatchSampler(200, 4, seed=1, total_rows=600)
    sizes = sampler.plan()
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(47)]
    state = sampler.state_dict()
    assert state["consumed_rows"] == state["consumed_samples"] == sum(sizes[:47]) == 188
    assert (state["pass_index"], state["position"]) == (0, 188)
    rest = list(iterator)
    resumed = RampBatchSampler(200, 4, seed=1, total_rows=600)
    resumed.load_state_dict(state)
    assert list(resumed) == rest and len(first) + len(rest) == len(sizes)
    assert sampler.state_dict()["consumed_rows"] == 600  # the whole stream was yielded


def test_set_epoch_with_the_default_length_yields_that_pass():
    """DistributedSampler's loop: ``for epoch: sampler.set_epoch(epoch); for batch in loader`` covers one shuffled
    pass per epoch on every rank, with the schedule read at the pass's start on the clock."""
    samplers = [RampBatchSampler(10, ramp, rank=rank, world_size=2, seed=3) for rank in (0, 1)]
    for epoch in range(3):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        steps = 4 if epoch == 0 else 3  # 2, 2, 4, 2 in pass 0; 4, 4, 2 later (the clock is past 4 samples)
        assert len(samplers[0]) == steps
        per_rank = [list(sampler) for sampler in samplers]
        assert len(per_rank[0]) == len(per_rank[1]) == steps
        stream = [index for step in zip(*per_rank) for lists in step for index in lists]
        assert stream == torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        assert samplers[0].state_dict()["consumed_rows"] == 10 * (epoch + 1)


def test_set_epoch_starts_at_that_pass():
    sampler = RampBatchSampler(8, 8, seed=0, total_rows=24)
    passes = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == passes[2:]
    assert passes[0] != passes[1] and sorted(passes[1]) == list(range(8))


def test_lazy_schedule_read_at_iteration_time():
    sizes = {"value": 2}
    sampler = RampBatchSampler(20, lambda consumed: sizes["value"], total_rows=20)
    iterator = iter(sampler)
    assert len(next(iterator)) == 2
    sizes["value"] = 6  # an online schedule changes its mind
    assert len(next(iterator)) == 6


def test_token_clocked_schedule_uses_lengths():
    class TokenSchedule:
        unit = "tokens"

        def __call__(self, tokens):
            return 2 if tokens < 10 else 4

    lengths = [3] * 12
    sampler = RampBatchSampler(12, TokenSchedule(), lengths=lengths, shuffle=False)
    # 0 tokens -> 2 (6 tokens) -> 2 (12 tokens) -> 4 -> 4
    assert sampler.plan() == [2, 2, 4, 4]
    assert [len(b) for b in sampler] == [2, 2, 4, 4]


def test_sample_lengths_datasets_and_torch():
    from hf_batchsched.assets import synthetic_lm_dataset

    dataset = synthetic_lm_dataset(5, seq_len=8, variable_length=True, seed=1)
    expected = [len(row) for row in dataset["input_ids"]]
    assert sample_lengths(dataset).tolist() == expected
    assert sample_lengths(dataset.select([4, 0, 2])).tolist() == [expected[4], expected[0], expected[2]]
    as_list = [dataset[i] for i in range(len(dataset))]
    assert sample_lengths(as_list).tolist() == expected
    masks = [[1, 1, 0], [], [0, 1], [], [1]]  # empty rows inside and at the end
    masked = Dataset.from_dict({"input_ids": [[5] * len(m) for m in masks], "attention_mask": masks})
    assert sample_lengths(masked).tolist() == [2, 0, 1, 0, 1]


def test_rounding_is_down_and_logged(caplog):
    sampler = RampBatchSampler(64, 11, world_size=2, round_to=4, total_rows=64)
    with caplog.at_level(logging.WARNING, logger="hf_batchsched.data.sampler"):
        assert sampler.plan()[:2] == [8, 8]
    assert "rounded down to 8" in caplog.text


def test_sizes_are_never_raised_above_the_schedule():
    """The default multiple is world_size; a size below the multiple is refused rather than raised."""
    schedule = lambda consumed: 4 if consumed < 36 else (8 if consumed < 84 else 16)  # noqa: E731
    assert RampBatchSampler(128, schedule, total_rows=128).plan()[:11] == [4] * 9 + [8, 8]
    odd = RampBatchSampler(20, 5, world_size=2, total_rows=20)
    assert odd.plan() == [4] * 5  # 5 is not a multiple of 2 ranks: rounded down, never up to 6
    with pytest.raises(ConfigError, match="never raised above the schedule"):
        RampBatchSampler(64, 3, world_size=4).plan()
    with pytest.raises(ConfigError, match="never raised above the schedule"):
        RampBatchSampler(64, 3, world_size=2, round_to=4).plan()


def test_plan_draws_one_permutation_per_pass(monkeypatch):
    """Planning a token-clocked ramp over 3 passes shuffles each pass once (it redrew one per step before)."""
    calls = []
    original = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    schedule = PiecewiseBatch.parse("0:4 200:8 600:16", unit="tokens")

    def fresh():
        calls.clear()
        return RampBatchSampler(100, schedule, lengths=[3 + i % 5 for i in range(100)], total_rows=300)

    sizes = fresh().plan()
    assert len(sizes) > 20 and set(sizes[:-1]) == {4, 8, 16}
    assert len(calls) == 3
    assert len(fresh()) == len(sizes) and len(calls) == 3
    assert sum(len(batch) for batch in fresh()) == 300 and len(calls) == 3


def test_packed_rows_count_sequences():
    """Rows that pack several sequences (trl's seq_lengths column): steps take the most whole rows whose sequences
    fit in the scheduled size, and the clock counts sequences."""
    rows = {"input_ids": [[5] * (2 * i + 2) for i in range(12)], "seq_lengths": [[2] * (i + 1) for i in range(12)]}
    packed = Dataset.from_dict(rows)  # row i packs i + 1 sequences
    sampler = RampBatchSampler(packed, 8, shuffle=False, total_rows=12)
    assert sampler.sequences.tolist() == list(range(1, 13)) and sampler.samples_per_pass == 78
    # rows 0-3 hold 1+2+3+4 = 10 > 8 -> 3 rows (6); then row 3 (4) + row 4 (5) > 8 -> 1 row; ...
    assert sampler.plan_rows() == [(0, 3), (3, 4), (4, 5)] + [(i, i + 1) for i in range(5, 12)]
    assert sampler.plan() == [6, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # rows above 8 sequences go alone (logged)
    assert [len(batch) for batch in sampler] == [3] + [1] * 9
    assert sampler.state_dict()["consumed_samples"] == 78
    tokens = RampBatchSampler(packed, 8, shuffle=False, total_rows=12, lengths=sample_lengths(packed))
    next(iter(tokens))
    assert tokens.take_drawn_step().tokens == 2 + 4 + 6


def test_group_by_length_and_drop_last():
    lengths = [1 + (7 * i) % 10 for i in range(20)]
    plain = RampBatchSampler(20, 8, seed=4, lengths=lengths, world_size=2, total_rows=20)
    grouped = [RampBatchSampler(20, 8, seed=4, lengths=lengths, world_size=2, rank=r, group_by_length=True,
                                total_rows=20) for r in (0, 1)]  # fmt: skip
    other = RampBatchSampler(20, 8, seed=4, lengths=lengths, world_size=2, rank=1, total_rows=20)
    steps = 0
    for mine, rank0, rank1, theirs in zip(plain, *grouped, other):
        steps += 1
        assert sorted(rank0 + rank1) == sorted(mine + theirs)  # the same rows in every step
        interleaved = [index for pair in zip(rank0, rank1) for index in pair]
        assert [lengths[i] for i in interleaved] == sorted((lengths[i] for i in interleaved), reverse=True)
    assert steps == 3
    assert RampBatchSampler(20, 8, total_rows=20).plan() == [8, 8, 4]
    assert RampBatchSampler(20, 8, total_rows=20, drop_last=True).plan() == [8, 8]
    assert [len(b) for b in RampBatchSampler(20, 8, total_rows=20, drop_last=True)] == [8, 8]


def test_load_state_refuses_a_position_counted_with_other_lengths():
    sampler = RampBatchSampler(10, 2, lengths=[4] * 10, total_rows=10)
    sampler.load_state_dict({"consumed_rows": 4, "consumed_tokens": 16})
    assert sampler.consumed_tokens == 16
    with pytest.raises(ConfigError, match="other per-row counts"):
        sampler.load_state_dict({"consumed_rows": 4, "consumed_tokens": 12})


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(4)


def test_bad_input():
    with pytest.raises(ConfigError, match="not a multiple"):
        RampBatchSampler(64, 11, round_to=4, rounding="error").plan()
    with pytest.raises(ConfigError, match="more than the 10 samples"):
        RampBatchSampler(10, 12).plan()
    with pytest.raises(ConfigError, match="IterableDataset"):
        RampBatchSampler(Stream(), 4)
    with pytest.raises(ConfigError, match="multiple of world_size"):
        RampBatchSampler(10, 4, world_size=4, round_to=6)
    with pytest.raises(ConfigError, match="rank"):
        RampBatchSampler(10, 4, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="lengths"):
        RampBatchSampler(10, type("S", (), {"unit": "tokens", "__call__": lambda self, t: 2})())
    with pytest.raises(ConfigError, match="seed"):
        RampBatchSampler(10, 2, seed=1).load_state_dict({"consumed_samples": 2, "seed": 0})
    with pytest.raises(TypeError):
        len(RampBatchSampler(10, 2, total_rows=math.inf))
    assert RampBatchSampler(10, 2, total_rows=math.inf).plan(max_steps=7) == [2] * 7


def test_sampler_rounds_through_the_one_rounded_batch():
    from hf_batchsched.schedules import ConstantBatch, RoundedBatch

    sampler = RampBatchSampler(64, 11, world_size=2, round_to=4, total_rows=64)
    assert sampler.batch_schedule == ConstantBatch(11)  # an int is the one constant schedule
    assert isinstance(sampler.rounded_schedule, RoundedBatch) and sampler.rounded_schedule.multiple == 4
