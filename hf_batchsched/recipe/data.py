"""The recipe's data builder: a hub dataset, local JSON/JSONL files or the embedded text, split, tokenized (plain
text packed into full blocks, or prompt + response pairs) and padded by ``pad_collator``."""

from __future__ import annotations

from pathlib import Path

from ..assets import demo_corpus
from ..errors import ConfigError
from .config import RecipeArguments

__all__ = ["load_data", "pad_collator"]


def _raw_data(args: RecipeArguments):
    """``(train, eval)`` as ``datasets.Dataset`` of raw rows (eval may be None)."""
    from datasets import Dataset, load_dataset

    data = args.data
    if data.dataset_name is None and not data.data_files:
        train, held_out = demo_corpus()
        return Dataset.from_dict({"text": train}), Dataset.from_dict({"text": held_out})
    if data.dataset_name is not None:
        loaded = load_dataset(data.dataset_name, data.dataset_config)
    else:
        missing = [path for path in data.data_files if not Path(path).is_file()]
        if missing:
            raise ConfigError(f"config key 'data_files': no such file(s): {', '.join(missing)}")
        loaded = load_dataset("json", data_files={"train": list(data.data_files)})
    if data.train_split not in loaded:
        raise ConfigError(f"config key 'train_split': no split {data.train_split!r}; found {', '.join(loaded)}")
    if data.eval_split is not None:
        if data.eval_split not in loaded:
            raise ConfigError(f"config key 'eval_split': no split {data.eval_split!r}; found {', '.join(loaded)}")
        return loaded[data.train_split], loaded[data.eval_split]
    if data.eval_fraction == 0:
        return loaded[data.train_split], None
    split = loaded[data.train_split].train_test_split(test_size=data.eval_fraction, seed=args.training.seed)
    return split["train"], split["test"]


def _tokenize(dataset, args: RecipeArguments, tokenizer):
    data = args.data
    columns = dataset.column_names
    eos = tokenizer.eos_token or ""
    if data.prompt_field is not None:
        for key in (data.prompt_field, data.response_field):
            if key not in columns:
                raise ConfigError(f"the data has no column {key!r} (columns: {', '.join(columns)})")

        def pairs(row):
            prompt = tokenizer(row[data.prompt_field], add_special_tokens=False)["input_ids"]
            response = tokenizer(row[data.response_field] + eos, add_special_tokens=False)["input_ids"]
            ids = (prompt + response)[: data.max_seq_length]
            labels = ([-100] * len(prompt) if data.completion_only_loss else list(prompt)) + response
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[: data.max_seq_length]}

        return dataset.map(pairs, remove_columns=columns)
    if data.text_field not in columns:
        raise ConfigError(
            f"config key 'text_field': the data has no column {data.text_field!r} (columns: {', '.join(columns)})"
        )
    tokenized = dataset.map(
        lambda rows: tokenizer([text + eos for text in rows[data.text_field]], add_special_tokens=False),
        batched=True,
        remove_columns=columns,
    )
    if not data.packing:
        return tokenized.map(
            lambda row: {
                "input_ids": row["input_ids"][: data.max_seq_length],
                "attention_mask": row["attention_mask"][: data.max_seq_length],
                "labels": row["input_ids"][: data.max_seq_length],
            }
        )
    block = data.max_seq_length

    def pack(rows):
        stream = [token for ids in rows["input_ids"] for token in ids]
        blocks = [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]
        masks, labels = [[1] * block for _ in blocks], [list(b) for b in blocks]
        return {"input_ids": blocks, "attention_mask": masks, "labels": labels}

    return tokenized.map(pack, batched=True, batch_size=1000, remove_columns=tokenized.column_names)


def load_data(args: RecipeArguments, tokenizer):
    """Load, split and tokenize the data: ``(train_dataset, eval_dataset or None)`` of token sequences."""
    train, held_out = _raw_data(args)
    train = _tokenize(train, args, tokenizer)
    held_out = _tokenize(held_out, args, tokenizer) if held_out is not None else None
    if args.data.max_train_samples is not None:
        train = train.select(range(min(len(train), args.data.max_train_samples)))
    if held_out is not None and args.data.max_eval_samples is not None:
        held_out = held_out.select(range(min(len(held_out), args.data.max_eval_samples)))
    if len(train) == 0:
        raise ConfigError("the training data is empty after tokenization; check text_field and max_seq_length")
    return train, held_out


def pad_collator(tokenizer):
    """A collator padding ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100) to the longest row."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(rows: list[dict]) -> dict:
        width = max(len(row["input_ids"]) for row in rows)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for row in rows:
            pad = width - len(row["input_ids"])
            batch["input_ids"].append(list(row["input_ids"]) + [pad_id] * pad)
            batch["attention_mask"].append(list(row["attention_mask"]) + [0] * pad)
            batch["labels"].append(list(row["labels"]) + [-100] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}

    return collate
