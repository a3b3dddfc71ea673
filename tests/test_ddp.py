"""BatchRampTrainer under DDP: ``torchrun --nproc_per_node 2`` on CPU (gloo), compared with one process."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_torchrun
from test_trainer_ramp import make_trainer, ramp

from hf_batchsched.data import RampBatchSampler

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(__file__)


def test_ddp_two_ranks_match_single_process(tmp_path):
    ranks = run_torchrun(os.path.join(HERE, "ddp_worker.py"), tmp_path / "ddp")
    assert [r["world_size"] for r in ranks] == [2, 2]

    # Every step's global batch equals the schedule (rounded to max_micro 2 x world 2 = 4) ...
    planned = RampBatchSampler(32, ramp, world_size=2, round_to=4, total_rows=64).plan()
    assert planned == [4, 4, 8, 8, 16, 16, 8]
    global_batches = [a + b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"])]
    assert [len(batch) for batch in global_batches] == planned
    assert list(ranks[0]["batch_sizes"].values()) == planned
    assert [len(batch) // 2 for batch in ranks[0]["batches"]] == list(ranks[0]["micro_chunks"].values())
    # ... within a pass every sample is seen exactly once across ranks ...
    stream = [index for batch in global_batches for index in batch]
    assert sorted(stream[:32]) == sorted(stream[32:]) == list(range(32))
    assert ranks[0]["clock"] == ranks[1]["clock"]

    # ... and the run matches one process with the same global batches (rank 0's block, then rank 1's).
    single = make_trainer(
        tmp_path / "single", batch_schedule=ramp, max_micro_batch_size=2, batch_size_multiple=4,
        arg_overrides={"num_train_epochs": 2, "per_device_train_batch_size": 2},
    )  # fmt: skip
    single.train()
    assert single.data_collator.batches == global_batches
    single_losses = {str(e["step"]): e["loss"] for e in single.state.log_history if "loss" in e}
    # Tolerance: DDP sums the same per-token terms in a different order (two ranks, all-reduce): fp32 round-off
    # ~1e-7 per step, compounded over 7 Adam steps; 1e-5 relative is far below any real difference (~1e-3).
    assert ranks[0]["losses"] == pytest.approx(single_losses, rel=1e-5)
    ddp_params = torch.load(tmp_path / "ddp" / "params.pt")
    for name, value in single.model.named_parameters():
        torch.testing.assert_close(ddp_params[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
