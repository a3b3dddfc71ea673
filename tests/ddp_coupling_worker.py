"""torchrun worker for tests/test_coupling.py: a coupled BatchRampTrainer run on 2 CPU processes (gloo).

Usage: torchrun --nproc_per_node 2 tests/ddp_coupling_worker.py OUTPUT_DIR

Each rank writes OUTPUT_DIR/rank<r>.json with the hyperparameters of every optimizer step, the logged losses and the
logged coupling metrics.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_coupling import COUPLE, coupled_trainer  # noqa: E402


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    trainer, recorder = coupled_trainer(output_dir, COUPLE, ddp_backend="gloo")
    trainer.train()
    history = trainer.state.log_history
    record = {
        "world_size": trainer.args.world_size,
        "steps": recorder.steps,
        "losses": {e["step"]: e["loss"] for e in history if "loss" in e},
        "beta2": {e["step"]: e["batchsched/beta2"] for e in history if "batchsched/beta2" in e},
    }
    with open(os.path.join(output_dir, f"rank{trainer.args.process_index}.json"), "w") as file:
        json.dump(record, file)


if __name__ == "__main__":
    main(sys.argv[1])
