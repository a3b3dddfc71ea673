"""BatchRampTrainer / BatchRampMixin driving a real ``Trainer.train`` on a tiny Llama (CPU, report_to="none")."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from helpers import tiny_training_args
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from hf_batchsched.assets import digits_image_dataset, tiny_llama, tiny_resnet
from hf_batchsched.batching import count_batch, split_micro_chunks
from hf_batchsched.data import RampBatchSampler
from hf_batchsched.errors import ConfigError
from hf_batchsched.schedules.lr import lr_at
from hf_batchsched.schedules.lr_config import make_lr_policy
from hf_batchsched.schedules.scheduler import PolicyLRScheduler
from hf_batchsched.schedules.smith import sgd_noise
from hf_batchsched.trainer import BatchRampMixin, BatchRampTrainer
from hf_batchsched.transforms import freeze_bn

torch.set_num_threads(1)


def indexed_dataset(num_samples: int = 32, seq_len: int = 8, variable_length: bool = True, seed: int = 0) -> Dataset:
    """LM rows whose first token is ``3 + row index`` (so batches can be traced back to indices)."""
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for index in range(num_samples):
        length = (
            int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=generator)) if variable_length else seq_len
        )
        ids = [3 + index] + [3 + (index * 7 + j) % 120 for j in range(1, length)]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(list(ids))
    return Dataset.from_dict(rows)


class RecordingCollator:
    """Right-pads (pad 0, label -100) and records the dataset indices of every collated batch."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __call__(self, features):
        width = max(len(f["input_ids"]) for f in features)
        self.batches.append([f["input_ids"][0] - 3 for f in features])

        def pad(key, value):
            return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features])

        return {
            "input_ids": pad("input_ids", 0),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100),
        }


def make_args(tmp_path, **overrides) -> TrainingArguments:
    defaults = {"per_device_train_batch_size": 8, "dataloader_pin_memory": False}
    return tiny_training_args(tmp_path, **{**defaults, **overrides})


def make_trainer(tmp_path, cls=BatchRampTrainer, dataset=None, **kwargs):
    args = kwargs.pop("args", None) or make_args(tmp_path, **kwargs.pop("arg_overrides", {}))
    trainer = cls(
        model=tiny_llama(seed=0),
        args=args,
        train_dataset=dataset if dataset is not None else indexed_dataset(),
        data_collator=RecordingCollator(),
        **kwargs,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def train_losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def logged(trainer, key) -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in trainer.state.log_history if key in entry}


def params(trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.model.named_parameters()}


def assert_params_close(a, b, rtol, atol):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def ramp(consumed: float) -> int:
    return 4 if consumed < 8 else (8 if consumed < 24 else 16)


