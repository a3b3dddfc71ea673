"""The recipe's trainer builder and its run: ``build_trainer`` (a ``BatchRampTrainer`` with the configured callbacks),
``resume_checkpoint`` and ``finetune``, the steps of ``recipes/finetune.py`` as one function."""

from __future__ import annotations

import contextlib
import functools
import inspect
from pathlib import Path

from ..errors import ConfigError
from .config import CALLBACK_SECTIONS, RecipeArguments
from .data import load_data, pad_collator
from .model import load_model_and_tokenizer
from .validation import callback_class, named_error, section_kwargs

__all__ = [
    "build_callbacks",
    "build_trainer",
    "check_before_start",
    "finetune",
    "remove_if_left_empty",
    "resume_checkpoint",
    "seed",
]


def build_callbacks(args: RecipeArguments, trainer) -> list:
    """Instantiate every callback whose config section is present, add it to ``trainer`` and return them."""
    callbacks = []
    for section in CALLBACK_SECTIONS:
        value = getattr(args.callbacks, section)
        if value is None:
            continue
        kwargs = section_kwargs(section, value)
        cls = callback_class(section)
        first = next(iter(list(inspect.signature(cls.__init__).parameters)[1:]), None)
        positional = (trainer,) if first == "trainer" else ()
        callback = named_error(functools.partial(cls, *positional, **kwargs), section)
        trainer.add_callback(callback)
        callbacks.append(callback)
    return callbacks


def _uses_batch_ramp(args: RecipeArguments) -> bool:
    return args.schedule.batch_schedule is not None or args.schedule.lr_policy is not None


def resume_checkpoint(args: RecipeArguments) -> str | None:
    """The checkpoint the run resumes from (``resume_from_checkpoint``: ``true``, ``false`` or a path), or ``None``.

    With a batch ramp it must be a complete ``BatchRampTrainer`` checkpoint (``hf_batchsched.checkpoint``); ``true``
    takes the newest complete one in ``output_dir``. Refused with a ``ConfigError`` before anything is written.
    """
    value = args.training.resume_from_checkpoint
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        value = value.strip().lower() == "true"
    if value is None or value is False:
        return None
    if _uses_batch_ramp(args):
        from ..checkpoint import find_resume_checkpoint

        return find_resume_checkpoint(value, args.training.output_dir).path
    if value is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.training.output_dir) if Path(args.training.output_dir).is_dir() else None
        if last is None:
            raise ConfigError(
                f"resume_from_checkpoint: true, but output_dir {args.training.output_dir!r} has no checkpoint"
            )
        return last
    if not Path(value).is_dir():
        raise ConfigError(f"resume_from_checkpoint: {value!r} does not exist or is not a checkpoint folder")
    return str(value)


def build_trainer(args: RecipeArguments, model, tokenizer, train_dataset, eval_dataset=None):
    """A ``BatchRampTrainer`` (plain ``Trainer`` when neither a batch schedule nor an LR policy is set, e.g. for
    DeepSpeed) with the package's callbacks from the config."""
    from transformers import Trainer

    kwargs = dict(
        model=model,
        args=args.training,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=pad_collator(tokenizer),
        processing_class=tokenizer,
    )
    if not _uses_batch_ramp(args):
        trainer = Trainer(**kwargs)
    else:
        from ..schedules.batch_config import batch_schedule_from_config
        from ..trainer import BatchRampTrainer

        schedule = args.schedule.batch_schedule
        trainer = BatchRampTrainer(
            **kwargs,
            batch_schedule=None if schedule is None else batch_schedule_from_config(schedule),
            max_micro_batch_size=args.schedule.max_micro_batch_size,
            lr_policy=args.schedule.lr_policy,
            couple=args.schedule.couple,
            allow_schedule_change_on_resume=args.schedule.allow_schedule_change_on_resume,
        )
    build_callbacks(args, trainer)
    return trainer


def seed(args: RecipeArguments) -> None:
    """Seed (or, with ``full_determinism``, make deterministic) before the model exists: LoRA's initial adapter
    weights come from the global generator, so two runs of one config start from the same adapters."""
    from transformers import enable_full_determinism, set_seed

    if args.training.full_determinism:
        enable_full_determinism(args.training.seed)
    else:
        set_seed(args.training.seed)


def check_before_start(args: RecipeArguments) -> str | None:
    """Refuse, before anything is loaded or written, a launch that is not distributed
    (``hf_batchsched.launch.check_distributed_launch``) and a resume with no usable checkpoint; returns the
    checkpoint to resume from (``resume_checkpoint``), or ``None``."""
    from ..launch import check_distributed_launch

    check_distributed_launch(args.training)
    return resume_checkpoint(args)


@contextlib.contextmanager
def remove_if_left_empty(output_dir: str | Path):
    """A run that stops before writing anything (a bad config found late, Ctrl-C) leaves no empty ``output_dir``."""
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    try:
        yield
    except BaseException:
        if created:
            _remove_empty_tree(output_dir)
        raise


def finetune(args: RecipeArguments):
    """Run the recipe and return the trained ``Trainer`` (final metrics in ``trainer.state.log_history``):

    1. refuse a launch that is not distributed, and a resume without a usable checkpoint, before anything is
       loaded or written (``resume_from_checkpoint``: ``true`` for the newest complete checkpoint in
       ``output_dir``, or a checkpoint path);
    2. seed, then the model and tokenizer (+ LoRA / QLoRA adapters); the embedded small Llama when no model is named;
    3. data: hub dataset, local JSON/JSONL, or the embedded text, tokenized (and packed) to ``max_seq_length``;
    4. trainer: ``BatchRampTrainer`` with the batch ramp and LR policy, plus every configured callback;
    5. train, evaluate, save (unless ``save_strategy: "no"``).
    """
    resume = check_before_start(args)
    with remove_if_left_empty(args.training.output_dir):
        seed(args)
        model, tokenizer = load_model_and_tokenizer(args)
        train_dataset, eval_dataset = load_data(args, tokenizer)
        trainer = build_trainer(args, model, tokenizer, train_dataset, eval_dataset)
        metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
        if eval_dataset is not None:
            metrics.update(trainer.evaluate())
        if args.training.save_strategy != "no":
            trainer.save_model()
        trainer.log_metrics("final", metrics)
    return trainer


def _remove_empty_tree(path: Path) -> None:
    """Remove ``path`` and its subfolders if they hold no file."""
    try:
        if not path.is_dir() or any(not item.is_dir() for item in path.rglob("*")):
            return
        for folder in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            folder.rmdir()
        path.rmdir()
    except OSError:  # another process of the launch removed it first, or wrote into it
        pass
