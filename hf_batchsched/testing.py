"""Tiny models and data for tests, benchmarks and the demo: built from a config, no network.

>>> model = tiny_llama(seed=0)
>>> sum(p.numel() for p in model.parameters()) < 200_000
True
"""

from __future__ import annotations

import torch

__all__ = [
    "tiny_llama",
    "tiny_llama_config",
    "synthetic_lm_dataset",
    "tiny_resnet",
    "digits_image_dataset",
    "tiny_training_args",
]


def tiny_training_args(output_dir, **overrides):
    """``TrainingArguments`` for a short, quiet, reproducible CPU run; ``overrides`` replace any default.

    Defaults: ``use_cpu``, no reporting, no saving, no progress bar, ``seed=0``, ``logging_steps=1``,
    ``learning_rate=1e-3``, ``per_device_train_batch_size=4``, one epoch.

    >>> args = tiny_training_args("/tmp/tiny-args", max_steps=3)
    >>> args.max_steps, args.report_to, args.save_strategy.value
    (3, [], 'no')
    """
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def tiny_llama_config(
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 128,
    attn_implementation: str = "eager",
    **kwargs,
):
    """A ``LlamaConfig`` for a model small enough to train in seconds on a CPU."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **kwargs,
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_llama(seed: int = 0, **config_kwargs):
    """A freshly initialised ``LlamaForCausalLM`` from ``tiny_llama_config(**config_kwargs)``, seeded."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def synthetic_lm_dataset(
    num_samples: int = 64,
    seq_len: int = 16,
    vocab_size: int = 128,
    seed: int = 0,
    variable_length: bool = False,
):
    """A ``datasets.Dataset`` of learnable token sequences (``input_ids``, ``attention_mask``, ``labels``).

    Each sequence counts upward from a random start modulo ``vocab_size`` (token ids 3 and up, so pad,
    bos and eos stay free), so a model can learn it. With ``variable_length`` the lengths vary between
    ``seq_len // 2`` and ``seq_len``, and are padded by the collator, not here.
    """
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    usable = vocab_size - 3
    for _ in range(num_samples):
        length = seq_len
        if variable_length:
            length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=generator))
        start = int(torch.randint(0, usable, (1,), generator=generator))
        ids = [3 + (start + i) % usable for i in range(length)]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(list(ids))
    return Dataset.from_dict(rows)


def tiny_resnet(seed: int = 0, **config_kwargs):
    """A freshly initialised ``ResNetForImageClassification`` (BatchNorm2d layers) for 1-channel 10-class images.

    Defaults: two stages of one basic block each (8 and 16 channels), about 5k parameters, six ``BatchNorm2d``.
    """
    from transformers import ResNetConfig, ResNetForImageClassification

    defaults = dict(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10
    )
    defaults.update(config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ResNetForImageClassification(ResNetConfig(**defaults))
    return model


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor):
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def digits_image_dataset(num_samples: int | None = None, image_size: int = 16, offset: int = 0):
    """scikit-learn's 8x8 digits as a map-style dataset of ``{"pixel_values": (1, S, S), "labels": int}`` rows.

    Pixels are scaled to [0, 1] and upsampled (nearest) from 8x8 to ``image_size`` (a multiple of 8). Rows
    ``offset : offset + num_samples`` of the 1797 images are used.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    end = None if num_samples is None else offset + num_samples
    images = torch.tensor(digits.images[offset:end], dtype=torch.float32) / 16.0
    factor = image_size // 8
    images = images.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2).unsqueeze(1)
    return _ImageDataset(images, torch.tensor(digits.target[offset:end], dtype=torch.long))
