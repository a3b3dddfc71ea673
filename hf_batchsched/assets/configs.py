"""The demo's recipe settings, a flat recipe config (the keys of ``hf_batchsched.recipe``)."""

from __future__ import annotations

__all__ = ["DEMO_CONFIG"]

# The demo's recipe settings; recipes/configs/demo_cpu.yaml holds the same values with a comment per knob
# (tests/test_demo.py checks that the two agree).
DEMO_CONFIG: dict = {
    "model_name_or_path": None,
    "peft": "lora",
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    "max_seq_length": 64,
    "output_dir": "outputs/demo",
    "num_train_epochs": 1,
    "max_steps": -1,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 64,
    "max_eval_samples": 256,
    "learning_rate": 3e-3,
    "weight_decay": 0.0,
    "batch_schedule": {
        "name": "geometric",
        "unit": "samples",
        "start": 8,
        "factor": 2,
        "milestones": [1800, 3600],
        "max_size": 32,
    },
    "max_micro_batch_size": 8,
    "lr_policy": {"name": "warmup", "unit": "samples", "warmup": 400, "policy": "constant"},
    "sharpness": {"every_n_steps": 25, "budget": None},
    "eval_strategy": "steps",
    "eval_steps": 50,
    "logging_steps": 5,
    "save_strategy": "no",
    "report_to": ["tensorboard"],
    "seed": 0,
    "dataloader_num_workers": 0,
}
