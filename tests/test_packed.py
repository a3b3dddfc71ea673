"""Packed and padding-free batches: one flattened row of many sequences per step.

Covers transformers' block-diagonal attention from ``position_ids`` (sdpa and eager, CPU), splitting a flattened
row into micro-chunks at sequence boundaries (same loss and gradient as one forward), the clock counting sequences
(``DataCollatorWithFlattening`` and ``trl.SFTTrainer(packing=True)``, against a hand count), resume, and DDP.
"""

from __future__ import annotations

import pytest
import torch
from test_trainer_ramp import (
    RecordingCollator,
    assert_params_close,
    indexed_dataset,
    logged,
    make_args,
    params,
    ramp,
    train_losses,
)
from transformers import DataCollatorWithFlattening, PrinterCallback, TrainerCallback

from hf_batchsched.assets import tiny_llama
from hf_batchsched.batching import count_batch, packed_sequence_starts, split_micro_chunks
from hf_batchsched.errors import ConfigError
from hf_batchsched.trainer import BatchRampMixin, BatchRampTrainer

torch.set_num_threads(1)


def token_loss_sum(model, batch) -> torch.Tensor:
    """Sum of the causal LM's per-token cross-entropy over the batch's shifted labels."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


def sequences(num: int = 7, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (int(torch.randint(2, 9, (1,), generator=generator)),), generator=generator).tolist()
            for _ in range(num)]  # fmt: skip


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_flattened_row_attends_within_each_sequence(attn):
    """transformers builds the block-diagonal mask from position_ids (no attention_mask, no cache): a flattened
    row gives each sequence's logits alone. Tolerance 1e-5: only the masked-out products differ (fp32)."""
    model = tiny_llama(seed=0, attn_implementation=attn)
    rows = sequences()
    flat = DataCollatorWithFlattening()([{"input_ids": row, "labels": row} for row in rows])
    together = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False).logits
    alone = torch.cat([model(input_ids=torch.tensor([row]), use_cache=False).logits for row in rows], dim=1)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_chunks_of_a_flattened_row_give_the_loss_and_gradient_of_one_forward(attn):
    """Cut at sequence boundaries into chunks of <= 2 sequences: the summed loss and the gradient equal one forward
    of the whole row (fp32 rtol/atol 1e-5: only the summation order changes)."""
    model = tiny_llama(seed=0, attn_implementation=attn)
    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(
        [{"input_ids": row, "labels": row} for row in sequences()]
    )
    chunks = split_micro_chunks(flat, 2)
    assert [count_batch(chunk)[0] for chunk in chunks] == [2, 2, 2, 1]
    assert sum(chunk["input_ids"].shape[1] for chunk in chunks) == flat["input_ids"].shape[1]
    for chunk in chunks:  # each chunk describes its own sequences
        starts = packed_sequence_starts(chunk)
        starts = torch.tensor([0]) if starts is None else starts
        assert chunk["position_ids"][0, starts].eq(0).all() and chunk["seq_idx"][0, 0] == 0
        assert chunk["cu_seq_lens_q"].tolist() == starts.tolist() + [chunk["input_ids"].shape[1]]
        assert chunk["max_length_q"] == int(chunk["cu_seq_lens_q"].diff().max())
    keep = ("input_ids", "labels", "position_ids")
    whole = token_loss_sum(model, {k: flat[k] for k in keep})
    whole.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    pieces = sum(token_loss_sum(model, {k: chunk[k] for k in keep}) for chunk in chunks)
    pieces.backward()
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, reference[name], rtol=1e-5, atol=1e-5, msg=name)


def test_packed_layouts_that_cannot_be_split_exactly_are_refused():
    ids = torch.arange(6)[None]
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(ConfigError, match="attend across them"):
        packed_sequence_starts({"input_ids": ids, "position_ids": positions, "attention_mask": torch.ones(1, 6)})
    with pytest.raises(ConfigError, match="2 rows"):
        packed_sequence_starts({"input_ids": ids.repeat(2, 1), "position_ids": positions.repeat(2, 1)})
    labelled = {"input_ids": ids, "position_ids": positions, "labels": ids}  # no -100 at the sequence start
    with pytest.raises(ConfigError, match="label the first token of every sequence -100"):
        split_micro_chunks(labelled, 1)
    assert len(split_micro_chunks({**labelled, "shift_labels": ids}, 1)) == 2  # shift_labels are cut exactly
    generation_style = torch.tensor([[1, 1, 0, 1, 2, 3]])  # left padding, positions from the mask: not packed
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert packed_sequence_starts({"input_ids": ids, "position_ids": generation_style, "attention_mask": mask}) is None


