"""torchrun worker for tests/test_checkpoints.py: resume=True under DDP (2 CPU processes, gloo), dropout on.

Usage: torchrun --nproc_per_node 2 tests/ddp_resume_worker.py OUTPUT_DIR

Trains uninterrupted in OUTPUT_DIR/full (a checkpoint every 2 steps), then builds OUTPUT_DIR/resumed holding that
run's complete checkpoint-4 and an incomplete checkpoint-6 (its trainer_state.json removed, as a crash during its
save leaves it) and resumes it with ``resume_from_checkpoint=True``. Each rank writes OUTPUT_DIR/rank<r>.json: both
runs' losses, whether their final parameters are equal, and the passed-over log lines.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from test_checkpoints import losses, make_trainer  # noqa: E402


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    full_dir, resumed_dir = os.path.join(output_dir, "full"), os.path.join(output_dir, "resumed")
    options = {"max_micro_batch_size": 2, "args": {"ddp_backend": "gloo"}}  # sizes: multiples of 2 x 2 ranks
    full = make_trainer(full_dir, **options)
    full.train()
    rank = full.args.process_index
    if rank == 0:
        for name in ("checkpoint-4", "checkpoint-6"):
            shutil.copytree(os.path.join(full_dir, name), os.path.join(resumed_dir, name))
        os.remove(os.path.join(resumed_dir, "checkpoint-6", "trainer_state.json"))
    dist.barrier()
    lines = Lines()
    logging.getLogger("hf_batchsched.checkpoint").addHandler(lines)
    resumed = make_trainer(resumed_dir, **options)
    resumed.train(resume_from_checkpoint=True)
    equal = all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True))
    record = {
        "world_size": full.args.world_size,
        "plan": full.ramp_plan,
        "full": losses(full),
        "resumed": losses(resumed),
        "params_equal": equal,
        "passed_over": [line for line in lines.lines if "passed over" in line],
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump(record, file)


if __name__ == "__main__":
    main(sys.argv[1])
