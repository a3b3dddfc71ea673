"""Small synthetic datasets: learnable token sequences for causal LMs, and scikit-learn's digits as images."""

from __future__ import annotations

import torch

__all__ = ["digits_image_dataset", "synthetic_lm_dataset"]


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
