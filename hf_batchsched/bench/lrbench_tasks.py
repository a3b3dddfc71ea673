"""What every lrbench candidate trains: the ``task:`` section (a tiny offline model and data, or local folders and
files) or the ``recipe:`` section (the user's fine-tune), as a trainer factory (``build_task``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from ..errors import ConfigError
from .lrbench_config import recipe_run_config

__all__ = ["build_task", "build_task_data"]


def build_task_data(task: Mapping, seed: int):
    """``(make_model, train, eval)`` of the ``task:`` section (also used by ``hf-batchsched range-test``)."""
    from ..assets import synthetic_lm_dataset, tiny_llama

    if task is None:
        raise ConfigError("this config takes its task from 'recipe:'; only lrbench supports that, use a 'task:' here")
    model_name, dataset_name = task["model"], task["dataset"]
    if model_name == "tiny":
        model_config = dict(task.get("model_config") or {})

        def make_model():
            return tiny_llama(seed=seed, **model_config)

        vocab_size = model_config.get("vocab_size", 128)
        tokenizer = None
    else:
        if not os.path.isdir(model_name):
            raise ConfigError(
                f"task.model {model_name!r} is not a local folder; lrbench runs offline: use 'tiny' or a folder "
                "with a saved model (save_pretrained)"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        def make_model():
            import torch

            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_pretrained(model_name)

        tokenizer = AutoTokenizer.from_pretrained(model_name) if dataset_name != "synthetic" else None
        vocab_size = None
    if dataset_name == "synthetic":
        if vocab_size is None:
            from transformers import AutoConfig

            vocab_size = AutoConfig.from_pretrained(model_name).vocab_size
        train = synthetic_lm_dataset(task["num_train_samples"], task["seq_len"], vocab_size, seed=seed)
        evaluation = synthetic_lm_dataset(task["num_eval_samples"], task["seq_len"], vocab_size, seed=seed + 1)
        return make_model, train, evaluation
    if not os.path.isfile(dataset_name):
        raise ConfigError(f"task.dataset {dataset_name!r} must be 'synthetic' or a local .json/.jsonl file")
    import datasets

    rows = datasets.load_dataset("json", data_files=dataset_name, split="train")
    if "input_ids" not in rows.column_names:
        if "text" not in rows.column_names or tokenizer is None:
            raise ConfigError(
                f"{dataset_name} needs an 'input_ids' column, or a 'text' column and a task.model folder with a "
                "tokenizer"
            )

        def tokenize(row):
            ids = tokenizer(row["text"], truncation=True, max_length=task["seq_len"])["input_ids"]
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

        rows = rows.map(tokenize, remove_columns=rows.column_names)
    elif "labels" not in rows.column_names:
        rows = rows.map(lambda row: {"labels": list(row["input_ids"]), "attention_mask": [1] * len(row["input_ids"])})
    num_eval = min(task["num_eval_samples"], len(rows) // 5)
    if num_eval < 1:
        raise ConfigError(f"{dataset_name} has {len(rows)} rows; lrbench needs at least 5 (train + eval split)")
    split = rows.train_test_split(test_size=num_eval, seed=seed)
    return make_model, split["train"], split["test"]


def _builtin_task(config: Mapping) -> Callable:
    """The ``task:`` section as a trainer factory: a ``BatchRampTrainer`` with ``training:`` as its arguments."""
    from transformers import TrainingArguments

    from ..trainer import BatchRampTrainer

    seed = int(config["seed"])
    make_model, train_dataset, eval_dataset = build_task_data(config["task"], seed)

    def make_trainer(policy: Mapping, max_steps: int, eval_steps: int, run_dir: str):
        arguments = {
            "output_dir": run_dir,
            "eval_strategy": "steps",
            "eval_steps": eval_steps,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "seed": seed,
            "data_seed": seed,
        }
        arguments.update(config["training"])  # the config's training section wins (e.g. report_to)
        arguments["max_steps"] = max_steps
        try:
            args = TrainingArguments(**arguments)
        except TypeError as error:
            raise ConfigError(f"training section: {error}; use TrainingArguments field names") from None
        return BatchRampTrainer(
            model=make_model(),
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            lr_policy=dict(policy),
        )

    return make_trainer


def _recipe_task(config: Mapping) -> Callable:
    """The ``recipe:`` section as a trainer factory: ``parse_config`` -> seed -> ``load_model_and_tokenizer`` ->
    ``build_trainer``, the data loaded and tokenised once and shared by every run."""
    from transformers import set_seed

    from ..recipe import build_trainer, load_data, load_model_and_tokenizer, parse_config

    data: list = []

    def make_trainer(policy: Mapping, max_steps: int, eval_steps: int, run_dir: str):
        args = parse_config(recipe_run_config(config, policy, max_steps, eval_steps, run_dir))
        set_seed(args.training.seed)  # the LoRA init draws from the global RNG: the same adapters for everyone
        model, tokenizer = load_model_and_tokenizer(args)
        if not data:
            train_dataset, eval_dataset = load_data(args, tokenizer)
            if eval_dataset is None or len(eval_dataset) == 0:
                raise ConfigError(
                    "the recipe has no eval data (eval_fraction: 0 and no eval_split); lrbench ranks on held-out "
                    "loss: set eval_fraction or eval_split under recipe_overrides"
                )
            data.extend((train_dataset, eval_dataset))
        return build_trainer(args, model, tokenizer, *data)

    return make_trainer


def build_task(config: Mapping) -> Callable:
    """The trainer factory of a loaded lrbench config (``load_lrbench_config``): ``recipe:`` or ``task:``.

    Returns:
        `Callable`: ``make_trainer(policy, max_steps, eval_steps, run_dir)`` returning a fresh ``Trainer`` (same
        initialisation, data and data order on every call) that applies ``policy`` for ``max_steps`` updates and
        evaluates on its ``eval_dataset`` every ``eval_steps``.
    """
    return _recipe_task(config) if config.get("recipe") is not None else _builtin_task(config)
