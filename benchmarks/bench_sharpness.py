"""Sharpness probe benchmark: metric costs, Lanczos vs power iteration, callback overhead.

Run: ``.venv/bin/python benchmarks/bench_sharpness.py [--quick]``; writes ``benchmarks/results/sharpness.json``.

1. Cost of each metric in forward+backward equivalents over the same probe set (timed side by side).
2. HVPs to reach 1% of the converged lambda_max: Lanczos vs power iteration (PyHessian's method), same model.
3. Overhead of ``SharpnessProbeCallback`` at its default cadence, as % of training wall time (target <= 3%).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import torch

from hf_batchsched.assets import synthetic_lm_dataset, tiny_llama
from hf_batchsched.probes.hvp import ProbeObjective
from hf_batchsched.probes.lanczos import lanczos, power_iteration
from hf_batchsched.probes.preserve import preserved_model_state
from hf_batchsched.probes.sharpness import estimate_sharpness

RESULTS = pathlib.Path(__file__).parent / "results" / "sharpness.json"


def lora_model(seed: int = 0, **config):
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(
            tiny_llama(seed=seed, **config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        )
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # a trained-looking adapter (B = 0 makes several metrics degenerate)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def probe_batches(num_batches: int, batch_size: int, seq_len: int):
    ds = synthetic_lm_dataset(num_samples=num_batches * batch_size, seq_len=seq_len)
    return [
        {k: torch.tensor(ds[i : i + batch_size][k]) for k in ds.column_names}
        for i in range(0, num_batches * batch_size, batch_size)
    ]


def train_adapter(model, batches, steps: int = 200, lr: float = 1e-2):
    """Fit the adapter to the probe set with Adam: near a minimum the top of the spectrum is positive.

    At initialisation the tiny Llama's Hessian has lambda_min ~ -lambda_max (-0.41 vs 0.41): power iteration,
    which finds the largest *magnitude*, then never approaches lambda_max; it is reported separately.
    """
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = sum(model(**batch).loss for batch in batches) / len(batches)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def metric_costs(model, batches, repeats: int) -> dict:
    def forward():
        with torch.no_grad():
            for batch in batches:
                model(**batch)

    def forward_backward():
        for batch in batches:
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    fwd = timed(forward, repeats)
    fwd_bwd = timed(forward_backward, repeats)
    cases = {
        "avg (num_samples=8)": (("avg",), {}),
        "avg merged": (("avg",), {"merged": True}),
        "keskar (p=100, maxiter=10)": (("keskar",), {}),
        "lambda_max exact (20 Lanczos steps)": (("lambda_max",), {"hvp_method": "exact", "tol": 1e-12}),
        "lambda_max fd (20 Lanczos steps)": (("lambda_max",), {"hvp_method": "fd", "tol": 1e-12}),
        "trace exact (10 probes)": (("trace",), {"hvp_method": "exact"}),
    }
    out = {"forward_s": fwd, "forward_backward_s": fwd_bwd, "metrics": {}}
    for name, (metrics, options) in cases.items():
        seconds = timed(lambda m=metrics, o=options: estimate_sharpness(model, batches, m, **o), max(1, repeats // 3))
        result = estimate_sharpness(model, batches, metrics, **options)
        out["metrics"][name] = {
            "seconds": seconds,
            "fwd_bwd_equivalents": seconds / fwd_bwd,
            "value": {k: v for k, v in result.items() if k != "loss"},
        }
    # one HVP of each kind
    with preserved_model_state(model):
        for method in ("exact", "fd"):
            objective = ProbeObjective(model, batches, hvp_method=method)
            vector = torch.randn(objective.numel, generator=torch.Generator().manual_seed(0))
            out[f"hvp_{method}_fwd_bwd_equivalents"] = timed(lambda o=objective, v=vector: o.hvp(v), repeats) / fwd_bwd
            objective.close()
    return out


def lanczos_vs_power(model, batches, seeds=(0, 1, 2, 3, 4), power_steps: int = 200) -> dict:
    rows = []
    with preserved_model_state(model):
        objective = ProbeObjective(model, batches, hvp_method="exact")
        like = torch.zeros(1, dtype=objective.dtype)
        reference = lanczos(objective.hvp, objective.numel, 80, 1e-12, torch.Generator().manual_seed(99), like)
        top = reference.eigenvalue

        def first_within(history):
            return next((i + 1 for i, v in enumerate(history) if abs(v - top) <= 0.01 * abs(top)), None)

        for seed in seeds:
            lz = lanczos(objective.hvp, objective.numel, 60, 1e-12, torch.Generator().manual_seed(seed), like)
            pw = power_iteration(
                objective.hvp, objective.numel, power_steps, 0.0, torch.Generator().manual_seed(seed), like
            )
            rows.append(
                {
                    "seed": seed,
                    "lanczos_hvps_to_1pct": first_within(lz.history),
                    "power_hvps_to_1pct": first_within(pw.history),
                    "power_final": pw.history[-1],
                    "power_stop_rule_hvps": _pyhessian_stop(pw.history),
                    "power_stop_rule_value": pw.history[_pyhessian_stop(pw.history) - 1],
                }
            )
        objective.close()
    ratios = [r["lanczos_hvps_to_1pct"] / r["power_hvps_to_1pct"] for r in rows if r["power_hvps_to_1pct"]]
    return {
        "converged_lambda_max": top,
        "converged_ritz_residual": reference.residual,
        "runs": rows,
        "max_ratio_lanczos_over_power": max(ratios) if ratios else None,
        "median_ratio_lanczos_over_power": statistics.median(ratios) if ratios else None,
        "total_ratio_lanczos_over_power": (
            sum(r["lanczos_hvps_to_1pct"] for r in rows) / sum(r["power_hvps_to_1pct"] for r in rows)
            if len(ratios) == len(rows)
            else None
        ),
        "power_steps_cap": power_steps,
    }


def _pyhessian_stop(history, tol: float = 1e-3) -> int:
    """Where PyHessian's rule (relative change < 1e-3) would have stopped power iteration."""
    for i in range(1, len(history)):
        if abs(history[i] - history[i - 1]) / (abs(history[i - 1]) + 1e-6) < tol:
            return i + 1
    return len(history)


