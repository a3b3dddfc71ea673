"""Small models built from a config, freshly initialised and seeded: the tiny Llama of tests and benchmarks, the
demo's Llama, and a tiny ResNet with BatchNorm layers.

>>> model = tiny_llama(seed=0)
>>> sum(p.numel() for p in model.parameters()) < 200_000
True
"""

from __future__ import annotations

import torch

__all__ = ["demo_model", "tiny_llama", "tiny_llama_config", "tiny_resnet"]


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
        attn_implementation=attn_implementation,
        **kwargs,
    )
    return config


def tiny_llama(seed: int = 0, **config_kwargs):
    """A freshly initialised ``LlamaForCausalLM`` from ``tiny_llama_config(**config_kwargs)``, seeded."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def demo_model(vocab_size: int, seed: int = 0, attn_implementation: str | None = None):
    """A freshly initialised ``LlamaForCausalLM`` for the demo: hidden 128, 2 layers, 4 heads, context 128.

    About 0.46 M parameters with ``vocab_size=512``:

    >>> sum(p.numel() for p in demo_model(512).parameters())
    459392
    """
    return tiny_llama(
        seed=seed,
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
        attn_implementation=attn_implementation or "sdpa",
    )


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
