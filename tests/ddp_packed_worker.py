"""torchrun worker for tests/test_packed.py: a ramped run on padding-free (flattened) batches, 2 CPU processes.

Usage: torchrun --nproc_per_node 2 tests/ddp_packed_worker.py OUTPUT_DIR

Each rank writes OUTPUT_DIR/rank<r>.json with its step batches (dataset indices), the logged losses and batch sizes,
and the clock; rank 0 also the final parameters as OUTPUT_DIR/params.pt.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_packed import flattening_trainer  # noqa: E402
from test_trainer_ramp import ramp  # noqa: E402


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    trainer = flattening_trainer(
        output_dir,
        batch_schedule=ramp,
        max_micro_batch_size=2,
        arg_overrides={"num_train_epochs": 2, "ddp_backend": "gloo"},
    )
    trainer.train()
    rank = trainer.args.process_index
    entries = [e for e in trainer.state.log_history if "loss" in e]
    record = {
        "world_size": trainer.args.world_size,
        "batches": trainer.data_collator.batches,
        "losses": {e["step"]: e["loss"] for e in entries},
        "batch_sizes": {e["step"]: e["batchsched/batch_size"] for e in entries},
        "clock": trainer.clock.state_dict(),
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump(record, file)
    if rank == 0:
        torch.save(
            {k: v.detach().cpu() for k, v in trainer.model.named_parameters()}, os.path.join(output_dir, "params.pt")
        )


if __name__ == "__main__":
    main(sys.argv[1])