# ---- invariants --------------------------------------------------------------------------------------------------
class StreamOrderSampler(torch.utils.data.Sampler):
    """The order RampBatchSampler reads a pass in (pass p shuffled with seed + p), as a plain sampler."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        yield from torch.randperm(
            self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()

    def __len__(self):
        return self.num_samples


class PlainTrainerSameOrder(Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return StreamOrderSampler(len(self.train_dataset), self.args.seed)


def test_constant_schedule_reproduces_plain_trainer(tmp_path):
    """Same data order, one chunk per step: losses and parameters match a plain Trainer (fp32, same ops)."""
    plain = make_trainer(tmp_path / "plain", cls=PlainTrainerSameOrder, arg_overrides={"num_train_epochs": 2})
    plain.train()
    ours = make_trainer(tmp_path / "ours", arg_overrides={"num_train_epochs": 2})
    ours.train()
    assert plain.data_collator.batches == ours.data_collator.batches  # identical samples per step
    assert len(train_losses(ours)) == 8 == ours.state.global_step
    # identical batches and kernels: only reduction order could differ; 1e-6 relative is far below one step's change
    assert train_losses(ours) == pytest.approx(train_losses(plain), rel=1e-6)
    assert_params_close(params(ours), params(plain), rtol=1e-6, atol=1e-7)
    assert ours.state.epoch == pytest.approx(2.0)


def test_k_chunks_equal_one_chunk(tmp_path):
    """A ramp run with 4-sample chunks gives the parameters of the same run with whole-step chunks.

    Tolerance: fp32 rtol 1e-5 / atol 1e-6 -- chunking only changes the summation order of per-token losses and
    gradients (relative error ~1e-7 per step), far below the ~1e-3 parameter change per step at lr 1e-3.
    """
    one = make_trainer(
        tmp_path / "one",
        batch_schedule=ramp,
        max_micro_batch_size=16,
        batch_size_multiple=4,
        arg_overrides={"num_train_epochs": 2},
    )
    one.train()
    many = make_trainer(
        tmp_path / "many", batch_schedule=ramp, max_micro_batch_size=4, arg_overrides={"num_train_epochs": 2}
    )
    many.train()
    assert logged(one, "batchsched/batch_size") == logged(many, "batchsched/batch_size")
    assert set(logged(many, "batchsched/micro_chunks").values()) == {1, 2, 4}
    assert set(logged(one, "batchsched/micro_chunks").values()) == {1}
    assert train_losses(many) == pytest.approx(train_losses(one), rel=1e-5)
    assert_params_close(params(many), params(one), rtol=1e-5, atol=1e-6)
    moved = max((params(many)[n] - tiny_llama(seed=0).state_dict()[n]).abs().max() for n in params(many))
    assert moved > 1e-3  # the comparison is not vacuous


def test_ramp_follows_schedule_and_counts_passes(tmp_path):
    trainer = make_trainer(
        tmp_path, batch_schedule=ramp, arg_overrides={"num_train_epochs": 2, "per_device_train_batch_size": 4}
    )
    trainer.train()
    expected = RampBatchSampler(32, ramp, round_to=4, total_rows=64).plan()
    assert expected == [4, 4, 8, 8, 16, 16, 8]
    assert list(logged(trainer, "batchsched/batch_size").values()) == expected
    assert [len(batch) for batch in trainer.data_collator.batches] == expected
    assert trainer.state.global_step == trainer.state.max_steps == len(expected)
    samples = logged(trainer, "batchsched/samples_seen")
    assert list(samples.values()) == [sum(expected[: k + 1]) for k in range(len(expected))]
    epochs = logged(trainer, "epoch")
    assert [epochs[step] for step in samples] == pytest.approx([s / 32 for s in samples.values()])
    tokens = sum(
        sum(trainer.train_dataset[i]["attention_mask"]) for batch in trainer.data_collator.batches for i in batch
    )
    assert trainer.clock.consumed_tokens == tokens == max(logged(trainer, "batchsched/tokens_seen").values())
    seen = [i for batch in trainer.data_collator.batches for i in batch]
    assert sorted(seen[:32]) == sorted(seen[32:]) == list(range(32))


def test_torch_map_dataset(tmp_path):
    class ListDataset(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, index):
            return self.rows[index]

    rows = [indexed_dataset(16)[i] for i in range(16)]
    trainer = make_trainer(tmp_path, dataset=ListDataset(rows), batch_schedule=ramp, max_micro_batch_size=4)
    trainer.train()
    assert list(logged(trainer, "batchsched/batch_size").values()) == [4, 4, 8]
    assert sorted(i for batch in trainer.data_collator.batches for i in batch) == list(range(16))


def test_token_clocked_schedule_and_config_string(tmp_path):
    from hf_batchsched.schedules.batch import PiecewiseBatch

    schedule = PiecewiseBatch.parse("0:4 60:8", unit="tokens")
    trainer = make_trainer(tmp_path, batch_schedule=schedule, arg_overrides={"per_device_train_batch_size": 4})
    trainer.train()
    lengths = [sum(mask) for mask in trainer.train_dataset["attention_mask"]]
    expected = RampBatchSampler(32, schedule, round_to=4, lengths=lengths).plan()
    assert list(logged(trainer, "batchsched/batch_size").values()) == expected
    assert expected[0] == 4 and 8 in expected
    tokens = list(logged(trainer, "batchsched/tokens_seen").values())
    # each size is read at the tokens consumed before the step (the last step is cut at the end of the pass)
    assert all(size == (4 if before < 60 else 8) for size, before in zip(expected[:-1], [0] + tokens[:-2]))
    assert trainer.clock.total_tokens == sum(lengths)
    from_string = make_trainer(tmp_path, batch_schedule="0:8 16:16")
    assert from_string.batch_schedule(16) == 16


def test_metrics_and_micro_chunk_events(tmp_path):
    class Recorder(TrainerCallback):
        def __init__(self):
            self.chunks, self.steps = [], []

        def on_micro_chunk_end(self, trainer, chunk_index, num_chunks, chunk_num_samples):
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            self.chunks.append((chunk_index, num_chunks, chunk_num_samples, len(grads) > 0))

        def on_step_batch_end(self, trainer, step_num_samples):
            self.steps.append(step_num_samples)

    trainer = make_trainer(tmp_path, batch_schedule=ramp, max_micro_batch_size=4)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    assert recorder.steps == [4, 4, 8, 8, 8]  # the last step is cut at the end of the single pass
    assert recorder.chunks[:4] == [(0, 1, 4, True), (0, 1, 4, True), (0, 2, 4, True), (1, 2, 4, True)]
    last = trainer.state.log_history[-2]
    assert last["batchsched/batch_size"] == 8 and last["batchsched/micro_chunks"] == 2
    assert last["batchsched/sgd_noise"] == pytest.approx(sgd_noise(last["learning_rate"], 32, 8, momentum=0.9))


def test_epoch_strategies_fire_at_pass_boundaries(tmp_path):
    """Constant 16 on 24 samples: steps straddle passes; eval/save once per pass, at the step crossing it."""
    args = make_args(tmp_path, num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch", logging_steps=100)
    trainer = make_trainer(
        tmp_path, args=args, dataset=indexed_dataset(24), batch_schedule=16, eval_dataset=indexed_dataset(8, seed=1)
    )
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    # samples after each step: 16, 32, 48, 64, 72 -> passes completed at steps 2, 3 and 5
    assert [entry["step"] for entry in evals] == [2, 3, 5]
    assert [entry["epoch"] for entry in evals] == pytest.approx([32 / 24, 2.0, 3.0])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3", "checkpoint-5"]


def test_dataloader_workers(tmp_path):
    """Index lists come from the main process, collation from a worker: sizes still follow the schedule."""
    overrides = {"dataloader_num_workers": 1, "per_device_train_batch_size": 4}
    trainer = make_trainer(tmp_path, batch_schedule=ramp, arg_overrides=overrides)
    trainer.train()
    assert list(logged(trainer, "batchsched/batch_size").values()) == [4, 4, 8, 8, 8]


def test_max_steps_caps(tmp_path):
    trainer = make_trainer(
        tmp_path,
        batch_schedule=ramp,
        arg_overrides={"max_steps": 3, "num_train_epochs": 5, "per_device_train_batch_size": 4},
    )
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.clock.consumed_samples == 16


# ---- resume ------------------------------------------------------------------------------------------------------
def test_resume_mid_ramp_reproduces_uninterrupted_run(tmp_path):
    overrides = {"num_train_epochs": 2, "save_strategy": "steps", "save_steps": 3, "per_device_train_batch_size": 4}
    full = make_trainer(tmp_path / "full", batch_schedule=ramp, arg_overrides=overrides)
    full.train()
    resumed = make_trainer(tmp_path / "resumed", batch_schedule=ramp, arg_overrides=overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.data_collator.batches == full.data_collator.batches[3:]  # same samples, same sizes
    assert logged(resumed, "batchsched/batch_size") == logged(full, "batchsched/batch_size")
    later = {step: loss for step, loss in train_losses(full).items() if step > 3}
    # same checkpointed state and data: only reload round-off; 1e-6 relative
    assert {s: v for s, v in train_losses(resumed).items() if s > 3} == pytest.approx(later, rel=1e-6)
    assert_params_close(params(resumed), params(full), rtol=1e-6, atol=1e-7)
    assert resumed.clock.state_dict() == full.clock.state_dict()


def test_resume_from_foreign_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()  # what a plain Trainer saves: a trainer_state.json without the ramp state
    (tmp_path / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1, "stateful_callbacks": {}}')
    trainer = make_trainer(tmp_path, batch_schedule=ramp)
    with pytest.raises(ConfigError, match="not saved by a BatchRampTrainer"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


# ---- LR on the sample clock --------------------------------------------------------------------------------------
def test_policy_lr_scheduler_follows_pure_function_on_samples(tmp_path):
    policy = make_lr_policy("linear_decay", total=64, end_factor=0.1, unit="samples")

    class LRRecorder(TrainerCallback):
        def __init__(self, trainer):
            self.trainer, self.seen = trainer, []

        def on_step_begin(self, args, state, control, **kwargs):
            lrs = [group["lr"] for group in self.trainer.optimizer.param_groups]
            self.seen.append((self.trainer.clock.consumed_samples, lrs))

    trainer = make_trainer(
        tmp_path,
        batch_schedule=ramp,
        lr_policy=policy,
        arg_overrides={"num_train_epochs": 2, "per_device_train_batch_size": 4},
    )
    recorder = LRRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    assert isinstance(trainer.lr_scheduler, PolicyLRScheduler)
    assert [samples for samples, _ in recorder.seen] == [0, 4, 8, 16, 24, 40, 56]
    for samples, lrs in recorder.seen:
        assert lrs == pytest.approx([lr_at(policy, samples, 1e-3)] * len(lrs), rel=1e-12)
    state = trainer.lr_scheduler.state_dict()
    restored = PolicyLRScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), policy, trainer.clock)
    restored.load_state_dict(state)
    assert restored.get_last_lr() == trainer.lr_scheduler.get_last_lr()
    assert restored.get_lr() == trainer.lr_scheduler.get_lr()


def test_lr_policy_from_config(tmp_path):
    trainer = make_trainer(tmp_path, lr_policy={"name": "linear_decay", "total": 32, "unit": "samples"})
    assert trainer.lr_policy.unit == "samples"


# ---- trl -------------------------------------------------------------------------------------------------------
def test_mixin_with_trl_sft_trainer(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    class RampSFTTrainer(BatchRampMixin, SFTTrainer):
        pass

    vocab = {f"t{i}": i for i in range(128)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
        pad_token="t0",
        bos_token="t1",
        eos_token="t2",
    )
    dataset = indexed_dataset(16).remove_columns(["labels", "attention_mask"])
    config = SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        num_train_epochs=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        max_length=16,
    )
    trainer = RampSFTTrainer(
        model=tiny_llama(seed=0),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        batch_schedule=lambda consumed: 2 if consumed < 4 else 4,
        max_micro_batch_size=2,
    )
    trainer.train()
    assert list(logged(trainer, "batchsched/batch_size").values()) == [2, 2, 4, 4, 4]
    assert trainer.clock.consumed_samples == 16
    assert all("mean_token_accuracy" in e for e in trainer.state.log_history if "loss" in e)  # trl's log still runs


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2 cannot be combined"):
        make_trainer(tmp_path, batch_schedule=ramp, arg_overrides={"gradient_accumulation_steps": 2})

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ()

    with pytest.raises(ConfigError, match="IterableDataset"):
        make_trainer(tmp_path, dataset=Stream(), arg_overrides={"max_steps": 2})
    with pytest.raises(ConfigError, match="more than the 32 samples"):
        make_trainer(tmp_path, batch_schedule=64).train()
    with pytest.raises(ConfigError, match="not a multiple"):
        make_trainer(tmp_path, batch_schedule=12, batch_size_multiple=8, rounding="error").train()
    with pytest.raises(ConfigError, match="never raised above the schedule"):
        make_trainer(tmp_path, batch_schedule=4, batch_size_multiple=8).train()
    with pytest.raises(ConfigError, match="batch_rebalance"):
        make_trainer(tmp_path, arg_overrides={"train_sampling_strategy": "batch_rebalance"})
    with pytest.raises(ConfigError, match="max_micro_batch_size must be a positive integer, got -1; leave it None"):
        make_trainer(tmp_path, max_micro_batch_size=-1)
    with pytest.raises(ConfigError, match="batch schedule"):
        make_trainer(tmp_path, batch_schedule="big")
    with pytest.raises(ConfigError, match="batch_schedule must be"):
        make_trainer(tmp_path, batch_schedule=[4, 8])


def test_gradient_accumulation_without_schedule_matches_plain_trainer(tmp_path, caplog):
    """No schedule + gradient_accumulation_steps=2: chunks of the constant batch, same run as a plain Trainer."""
    overrides = {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4}
    plain = make_trainer(tmp_path / "plain", cls=PlainTrainerSameOrder, arg_overrides=overrides)
    plain.train()
    with caplog.at_level("WARNING", logger="hf_batchsched.trainer"):
        trainer = make_trainer(tmp_path / "ours", arg_overrides=overrides)
    assert "realised as micro-chunks" in caplog.text
    assert trainer.args.gradient_accumulation_steps == 1 and trainer.accelerator.gradient_accumulation_steps == 1
    trainer.train()
    assert list(logged(trainer, "batchsched/batch_size").values()) == [8] * 4
    assert list(logged(trainer, "batchsched/micro_chunks").values()) == [2] * 4
    # same samples per optimizer step, same token-level normalisation; only summation order may differ (1e-5)
    assert train_losses(trainer) == pytest.approx(train_losses(plain), rel=1e-5)
    assert_params_close(params(trainer), params(plain), rtol=1e-5, atol=1e-6)


def test_per_sample_normalisation_k_chunks_equal_one_chunk(tmp_path):
    """Without num_items_in_batch (model_accepts_loss_kwargs=False) each chunk's mean loss is weighted by its size.

    Fixed-length rows, so per-sample and per-token means coincide and one chunk of B is the reference.
    """
    runs = {}
    for micro in (16, 4):
        trainer = make_trainer(
            tmp_path / str(micro), dataset=indexed_dataset(variable_length=False), batch_schedule=ramp,
            max_micro_batch_size=micro, batch_size_multiple=4,
        )  # fmt: skip
        trainer.model_accepts_loss_kwargs = False
        trainer.train()
        runs[micro] = trainer
    assert set(logged(runs[4], "batchsched/micro_chunks").values()) == {1, 2}
    assert train_losses(runs[4]) == pytest.approx(train_losses(runs[16]), rel=1e-5)
    assert_params_close(params(runs[4]), params(runs[16]), rtol=1e-5, atol=1e-6)


# ---- other modalities --------------------------------------------------------------------------------------------
class StepGradients(TrainerCallback):
    """Micro-chunk event listener: a copy of every gradient at the end of each step batch (after the last chunk's
    backward)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_step_batch_end(self, trainer, step_num_samples):
        self.steps.append(
            {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        )


def image_ramp_trainer(tmp_path, max_micro_batch_size: int, **kwargs) -> BatchRampTrainer:
    """Tiny ResNet on 48 digits images ({"pixel_values", "labels"}: no attention_mask, no input_ids), BN frozen.

    BatchNorm in training mode normalises each micro-chunk by its own statistics (ghost BN), so chunking would
    change the maths; with the BN layers frozen every example is processed independently. Plain SGD, so a wrongly
    scaled loss shows up in the update (Adam would normalise it away).
    """
    model = tiny_resnet(seed=0)
    assert freeze_bn(model) == 6
    args = make_args(tmp_path, per_device_train_batch_size=4, optim="sgd", learning_rate=0.1, seed=0)
    trainer = BatchRampTrainer(
        model=model,
        args=args,
        train_dataset=digits_image_dataset(48),
        batch_schedule=ramp,
        max_micro_batch_size=max_micro_batch_size,
        **kwargs,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def test_image_batches_k_chunks_equal_one_chunk(tmp_path):
    """An image classifier ramps like an LM: samples from the batch dimension, no tokens, chunks == one chunk.

    Tolerance: fp32 rtol 1e-5 / atol 1e-6 on gradients and parameters -- chunking only changes the summation order
    (relative error ~1e-7), while a wrong loss normalisation (k chunk means summed) would be off by a factor 2-4.
    """
    runs = {}
    for micro in (16, 4):
        trainer = image_ramp_trainer(tmp_path / str(micro), micro, batch_size_multiple=4)
        trainer.add_callback(grads := StepGradients())
        trainer.train()
        runs[micro] = (trainer, grads)
    (one, one_grads), (many, many_grads) = runs[16], runs[4]
    expected_sizes = [4, 4, 8, 8, 16, 8]  # ramp() on 48 samples; the last step takes the 8 that remain
    for trainer in (one, many):
        assert list(logged(trainer, "batchsched/batch_size").values()) == expected_sizes
        assert list(logged(trainer, "batchsched/samples_seen").values()) == [4, 8, 16, 24, 40, 48]
        assert trainer.clock.consumed_samples == 48 and trainer.clock.consumed_tokens == 0
        assert not logged(trainer, "batchsched/tokens_seen")  # no tokens in image batches: not logged as 0
    assert list(logged(many, "batchsched/micro_chunks").values()) == [1, 1, 2, 2, 4, 2]
    assert set(logged(one, "batchsched/micro_chunks").values()) == {1}
    assert len(one_grads.steps) == len(many_grads.steps) == 6
    for step_one, step_many in zip(one_grads.steps, many_grads.steps):
        assert_params_close(step_many, step_one, rtol=1e-5, atol=1e-6)
    assert train_losses(many) == pytest.approx(train_losses(one), rel=1e-5)
    assert max(train_losses(many).values()) < 4  # mean cross-entropy over 10 classes, not a sum of chunk means
    assert_params_close(params(many), params(one), rtol=1e-5, atol=1e-6)
    initial = tiny_resnet(seed=0).state_dict()
    assert max((params(many)[n] - initial[n]).abs().max() for n in params(many)) > 1e-3  # not vacuous


def test_count_batch_and_token_policies_need_tokens(tmp_path):
    assert count_batch({"labels": torch.arange(3), "pixel_values": torch.zeros(3, 1, 8, 8)}) == (3, 0)
    assert count_batch({"input_ids": torch.ones(2, 5, dtype=torch.long)}) == (2, 10)
    with pytest.raises(ConfigError, match="no tensor"):
        count_batch({"text": ["a", "b"]})
    trainer = image_ramp_trainer(tmp_path, 4, lr_policy={"name": "cosine", "total": 100, "unit": "tokens"})
    with pytest.raises(ConfigError, match="counts tokens, but the training batches have no attention_mask"):
        trainer.train()


def test_chunks_trim_padding_but_keep_every_label():
    """Columns with no real token and no label to predict are cut per chunk: trailing ones always, leading ones on
    request, keeping the pad column before a row's first labelled token so a causal LM's shifted loss sees the same
    label tokens in the chunks as in the whole batch."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 0], [0, 0, 8, 9, 0, 0], [3, 4, 5, 6, 7, 8], [0, 9, 9, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def shifted_label_tokens(tensor):
        return int(tensor[:, 1:].ne(-100).sum())

    trailing = split_micro_chunks(batch, 2)
    assert [chunk["input_ids"].shape for chunk in trailing] == [(2, 5), (2, 6)]
    both = split_micro_chunks(batch, 2, trim_leading=True)
    assert both[0]["input_ids"].tolist() == [[0, 5, 6, 7], [0, 8, 9, 0]]  # one pad column kept before 5 and 8
    assert both[1]["input_ids"].shape == (2, 6)
    unshifted = split_micro_chunks(batch, 2, trim_leading=True, labels_shifted=False)
    assert unshifted[0]["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    for chunks in (trailing, both):
        assert sum(shifted_label_tokens(chunk["labels"]) for chunk in chunks) == shifted_label_tokens(labels)
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0], [3, 4, 5, 6]])
    unmasked_pads = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": ids}  # labelled padding
    assert split_micro_chunks(unmasked_pads, 2)[0]["input_ids"].tolist() == [[5, 6, 0], [7, 0, 0]]  # col 2 predicts


# ---- micro-batch, sampling options, the token clock ----------------------------------------------------------
def test_micro_batch_above_the_schedule_never_raises_the_batch(tmp_path):
    """max_micro_batch_size is a memory bound only: a step smaller than it runs as one chunk of its own size."""
    trainer = make_trainer(tmp_path, dataset=indexed_dataset(120), batch_schedule="0:4 36:8 84:16",
                           max_micro_batch_size=16)  # fmt: skip
    trainer.train()
    assert list(logged(trainer, "batchsched/batch_size").values()) == [4] * 9 + [8] * 6 + [16, 16, 4]
    assert set(logged(trainer, "batchsched/micro_chunks").values()) == {1}
    assert [len(batch) for batch in trainer.data_collator.batches] == trainer.ramp_plan


def test_sequential_sampling_reads_the_data_in_order(tmp_path):
    trainer = make_trainer(tmp_path, batch_schedule=ramp, arg_overrides={"train_sampling_strategy": "sequential"})
    trainer.train()
    assert trainer.data_collator.batches == [[0, 1, 2, 3], [4, 5, 6, 7], list(range(8, 16)), list(range(16, 24)),
                                             list(range(24, 32))]  # fmt: skip


def test_group_by_length_sorts_each_step_batch(tmp_path):
    """Each step holds the rows of the random order, sorted by length (longest first), so chunks pad less; the
    per-token loss is a sum over the same rows, so the run equals the unsorted one (fp32 rtol 1e-5)."""
    plain = make_trainer(tmp_path / "plain", batch_schedule=ramp, max_micro_batch_size=4)
    plain.train()
    grouped = make_trainer(tmp_path / "grouped", batch_schedule=ramp, max_micro_batch_size=4,
                           arg_overrides={"train_sampling_strategy": "group_by_length"})  # fmt: skip
    grouped.train()
    lengths = [len(ids) for ids in grouped.train_dataset["input_ids"]]
    for mine, theirs in zip(grouped.data_collator.batches, plain.data_collator.batches):
        assert sorted(mine) == sorted(theirs)
        assert [lengths[i] for i in mine] == sorted((lengths[i] for i in mine), reverse=True)
    assert any(a != b for a, b in zip(grouped.data_collator.batches, plain.data_collator.batches))
    assert train_losses(grouped) == pytest.approx(train_losses(plain), rel=1e-5)
    assert_params_close(params(grouped), params(plain), rtol=1e-5, atol=1e-6)


def test_dataloader_drop_last_drops_the_short_last_step(tmp_path):
    trainer = make_trainer(tmp_path, batch_schedule=ramp, arg_overrides={"dataloader_drop_last": True})
    trainer.train()
    assert trainer.ramp_plan == [4, 4, 8, 8] and trainer.state.global_step == 4  # 16 requested, 8 left: dropped
    assert [len(batch) for batch in trainer.data_collator.batches] == [4, 4, 8, 8]


class TruncatingCollator(RecordingCollator):
    """Keeps the first 5 tokens of every row (a collator's max_length)."""

    def __call__(self, features):
        return super().__call__([{key: value[:5] for key, value in f.items()} for f in features])


def test_token_clock_survives_resume_when_the_collator_truncates(tmp_path, caplog):
    """The clock, the token schedule and the checkpoint count the same tokens (the dataset rows'), so a resumed run
    draws the batches of the uninterrupted one; the truncation is reported once."""
    from hf_batchsched.schedules.batch import PiecewiseBatch

    # 90 tokens: between the resumed collated count and the dataset count, so a clock that mixed them would switch
    # to 8 one step late after the resume
    schedule = PiecewiseBatch.parse("0:4 90:8", unit="tokens")
    overrides = {"num_train_epochs": 2, "save_strategy": "steps", "save_steps": 3, "per_device_train_batch_size": 4}

    def run(name, **kwargs):
        args = make_args(tmp_path / name, **overrides)
        trainer = BatchRampTrainer(model=tiny_llama(seed=0), args=args, train_dataset=indexed_dataset(),
                                   data_collator=TruncatingCollator(), batch_schedule=schedule)  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.train(**kwargs)
        return trainer

    with caplog.at_level("WARNING", logger="hf_batchsched.trainer"):
        full = run("full")
    assert caplog.text.count("the collator truncates") == 1
    resumed = run("resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.data_collator.batches == full.data_collator.batches[3:]
    sizes = {step: size for step, size in logged(full, "batchsched/batch_size").items() if step > 3}
    assert {step: size for step, size in logged(resumed, "batchsched/batch_size").items() if step > 3} == sizes
    assert 4 in logged(full, "batchsched/batch_size").values() and 8 in sizes.values()
    lengths = [len(ids) for ids in full.train_dataset["input_ids"]]
    assert full.clock.consumed_tokens == sum(lengths[i] for batch in full.data_collator.batches for i in batch)
    assert resumed.clock.state_dict() == full.clock.state_dict()
    later = {step: loss for step, loss in train_losses(full).items() if step > 3}
    assert {s: v for s, v in train_losses(resumed).items() if s > 3} == pytest.approx(later, rel=1e-6)


# ---- padding -------------------------------------------------------------------------------------------------
class LeftPaddingCollator(RecordingCollator):
    """Left-pads (pad 0, label -100), as a tokenizer with padding_side="left" does."""

    def __call__(self, features):
        batch = super().__call__(features)
        lengths = batch["attention_mask"].sum(dim=1)
        for row, length in enumerate(lengths.tolist()):
            for key in batch:
                batch[key][row] = batch[key][row].roll(batch[key].shape[1] - length)
        return batch


class ChunkWidths:
    """Forward pre-hook: the (rows, columns) of every training forward."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if module.training:
            self.shapes.append(tuple(kwargs["input_ids"].shape))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("collator", [RecordingCollator, LeftPaddingCollator], ids=["right", "left"])
def test_chunks_trim_padding_on_both_sides_and_keep_the_loss(tmp_path, attn, collator):
    """Chunks of 4 rows give the parameters of whole-step chunks (fp32 rtol 1e-5 / atol 1e-6), and each chunk is as
    wide as its own longest row (+1 column before a left-padded row's first label). Left padding is trimmed only
    where that leaves the outputs unchanged: sdpa, not eager (a fully masked pad position attends to the whole row)."""
    runs = {}
    for micro in (16, 4):
        trainer = BatchRampTrainer(
            model=tiny_llama(seed=0, attn_implementation=attn), args=make_args(tmp_path / str(micro)),
            train_dataset=indexed_dataset(seq_len=16), data_collator=collator(), batch_schedule=ramp,
            max_micro_batch_size=micro, batch_size_multiple=4,
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        widths = ChunkWidths(trainer.model)
        trainer.train()
        runs[micro] = trainer, widths
    (one, _), (many, widths) = runs[16], runs[4]
    assert train_losses(many) == pytest.approx(train_losses(one), rel=1e-5)
    assert_params_close(params(many), params(one), rtol=1e-5, atol=1e-6)
    lengths = [len(ids) for ids in many.train_dataset["input_ids"]]
    expected = []
    for batch in many.data_collator.batches:
        for start in range(0, len(batch), 4):
            longest = max(lengths[i] for i in batch[start : start + 4])
            trimmed = collator is RecordingCollator or attn == "sdpa"
            width = longest if trimmed else max(lengths[i] for i in batch)
            if collator is LeftPaddingCollator and trimmed and longest < max(lengths[i] for i in batch):
                width += 1  # the pad column that predicts the longest row's first token
            expected.append(width)
    assert [columns for _, columns in widths.shapes] == expected
    assert many._leading_trim_exact is (True if collator is LeftPaddingCollator and attn == "sdpa" else
                                        (False if collator is LeftPaddingCollator else None))  # fmt: skip