# ---- the trainer on padding-free batches -------------------------------------------------------------------------
class RecordingFlattening(DataCollatorWithFlattening):
    """transformers' padding-free collator that records the dataset indices of every step batch."""

    def __init__(self):
        super().__init__()
        self.batches: list[list[int]] = []

    def __call__(self, features, return_tensors=None, separator_id=None):
        self.batches.append([f["input_ids"][0] - 3 for f in features])
        return super().__call__(features, return_tensors, separator_id)


def flattening_trainer(tmp_path, collator=None, **kwargs) -> BatchRampTrainer:
    arg_overrides = {"per_device_train_batch_size": 2, **kwargs.pop("arg_overrides", {})}
    trainer = BatchRampTrainer(
        model=tiny_llama(seed=0, attn_implementation="sdpa"),
        args=make_args(tmp_path, **arg_overrides),
        train_dataset=kwargs.pop("dataset", None) or indexed_dataset(),
        data_collator=collator or RecordingFlattening(),
        **kwargs,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


class ChunkShapes(TrainerCallback):
    """Micro-chunk listener: the sequences of every micro-chunk."""

    def __init__(self):
        self.chunks: list[tuple[int, int]] = []

    def on_micro_chunk_end(self, trainer, chunk_index, num_chunks, chunk_num_samples):
        self.chunks.append((chunk_index, chunk_num_samples))


def test_padding_free_counts_sequences_and_trains_like_padded_batches(tmp_path):
    """DataCollatorWithFlattening: the clock counts the step's sequences (one flattened row), the ramp follows the
    schedule, chunks hold <= max_micro_batch_size sequences, an LR warmup on samples ends, and the run equals the
    same ramp on right-padded batches (fp32 rtol 1e-5 / atol 1e-6: padding masks and the block-diagonal mask
    only differ in masked-out products)."""
    lr_policy = {"name": "warmup", "unit": "samples", "warmup": 16, "policy": "constant"}
    flat = flattening_trainer(tmp_path / "flat", batch_schedule=ramp, max_micro_batch_size=2, lr_policy=lr_policy,
                              arg_overrides={"num_train_epochs": 2})  # fmt: skip
    flat.add_callback(shapes := ChunkShapes())
    flat.train()
    padded = flattening_trainer(
        tmp_path / "padded",
        collator=RecordingCollator(),
        batch_schedule=ramp,
        max_micro_batch_size=16,
        lr_policy=lr_policy,
        arg_overrides={"num_train_epochs": 2},
    )
    padded.train()  # fmt: skip
    hand = [len(batch) for batch in flat.data_collator.batches]  # sequences per step, counted by hand
    assert hand == [4, 4, 8, 8, 16, 16, 8]
    assert list(logged(flat, "batchsched/batch_size").values()) == hand
    assert list(logged(flat, "batchsched/samples_seen").values()) == [sum(hand[: k + 1]) for k in range(len(hand))]
    assert flat.clock.consumed_samples == 64 and flat.state.epoch == pytest.approx(2.0)
    tokens = sum(len(flat.train_dataset[i]["input_ids"]) for batch in flat.data_collator.batches for i in batch)
    assert flat.clock.consumed_tokens == tokens
    assert list(logged(flat, "batchsched/micro_chunks").values()) == [2, 2, 4, 4, 8, 8, 4]
    assert max(samples for _, samples in shapes.chunks) == 2
    lrs = list(logged(flat, "learning_rate").values())
    assert lrs[3:] == [pytest.approx(1e-3)] * (len(lrs) - 3)  # warmup over 16 sequences: done after step 3
    assert flat.data_collator.batches == padded.data_collator.batches
    assert train_losses(flat) == pytest.approx(train_losses(padded), rel=1e-5)
    assert_params_close(params(flat), params(padded), rtol=1e-5, atol=1e-6)


def test_padding_free_resume_is_bit_exact(tmp_path):
    overrides = {"num_train_epochs": 2, "save_strategy": "steps", "save_steps": 3}
    full = flattening_trainer(tmp_path / "full", batch_schedule=ramp, max_micro_batch_size=2, arg_overrides=overrides)
    full.train()
    resumed = flattening_trainer(tmp_path / "resumed", batch_schedule=ramp, max_micro_batch_size=2,
                                 arg_overrides=overrides)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.data_collator.batches == full.data_collator.batches[3:]
    # same state, same data, same computation in one process: identical bits
    assert {s: v for s, v in train_losses(resumed).items() if s > 3} == {
        s: v for s, v in train_losses(full).items() if s > 3
    }
    for name, value in params(full).items():
        assert torch.equal(params(resumed)[name], value), name
    assert resumed.clock.state_dict() == full.clock.state_dict()


# ---- trl ---------------------------------------------------------------------------------------------------------
def trl_packing_trainer(tmp_path, **kwargs):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    class RampSFTTrainer(BatchRampMixin, SFTTrainer):
        pass

    vocab = {f"t{i}": i for i in range(128)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")), pad_token="t0", bos_token="t1",
        eos_token="t2",
    )  # fmt: skip
    config = SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=kwargs.pop("epochs", 1),
        report_to="none", use_cpu=True, logging_steps=1, disable_tqdm=True, max_length=16, packing=True,
        dataloader_pin_memory=False, learning_rate=1e-3, seed=0, **kwargs.pop("config", {}),
    )  # fmt: skip
    trainer = RampSFTTrainer(
        model=tiny_llama(seed=0, attn_implementation="sdpa"),
        args=config,
        train_dataset=indexed_dataset(32).remove_columns(["labels", "attention_mask"]),
        processing_class=tokenizer,
        **kwargs,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def test_trl_packing_counts_sequences(tmp_path):
    """SFTTrainer(packing=True): 32 sequences packed into rows of <= 16 tokens (bfd). The clock counts sequences
    (hand count from the packed rows' seq_lengths), a step takes the whole rows that fit the scheduled size, and the
    chunks hold <= 2 sequences; an LR warmup over 16 samples ends."""
    schedule = lambda consumed: 4 if consumed < 8 else 8  # noqa: E731
    trainer = trl_packing_trainer(
        tmp_path,
        batch_schedule=schedule,
        max_micro_batch_size=2,
        lr_policy={"name": "warmup", "unit": "samples", "warmup": 16, "policy": "constant"},
    )
    drawn = []  # fmt: skip
    collate = trainer.data_collator
    trainer.data_collator = lambda features: (
        drawn.append([len(f["seq_lengths"]) for f in features]) or collate(features)
    )
    trainer.add_callback(shapes := ChunkShapes())
    trainer.train()
    packed = trainer.train_dataset
    per_row = [len(lengths) for lengths in packed["seq_lengths"]]
    assert sum(per_row) == 32 and len(packed) < 32  # every sequence is in exactly one packed row
    sizes = list(logged(trainer, "batchsched/batch_size").values())
    assert sizes == [sum(rows) for rows in drawn]  # the clock counts the sequences of the rows drawn
    assert trainer.clock.consumed_samples == sum(sizes) == 32
    for size, rows, start in zip(sizes, drawn, [0] + list(logged(trainer, "batchsched/samples_seen").values())):
        scheduled = schedule(start)
        assert size <= scheduled or len(rows) == 1  # whole rows that fit; a lone row may exceed it
    assert max(samples for _, samples in shapes.chunks) <= 2
    assert trainer.clock.consumed_tokens == sum(len(ids) for ids in packed["input_ids"])
    lrs = list(logged(trainer, "learning_rate").values())
    reached = next(k for k, seen in enumerate(logged(trainer, "batchsched/samples_seen").values()) if seen >= 16)
    assert lrs[reached + 1 :] == [pytest.approx(1e-3)] * (len(lrs) - reached - 1)


def test_trl_packing_resume_is_bit_exact(tmp_path):
    kwargs = dict(batch_schedule=lambda consumed: 4 if consumed < 8 else 8, max_micro_batch_size=2, epochs=2,
                  config={"save_strategy": "steps", "save_steps": 2})  # fmt: skip
    full = trl_packing_trainer(tmp_path / "full", **kwargs)
    full.train()
    resumed = trl_packing_trainer(tmp_path / "resumed", **kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert {s: v for s, v in train_losses(resumed).items() if s > 2} == {
        s: v for s, v in train_losses(full).items() if s > 2
    }
    for name, value in params(full).items():
        assert torch.equal(params(resumed)[name], value), name
    assert resumed.clock.state_dict() == full.clock.state_dict() and full.clock.consumed_samples == 64


@pytest.mark.distributed
def test_ddp_padding_free_matches_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): the same global step batches, sequences counted over both ranks, and the
    parameters of one process running the same ramp (fp32 rtol 1e-5 / atol 1e-6: DDP only adds an average)."""
    from conftest import run_torchrun

    ranks = run_torchrun("tests/ddp_packed_worker.py", tmp_path / "ddp")
    single = flattening_trainer(tmp_path / "single", batch_schedule=ramp, max_micro_batch_size=2,
                                arg_overrides={"num_train_epochs": 2})  # fmt: skip
    single.train()
    expected = [len(batch) for batch in single.data_collator.batches]
    for record in ranks:
        assert record["world_size"] == 2
        assert list(record["batch_sizes"].values()) == expected
        assert record["clock"]["consumed_samples"] == single.clock.consumed_samples == 64
        assert record["clock"]["consumed_tokens"] == single.clock.consumed_tokens
    merged = [a + b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"])]
    assert [sorted(step) for step in merged] == [sorted(step) for step in single.data_collator.batches]
    assert list(ranks[0]["losses"].values()) == pytest.approx(list(train_losses(single).values()), rel=1e-5)
    ddp_params = torch.load(tmp_path / "ddp" / "params.pt")
    assert_params_close(ddp_params, params(single), rtol=1e-5, atol=1e-6)
