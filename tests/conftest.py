"""Shared test set-up: no network, one thread per test worker, tiny models from configs, a 2-rank launcher."""

import json
import os
import pathlib
import socket
import subprocess
import sys

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
    from hf_batchsched.assets import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture
def tiny_dataset():
    from hf_batchsched.assets import synthetic_lm_dataset

    return synthetic_lm_dataset(num_samples=64, seq_len=16)


def run_torchrun(script: str, out_dir, nproc: int = 2, timeout: int = 240, env: dict | None = None) -> list[dict]:
    """``torchrun --nproc_per_node nproc script out_dir`` on CPU (gloo, one thread per rank, extra ``env``); returns
    each rank's ``out_dir/rank<r>.json`` (the worker writes it). Fails the test with the ranks' stderr if the launch
    fails.

    A launch whose rank was aborted by the C++ runtime (SIGABRT, "terminate called without an active exception":
    seen once here, in a 2-process gloo launch on a loaded 2-core machine, and not in repeated runs of the same test)
    is run once more; an abort that repeats, and every other failure, fails the test."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([os.path.dirname(here), here])
    env = dict(os.environ, **(env or {}), OMP_NUM_THREADS="1", PYTHONPATH=path)
    for _attempt in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(port), os.path.abspath(script), str(out_dir),
        ]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        stderr = result.stderr
        aborted = "Signal 6 (SIGABRT)" in stderr and "terminate called without an active exception" in stderr
        if result.returncode == 0 or not aborted:
            break
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((pathlib.Path(out_dir) / f"rank{rank}.json").read_text()) for rank in range(nproc)]
