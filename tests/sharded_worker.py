"""torchrun worker for tests/test_sharded.py: BatchRampTrainer under DeepSpeed ZeRO-2/ZeRO-3 or FSDP2, 2 CPU ranks.

Usage: torchrun --nproc_per_node 2 tests/sharded_worker.py OUTPUT_DIR   (engine in $SHARDED_ENGINE: zero2, zero3,
fsdp2; FSDP2 runs on CPU processes through HF_BATCHSCHED_FSDP_ON_CPU=1)

One launch checks, per engine:

1. a ramp 8 -> 16 -> 32 (micro-batch 4 per rank, LR policy in samples, checkpoints every 2 steps), trained
   uninterrupted: per-step losses, batch sizes, each rank's collated batches (dataset indices), final weights;
2. the same run resumed from the mid-ramp checkpoint (``RESUME_STEP``) in a fresh trainer: its losses and
   final weights (compared bit for bit with 1. by the test: same process, same build);
3. the sharpness probe (``full_parameters`` + ``estimate_sharpness``, lambda_max by finite-difference HVPs, and avg)
   at the final weights, each rank on its share of the probe batches;
4. ``NoiseScaleCallback`` on one step of 32 samples (4 chunks per rank) at the initial weights: the norms it reads
   (ZeRO-3, FSDP2) or its refusal (ZeRO-2);
5. ZeRO: the refusal of an LR policy next to a DeepSpeed scheduler; FSDP2: the same step with
   ``fsdp_gradient_sync="last_chunk"`` and the noise-scale refusal there.

Each rank writes OUTPUT_DIR/rank<r>.json; rank 0 also OUTPUT_DIR/params.pt (final weights).
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_trainer_ramp import indexed_dataset, make_trainer  # noqa: E402

from hf_batchsched.callbacks import NoiseScaleCallback  # noqa: E402
from hf_batchsched.errors import ConfigError  # noqa: E402
from hf_batchsched.probes.sharpness import estimate_sharpness  # noqa: E402
from hf_batchsched.trainer import full_parameters  # noqa: E402

NUM_SAMPLES = 48
RESUME_STEP = 2
LR_POLICY = {"name": "warmup", "unit": "samples", "warmup": 16, "policy": "constant"}
PROBE = {"metrics": ["avg", "lambda_max"], "hvp_method": "fd", "max_steps": 4, "num_samples": 4, "seed": 3}


def ramp(consumed: float) -> int:
    return 8 if consumed < 16 else (16 if consumed < 48 else 32)


def engine_overrides(engine: str) -> dict:
    if engine.startswith("zero"):
        deepspeed = {
            "zero_optimization": {"stage": int(engine[-1])},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
        }
        return {"deepspeed": deepspeed}
    fsdp_config = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    return {"fsdp": "full_shard", "fsdp_config": fsdp_config}


def build(output_dir: str, engine: str, **kwargs):
    overrides = {
        "num_train_epochs": 2,
        "per_device_train_batch_size": 4,
        "ddp_backend": "gloo",
        "max_grad_norm": 1.0,
        **engine_overrides(engine),
        **kwargs.pop("arg_overrides", {}),
    }
    return make_trainer(
        output_dir,
        dataset=indexed_dataset(NUM_SAMPLES),
        max_micro_batch_size=4,
        arg_overrides=overrides,
        **kwargs,
    )


def full_weights(trainer) -> dict[str, torch.Tensor]:
    with full_parameters(trainer) as model:
        return {name: value.detach().clone() for name, value in model.named_parameters()}


def probe_batches(trainer) -> list[dict]:
    rows = [indexed_dataset(NUM_SAMPLES)[i] for i in range(16)]
    batches = [trainer.data_collator(rows[start : start + 4]) for start in range(0, 16, 4)]
    rank, world = trainer.args.process_index, trainer.args.world_size
    return batches[rank::world]


def losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    engine = os.environ["SHARDED_ENGINE"]
    record: dict = {"engine": engine}

    # 1. uninterrupted ramp, checkpoints every 2 steps
    save = {"save_strategy": "steps", "save_steps": RESUME_STEP, "save_only_model": False}
    trainer = build(os.path.join(output_dir, "run"), engine, batch_schedule=ramp, lr_policy=LR_POLICY,
                    arg_overrides=save)  # fmt: skip
    record["sharding_engine"] = trainer.sharding_engine
    record["world_size"] = trainer.args.world_size
    trainer.train()
    record["losses"] = losses(trainer)
    record["batch_sizes"] = {e["step"]: e["batchsched/batch_size"] for e in trainer.state.log_history if "loss" in e}
    record["learning_rates"] = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "loss" in e}
    record["batches"] = list(trainer.data_collator.batches)
    record["clock"] = trainer.clock.state_dict()
    weights = full_weights(trainer)

    # 3. sharpness at the final weights (every rank on its share of the probe batches)
    batches = probe_batches(trainer)
    with full_parameters(trainer) as model:
        record["sharpness"] = estimate_sharpness(model, batches, **PROBE)
    record["weights_unchanged_by_probe"] = all(
        torch.equal(weights[name], value) for name, value in full_weights(trainer).items()
    )

    # 2. resume from the mid-ramp checkpoint in a fresh trainer
    resumed = build(os.path.join(output_dir, "run"), engine, batch_schedule=ramp, lr_policy=LR_POLICY,
                    arg_overrides=save)  # fmt: skip
    resumed.train(resume_from_checkpoint=os.path.join(output_dir, "run", f"checkpoint-{RESUME_STEP}"))
    record["resumed_losses"] = losses(resumed)
    record["resumed_batches"] = list(resumed.data_collator.batches)
    record["resume_bitwise_equal"] = all(
        torch.equal(weights[name], value) for name, value in full_weights(resumed).items()
    )

    # 4. noise scale (ZeRO-3, FSDP2): one step of 32 samples (16 per rank, 4 chunks) at the initial weights
    noisy = build(os.path.join(output_dir, "noise"), engine, batch_schedule=32, arg_overrides={"max_steps": 1})
    try:
        callback = NoiseScaleCallback(noisy, beta=0.5)
    except ConfigError as error:
        record["noise_refused"] = str(error)
    else:
        noisy.add_callback(callback)
        readings = []
        update = callback.estimator.update
        callback.estimator.update = lambda *values: (readings.append(values), update(*values))[1]
        noisy.train()
        record["noise_readings"] = readings
        record["noise_batches"] = list(noisy.data_collator.batches)

    # 5. what needs the engine to check
    if engine.startswith("zero"):  # an LR policy and a DeepSpeed scheduler would both set the LR
        deepspeed = {**engine_overrides(engine)["deepspeed"], "scheduler": {"type": "WarmupLR", "params": {}}}
        try:
            build(os.path.join(output_dir, "refused"), engine, batch_schedule=ramp, lr_policy=LR_POLICY,
                  arg_overrides={"deepspeed": deepspeed})  # fmt: skip
        except ConfigError as error:
            record["scheduler_refused"] = str(error)
        seesaw = {"name": "seesaw", "lr_policy": {"name": "cosine", "total": NUM_SAMPLES, "unit": "samples"},
                  "base_batch_size": 8, "max_batch_size": 32, "multiple": 2}  # fmt: skip
        try:  # Seesaw's own LR next to a DeepSpeed scheduler
            build(os.path.join(output_dir, "refused_seesaw"), engine, batch_schedule=seesaw,
                  arg_overrides={"deepspeed": deepspeed})  # fmt: skip
        except ConfigError as error:
            record["seesaw_scheduler_refused"] = str(error)
    else:  # FSDP2 reduce-scattering only the last chunk: the same step, and no noise scale
        last = build(os.path.join(output_dir, "last"), engine, batch_schedule=32, fsdp_gradient_sync="last_chunk",
                     arg_overrides={"max_steps": 1})  # fmt: skip
        try:
            NoiseScaleCallback(last)
        except ConfigError as error:
            record["last_chunk_noise_refused"] = str(error)
        last.train()
        every_chunk = full_weights(noisy)
        record["last_chunk_max_diff"] = max(
            float((value - every_chunk[name]).abs().max()) for name, value in full_weights(last).items()
        )
        record["last_chunk_losses"] = losses(last)
        record["every_chunk_losses"] = losses(noisy)

    rank = trainer.args.process_index
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump(record, file)
    if rank == 0:
        torch.save(weights, os.path.join(output_dir, "params.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
