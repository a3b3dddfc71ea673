"""Tiny models and data for tests, benchmarks and the demo: built from a config, no network.

>>> model = tiny_llama(seed=0)
>>> sum(p.numel() for p in model.parameters()) < 200_000
True
"""

from __future__ import annotations

import torch

__all__ = ["tiny_llama", "tiny_llama_config", "synthetic_lm_dataset"]


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
