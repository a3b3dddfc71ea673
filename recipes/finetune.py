"""Fine-tune a causal LM with a batch-size ramp, an LR policy and hf-batchsched's callbacks.

One process (CPU or one GPU):

    hf-batchsched finetune --config recipes/configs/demo_cpu.yaml
    python recipes/finetune.py --config recipes/configs/demo_cpu.yaml --max_steps 20

One GPU, a 7-8B model with LoRA or QLoRA:

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/finetune.py \
        --config recipes/configs/llama8b_lora.yaml
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/finetune.py \
        --config recipes/configs/llama8b_qlora.yaml

Several GPUs (DDP; FSDP with recipes/accelerate/fsdp.yaml), or torchrun:

    accelerate launch --config_file recipes/accelerate/multi_gpu_ddp.yaml recipes/finetune.py \
        --config recipes/configs/ddp_lora.yaml
    torchrun --nproc_per_node 4 recipes/finetune.py --config recipes/configs/ddp_lora.yaml

Resume a run that stopped (a crash, a preemption) from the newest complete checkpoint in its output_dir, or from a
given checkpoint; a resume whose batch plan differs from the checkpoint's is refused unless
``--allow_schedule_change_on_resume true``:

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/finetune.py \
        --config recipes/configs/llama8b_lora.yaml --resume_from_checkpoint true

Any key of the config can be overridden on the command line (``--learning_rate 1e-4``, ``--peft lora``,
``--batch_schedule '{"name": "constant", "size": 64}'``, or just ``--batch_schedule 64``). Bad keys or values stop
with one line naming the key (exit code 2). The builders live in ``hf_batchsched.recipe``; ``hf-batchsched finetune``
runs the same steps (``hf_batchsched.recipe.finetune``).
"""

from __future__ import annotations

import sys

from hf_batchsched.errors import ConfigError
from hf_batchsched.recipe import (
    build_trainer,
    check_before_start,
    load_data,
    load_model_and_tokenizer,
    parse_args,
    remove_if_left_empty,
    seed,
)


def main(argv: list[str] | None = None):
    """Parse, build, train, save; returns the trainer."""
    # Config: YAML + command-line overrides, validated (unknown keys, bad values, QLoRA without a GPU).
    args = parse_args(argv)
    # Refused before anything is loaded or written: a launch that is not distributed, a resume with no checkpoint.
    resume = check_before_start(args)
    with remove_if_left_empty(args.training.output_dir):  # a run that fails early leaves no empty output_dir
        # Seeded first: LoRA's initial adapter weights come from the global generator.
        seed(args)
        # Model and tokenizer (+ LoRA / QLoRA adapters); the embedded small Llama when no model is named.
        model, tokenizer = load_model_and_tokenizer(args)
        # Data: hub dataset, local JSON/JSONL or the embedded text, tokenized (and packed) to max_seq_length.
        train_dataset, eval_dataset = load_data(args, tokenizer)
        # Trainer: BatchRampTrainer with the batch ramp and LR policy, plus every configured callback.
        trainer = build_trainer(args, model, tokenizer, train_dataset, eval_dataset)
        # Train (resuming if asked), evaluate, save.
        metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
        if eval_dataset is not None:
            metrics.update(trainer.evaluate())
        if args.training.save_strategy != "no":
            trainer.save_model()
        trainer.log_metrics("final", metrics)
    return trainer


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        sys.exit(2)
