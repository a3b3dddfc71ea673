"""Offline assets: everything the demo, the recipe's embedded default, the benchmarks and the tests build without a
network, from a config or from files that ship with Python.

- ``text``: the demo's texts (standard-library source code, Python's language reference) and its cached BPE;
- ``models``: freshly initialised small models (``tiny_llama``, the demo's ``demo_model``, ``tiny_resnet``);
- ``synthetic``: learnable token sequences and scikit-learn's digits as datasets;
- ``base_model``: the demo's base model, trained once on the language reference and cached;
- ``configs``: ``DEMO_CONFIG``, the demo's recipe settings (``recipes/configs/demo_cpu.yaml``).

A leaf: it imports nothing from ``hf_batchsched`` but ``errors``.
"""

from .base_model import BASE_TRAINING, BASE_TRAINING_FAST, demo_base_model
from .configs import DEMO_CONFIG
from .models import demo_model, tiny_llama, tiny_llama_config, tiny_resnet
from .synthetic import digits_image_dataset, synthetic_lm_dataset
from .text import (
    DEMO_MODULES,
    DEMO_TRAIN_CHARS,
    base_corpus,
    cache_dir,
    code_chunks,
    demo_corpus,
    demo_tokenizer,
    stdlib_corpus,
)

__all__ = [
    "BASE_TRAINING",
    "BASE_TRAINING_FAST",
    "DEMO_CONFIG",
    "DEMO_MODULES",
    "DEMO_TRAIN_CHARS",
    "base_corpus",
    "cache_dir",
    "code_chunks",
    "demo_base_model",
    "demo_corpus",
    "demo_model",
    "demo_tokenizer",
    "digits_image_dataset",
    "stdlib_corpus",
    "synthetic_lm_dataset",
    "tiny_llama",
    "tiny_llama_config",
    "tiny_resnet",
]
