"""Shared test set-up: no network, one thread per test worker, tiny models from configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist runs two workers on two cores: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture
def tiny_model():
    from hf_batchsched.testing import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture
def tiny_dataset():
    from hf_batchsched.testing import synthetic_lm_dataset

    return synthetic_lm_dataset(num_samples=64, seq_len=16)