def callback_overhead(max_steps: int) -> dict:
    from transformers import Trainer, TrainingArguments

    from hf_batchsched.callbacks.sharpness import SharpnessProbeCallback

    ds = synthetic_lm_dataset(num_samples=256, seq_len=32)

    def run(with_probe: bool, directory: str):
        args = TrainingArguments(
            output_dir=directory,
            max_steps=max_steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            logging_steps=50,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=lora_model(), args=args, train_dataset=ds)
        callback = None
        if with_probe:
            callback = SharpnessProbeCallback(trainer)  # defaults: avg, every 500 steps, 16 samples
            trainer.add_callback(callback)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        return wall, callback

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # base, probe, base: the faster base absorbs warm-up effects
        base_wall = run(False, tmp)[0]
        probe_wall, callback = run(True, tmp)
        base_wall = min(base_wall, run(False, tmp)[0])
    return {
        "max_steps": max_steps,
        "num_probes": callback.num_probes,
        "probe_seconds": callback.probe_seconds,
        "train_wall_with_probe_s": probe_wall,
        "train_wall_without_probe_s": base_wall,
        "overhead_pct_measured_probe_time": 100 * callback.probe_seconds / probe_wall,
        "overhead_pct_wall_difference": 100 * (probe_wall - base_wall) / base_wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps (smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 7
    model_config = {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128}
    model = lora_model(**model_config)
    batches = probe_batches(num_batches=2, batch_size=8, seq_len=32)
    results = {
        "device": "cpu",
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": args.threads,
        "model": {
            **model_config,
            "lora_r": 8,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "probe_set": "2 batches x 8 samples x 32 tokens",
        },
        "lanczos_vs_power_at_init": lanczos_vs_power(model, batches, power_steps=100),
    }
    train_adapter(model, batches)
    results.update(
        {
            "costs": metric_costs(model, batches, repeats),
            "lanczos_vs_power": lanczos_vs_power(model, batches, power_steps=100 if args.quick else 200),
            "callback_overhead": callback_overhead(max_steps=500 if args.quick else 1000),
        }
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    costs = results["costs"]
    print(f"forward {costs['forward_s'] * 1e3:.1f} ms, forward+backward {costs['forward_backward_s'] * 1e3:.1f} ms")
    print(f"{'metric':40s} {'seconds':>8s} {'fwd+bwd eq.':>12s}")
    for name, row in costs["metrics"].items():
        print(f"{name:40s} {row['seconds']:8.3f} {row['fwd_bwd_equivalents']:12.1f}")
    print(f"one HVP: exact {costs['hvp_exact_fwd_bwd_equivalents']:.2f}, fd {costs['hvp_fd_fwd_bwd_equivalents']:.2f}")
    for key in ("lanczos_vs_power_at_init", "lanczos_vs_power"):
        lvp = results[key]
        print(f"{key}: lambda_max (converged) = {lvp['converged_lambda_max']:.6g}")
        for row in lvp["runs"]:
            print(
                f"  seed {row['seed']}: HVPs to 1% - Lanczos {row['lanczos_hvps_to_1pct']}, "
                f"power {row['power_hvps_to_1pct']} (PyHessian stop at {row['power_stop_rule_hvps']}: "
                f"{row['power_stop_rule_value']:.6g})"
            )
        print(
            f"  Lanczos/power HVP ratio: total {lvp['total_ratio_lanczos_over_power']}, "
            f"median {lvp['median_ratio_lanczos_over_power']}, max {lvp['max_ratio_lanczos_over_power']}"
        )
    cb = results["callback_overhead"]
    print(
        f"callback overhead over {cb['max_steps']} steps ({cb['num_probes']} probes): "
        f"{cb['overhead_pct_measured_probe_time']:.2f}% measured probe time, "
        f"{cb['overhead_pct_wall_difference']:.2f}% wall difference"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
