"""BatchRampTrainer under DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 on 2 CPU processes (gloo), measured side by side.

For each engine one ``torchrun --nproc_per_node 2`` launch runs, interleaved (``--repeats`` pairs after a warm-up
pair):

1. throughput at a constant global batch: samples/s of ``BatchRampTrainer`` (micro-chunks) / plain ``Trainer``
   (``gradient_accumulation_steps`` with the same micro-batch), per wall-clock second and per CPU second of rank 0
   (robust to other jobs on a shared machine); the median of the per-round ratios. Target >= 0.98 where both
   synchronise alike; under FSDP2 for both ``fsdp_gradient_sync`` modes (the plain Trainer's accumulation
   reduce-scatters only the last micro-batch, like ``"last_chunk"``);
2. FSDP2 only: the gradient bytes a rank holds after the first chunk's backward in each mode (sharded ``.grad``
   shards, plus FSDP's unsharded gradients), against the model's fp32 parameter bytes;
3. the sharpness probe (``SharpnessProbeCallback``, default ``avg`` metric, 16 probe samples) on the gathered
   (ZeRO-3) / unsharded (FSDP2) / plain (ZeRO-2) model, in step equivalents: probe seconds / seconds of one step.

Usage::

    python benchmarks/bench_sharded.py [--engines zero2 fsdp2 zero3] [--samples 256] [--hidden 128] [--repeats 3]

Writes ``benchmarks/results/sharded.json``. On GPUs run the same script with ``--nproc N`` (NCCL is chosen when
CUDA is available).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def engine_args(engine: str) -> dict:
    if engine == "none":
        return {}
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


def build(kind: str, engine: str, args, output_dir: str, **ramp_kwargs):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from hf_batchsched.assets import synthetic_lm_dataset, tiny_llama
    from hf_batchsched.trainer import BatchRampTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = args.batch // (args.micro * world)
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=accumulation if kind == "plain" else 1,
        num_train_epochs=1,
        learning_rate=1e-3,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() else None,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
        **engine_args(engine),
    )
    model = tiny_llama(seed=0, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=4,
                       vocab_size=args.vocab, max_position_embeddings=args.seq_len)  # fmt: skip
    dataset = synthetic_lm_dataset(args.samples, seq_len=args.seq_len, vocab_size=args.vocab)
    if kind == "plain":
        if engine == "fsdp2" and not torch.cuda.is_available():  # what HF_BATCHSCHED_FSDP_ON_CPU does for the ramp
            from hf_batchsched.trainer import enable_fsdp_on_cpu

            enable_fsdp_on_cpu(training_args)
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
        expected = {"none": None, "fsdp2": "fsdp"}.get(engine, "deepspeed")
        actual = "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else None
        assert actual == expected, f"the plain Trainer runs {actual}, not {engine}: the comparison would be unfair"
    else:
        trainer = BatchRampTrainer(model=model, args=training_args, train_dataset=dataset, batch_schedule=args.batch,
                                   max_micro_batch_size=args.micro, **ramp_kwargs)  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    return trainer


def timed_train(trainer) -> tuple[float, float, float]:
    """(samples/s wall, samples/s of rank-0 CPU time, seconds per optimizer step)."""
    torch.distributed.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    torch.distributed.barrier()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    samples = len(trainer.train_dataset)  # one pass, both trainers
    return samples / wall, samples / cpu, wall / trainer.state.global_step


class GradientBytes(TrainerCallback):
    """Micro-chunk listener: gradient bytes this rank holds after the first chunk's backward (FSDP2)."""

    def __init__(self):
        self.bytes: int | None = None

    def on_micro_chunk_end(self, trainer, chunk_index, num_chunks, chunk_num_samples):
        if chunk_index or self.bytes is not None:
            return
        from hf_batchsched.trainer import fsdp_gradient_bytes

        total = fsdp_gradient_bytes(trainer.model)
        self.bytes = total


def worker(args) -> None:
    torch.set_num_threads(1)
    engine = args.engine
    result: dict = {"engine": engine}
    with tempfile.TemporaryDirectory() as tmp:
        # 1. throughput, interleaved (the first round warms up); FSDP2: both gradient-sync modes against the plain
        # Trainer, whose accumulation reduce-scatters only the last micro-batch (accelerate's no_sync)
        variants = ["every_chunk", "last_chunk"] if engine == "fsdp2" else ["default"]
        ratios = {variant: {"wall": [], "cpu": []} for variant in variants}
        for repeat in range(args.repeats + 1):
            plain = timed_train(build("plain", engine, args, os.path.join(tmp, "plain")))
            for variant in variants:
                kwargs = {} if variant == "default" else {"fsdp_gradient_sync": variant}
                ramp = timed_train(build("ramp", engine, args, os.path.join(tmp, "ramp"), **kwargs))
                if repeat:
                    ratios[variant]["wall"].append(ramp[0] / plain[0])
                    ratios[variant]["cpu"].append(ramp[1] / plain[1])
        result["throughput_ratio"] = {
            variant: {kind: statistics.median(values) for kind, values in ratio.items()}
            for variant, ratio in ratios.items()
        }
        result["throughput_ratio_runs"] = ratios
        # 2. FSDP2: gradient bytes a rank holds after the first chunk, per sync mode
        if engine == "fsdp2":
            result["grad_bytes_after_chunk_1"] = {}
            for mode in ("every_chunk", "last_chunk"):
                trainer = build("ramp", engine, args, os.path.join(tmp, mode), fsdp_gradient_sync=mode)
                hook = GradientBytes()
                trainer.add_callback(hook)
                trainer.train()
                result["grad_bytes_after_chunk_1"][mode] = hook.bytes
            result["param_bytes"] = sum(p.numel() * 4 for p in build("plain", "none", args, tmp).model.parameters())
        # 3. sharpness probe cost in step equivalents (probe every 2 steps)
        from hf_batchsched.callbacks import SharpnessProbeCallback

        trainer = build("ramp", engine, args, os.path.join(tmp, "probe"))
        probe = SharpnessProbeCallback(trainer, every_n_steps=2, on_evaluate=False, budget=None)
        trainer.add_callback(probe)
        torch.distributed.barrier()
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
        step_seconds = (elapsed - probe.probe_seconds) / trainer.state.global_step
        result["probe_seconds"] = probe.probe_seconds / probe.num_probes
        result["step_seconds"] = step_seconds
        result["probe_step_equivalents"] = result["probe_seconds"] / step_seconds
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as file:
            json.dump(result, file)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", nargs="+", default=["zero2", "fsdp2", "zero3"])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="constant global batch")
    parser.add_argument("--micro", type=int, default=8, help="micro-batch per rank (2 chunks per rank at 32 / 2)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        worker(args)
        return 0
    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("engine", "out")}, "engines": {}}
    for engine in args.engines:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in
                         ("samples", "batch", "micro", "seq_len", "hidden", "vocab", "repeats")]  # fmt: skip
            command = [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), os.path.abspath(__file__),
                f"--engine={engine}", f"--out={out.name}", *forwarded,
            ]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS="1", HF_BATCHSCHED_FSDP_ON_CPU="1")
            subprocess.run(command, check=True, env=env, cwd=ROOT)
            results["engines"][engine] = json.load(open(out.name))
        print(json.dumps(results["engines"][engine], indent=2))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "sharded.json"), "w") as file:
        json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
