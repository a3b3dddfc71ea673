"""Benchmarks on the demo task: the sharpness probe's overhead and what the adaptive batch schedule buys.

Run: ``.venv/bin/python benchmarks/bench_demo_task.py [--quick]``; writes ``benchmarks/results/demo_task.json``
(``--quick``: a smoke run on a shortened task, written to ``demo_task_quick.json``).

Both parts run the demo's stage 2 (``hf-batchsched demo``): the cached base model (``demo_base_model``), the demo's
corpus and tokenizer, and the recipe (``parse_config`` -> ``load_model_and_tokenizer`` -> ``load_data`` ->
``build_trainer``) with ``DEMO_CONFIG``, changed only where stated. One CPU thread (``torch.set_num_threads(1)``).

1. **Sharpness probe overhead** (issue 6): the demo fine-tune without the probe vs with ``SharpnessProbeCallback`` at
   its defaults (``avg``, every 500 steps, after each evaluation, 16 probe samples, ``budget=0.03``), and with the
   defaults but ``budget=None`` (every scheduled probe runs), at the demo's eval cadence (every 50 steps). Runs are
   interleaved (ABC CBA ABC) and repeated;
   reported: the probe's own measured time as % of the training wall time (same run), and the median wall-time
   difference of ``trainer.train()`` against the runs without the probe, with the per-repeat spread.
2. **Adaptive vs fixed batch** (issue 8): a fixed batch of 8 (the demo's start size) for one epoch vs
   ``AdaptiveBatchSchedule(8 -> max_size, lr_scaling="sqrt")`` fed by ``NoiseScaleCallback``, same data, same LR
   policy (the demo's: warmup over 400 samples, then constant 3e-3), micro-batch 4 for both (the noise-scale estimate
   needs at least two micro-chunks per step). The eval loss on the demo's held-out set (``max_eval_samples``) is
   measured every few optimizer steps, and every step near the target; reported: the optimizer updates (and samples,
   and training time without evaluations) the adaptive run needs to first reach the baseline's final eval loss, as
   ratios, for each seed. The adaptive run may use up to ``--adaptive-epochs`` epochs (a larger batch can need more
   samples for the same loss); if it never reaches the target, that is reported. A control for the first seed: a
   fixed batch of ``max_size`` from the start with the LR the adaptive run ends at (``3e-3 * sqrt(max_size / 8)``).

Prints README-ready tables at the end (``--from-json PATH`` reprints them from a results file).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import datasets
import torch
from transformers import PrinterCallback, TrainerCallback, set_seed
from transformers.utils import logging as hf_logging

from hf_batchsched.assets import DEMO_CONFIG, demo_base_model
from hf_batchsched.callbacks.sharpness import SharpnessProbeCallback
from hf_batchsched.recipe import build_trainer, load_data, load_model_and_tokenizer, parse_config

RESULTS = pathlib.Path(__file__).parent / "results" / "demo_task.json"
QUICK_RESULTS = RESULTS.with_name("demo_task_quick.json")

# --quick: the shortened task run_demo(fast=True) uses (40 steps, short eval, ramp scaled down), on the fast base.
QUICK_OVERRIDES = {
    "max_steps": 40,
    "max_eval_samples": 64,
    "eval_steps": 20,
    "logging_steps": 2,
    "batch_schedule": {"name": "geometric", "unit": "samples", "start": 8, "factor": 2, "milestones": [160, 320],
                       "max_size": 32},
}  # fmt: skip
QUICK_TRAIN_SAMPLES = 320  # --quick, adaptive part: a 40-step baseline epoch


def recipe_config(base_dir: pathlib.Path, output_dir: str, quick: bool, **overrides) -> dict:
    """``DEMO_CONFIG`` as ``run_demo`` sets it up (base model, output dir), plus ``overrides`` (``None`` removes)."""
    config = copy.deepcopy(DEMO_CONFIG)
    config.update(model_name_or_path=str(base_dir), output_dir=output_dir, disable_tqdm=True)
    if quick:
        config.update(copy.deepcopy(QUICK_OVERRIDES))
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


class Data:
    """The demo's tokenized train/eval datasets, built once (the recipe's ``load_data``) and shared by all runs."""

    def __init__(self):
        self._cache: dict = {}

    def get(self, args, tokenizer):
        key = (args.data.max_seq_length, args.data.max_train_samples, args.data.max_eval_samples)
        if key not in self._cache:
            self._cache[key] = load_data(args, tokenizer)
        return self._cache[key]


def make_trainer(config: dict, data: Data):
    args = parse_config(config)
    set_seed(args.training.seed)  # as run_demo: the LoRA init draws from the global RNG before the Trainer seeds it
    model, tokenizer = load_model_and_tokenizer(args)
    train_dataset, eval_dataset = data.get(args, tokenizer)
    trainer = build_trainer(args, model, tokenizer, train_dataset, eval_dataset)
    trainer.remove_callback(PrinterCallback)  # no per-log prints (disable_tqdm makes the Trainer print dicts)
    return trainer, eval_dataset


# ------------------------------------------------------------------------------------------------------------------
# Part 1: sharpness probe overhead
# ------------------------------------------------------------------------------------------------------------------


# variant -> the recipe's "sharpness" section: None drops it (no probe), {} is the callback at its defaults
PROBE_VARIANTS = {"without": None, "defaults": {}, "no_budget": {"budget": None}}


def sharpness_run(base_dir, data: Data, quick: bool, section: dict | None) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        config = recipe_config(base_dir, output_dir, quick, sharpness=section)
        trainer, _ = make_trainer(config, data)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        probe = next((c for c in trainer.callback_handler.callbacks if isinstance(c, SharpnessProbeCallback)), None)
        evals = [entry["eval_runtime"] for entry in trainer.state.log_history if "eval_runtime" in entry]
        row = {
            "train_wall_s": round(wall, 3),
            "optimizer_steps": trainer.state.global_step,
            "evaluations": len(evals),
            "eval_seconds": round(sum(evals), 3),
        }
        if probe is not None:
            row.update(
                num_probes=probe.num_probes,
                probe_seconds=round(probe.probe_seconds, 4),
                probe_pct_of_train=round(100 * probe.probe_seconds / wall, 3),
            )
        return row


def sharpness_overhead(base_dir, data: Data, quick: bool, repeats: int) -> dict:
    names = list(PROBE_VARIANTS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    order = []
    for repeat in range(repeats):  # A B C, C B A, A B C, ...: no variant always runs first or last (drift, warm-up)
        for name in names if repeat % 2 == 0 else names[::-1]:
            runs[name].append(sharpness_run(base_dir, data, quick, PROBE_VARIANTS[name]))
            order.append(name)
            print(f"  sharpness probe {name:20s} {runs[name][-1]}", flush=True)
    without = [r["train_wall_s"] for r in runs["without"]]
    median_without = statistics.median(without)
    out = {
        "setup": {
            "task": "demo stage 2 (DEMO_CONFIG via the recipe), one CPU thread"
            + (" (--quick: 40 steps)" if quick else ""),
            "probe": "SharpnessProbeCallback defaults: metrics=('avg',), every_n_steps=500, on_evaluate=True, "
            "num_probe_samples=16, probe_batch_size=8, budget=0.03 (no_budget: budget=None)",
            "eval_steps": recipe_config(base_dir, "x", quick)["eval_steps"],
            "repeats": repeats,
            "order": order,
        },
        "optimizer_steps": runs["without"][0]["optimizer_steps"],
        "evaluations": runs["without"][0]["evaluations"],
        "train_wall_s_without_median": round(median_without, 2),
        "wall_s_without": without,
        "eval_pct_of_train_median": round(
            statistics.median(100 * r["eval_seconds"] / r["train_wall_s"] for r in runs["without"]), 2
        ),
    }
    for name in names[1:]:
        walls = [r["train_wall_s"] for r in runs[name]]
        probe_pct = [r["probe_pct_of_train"] for r in runs[name]]
        # per repeat: each run against the "without" run of the same repeat (the ordering puts them close)
        diffs = [100 * (w - wo) / wo for w, wo in zip(walls, without)]
        out[name] = {
            "num_probes": [r["num_probes"] for r in runs[name]],
            "probe_seconds_median": round(statistics.median(r["probe_seconds"] for r in runs[name]), 3),
            "probe_pct_of_train_median": round(statistics.median(probe_pct), 3),
            "probe_pct_of_train_range": [min(probe_pct), max(probe_pct)],
            "train_wall_s_median": round(statistics.median(walls), 2),
            "wall_s": walls,
            "wall_diff_pct_of_medians": round(100 * (statistics.median(walls) - median_without) / median_without, 2),
            "wall_diff_pct_per_repeat": [round(d, 2) for d in diffs],
            "probe_seconds_per_probe": round(
                statistics.median(r["probe_seconds"] / max(r["num_probes"], 1) for r in runs[name]), 4
            ),
        }
    out["runs"] = runs
    return out


# ------------------------------------------------------------------------------------------------------------------
# Part 2: adaptive vs fixed batch
# ------------------------------------------------------------------------------------------------------------------


class EvalCurve(TrainerCallback):
    """Eval loss on the demo's held-out set every ``every`` optimizer steps (and at step 0 and the end).

    The loss is the mean over the eval samples of each sample's mean token loss (all sequences are full packed
    blocks, so this equals the mean token loss, the Trainer's ``eval_loss`` for equal batches). Model mode restored.
    With ``stop_below`` (the target loss) it evaluates every step once the last eval loss is within ``fine_margin``
    of the target (the first update at or below it is resolved exactly, at the cost of a few extra evaluations), and
    stops training once the target is reached and at least ``min_samples`` were consumed.
    """

    def __init__(
        self,
        trainer,
        eval_dataset,
        every: int,
        stop_below: float | None = None,
        min_samples: int = 0,
        fine_margin: float = 0.03,
    ):
        self.trainer, self.every = trainer, every
        self.stop_below, self.min_samples, self.fine_margin = stop_below, min_samples, fine_margin
        collate = trainer.data_collator
        rows = [eval_dataset[i] for i in range(len(eval_dataset))]
        self.batches = [collate(rows[i : i + 64]) for i in range(0, len(rows), 64)]
        self.curve: list[dict] = []
        self._start = 0.0
        self._eval_seconds = 0.0

    def _record(self, state) -> float:
        start = time.perf_counter()
        train_seconds = start - self._start - self._eval_seconds  # training wall time so far, evaluations excluded
        model = self.trainer.model
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.batches:
                total += float(model(**batch).loss) * len(batch["input_ids"])
                count += len(batch["input_ids"])
        model.train(was_training)
        loss = total / count
        self._eval_seconds += time.perf_counter() - start
        self.curve.append(
            {
                "step": state.global_step,
                "samples": int(self.trainer.clock.consumed_samples),
                "batch_size": int(self.trainer.batch_schedule(self.trainer.clock.consumed_samples)),
                "train_s": round(train_seconds, 3),
                "loss": round(loss, 5),
            }
        )
        return loss

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        self._record(state)

    def on_step_end(self, args, state, control, **kwargs):
        near = self.stop_below is not None and self.curve[-1]["loss"] <= self.stop_below + self.fine_margin
        if near or state.global_step % self.every == 0:
            loss = self._record(state)
            done = self.stop_below is not None and loss <= self.stop_below
            if done and self.trainer.clock.consumed_samples >= self.min_samples:
                control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.curve[-1]["step"] != state.global_step:
            self._record(state)


def batch_run(base_dir, data: Data, quick: bool, *, seed: int, schedule, epochs: float, every: int,
              stop_below: float | None = None, min_samples: int = 0, **overrides) -> dict:  # fmt: skip
    with tempfile.TemporaryDirectory() as output_dir:
        config = recipe_config(
            base_dir, output_dir, quick, seed=seed, batch_schedule=schedule, max_micro_batch_size=4,
            noise_scale={}, sharpness=None, eval_strategy="no", eval_steps=None, logging_steps=10**6,
            report_to="none", num_train_epochs=epochs, max_steps=-1,
            max_train_samples=QUICK_TRAIN_SAMPLES if quick else None, **overrides,
        )  # fmt: skip
        trainer, eval_dataset = make_trainer(config, data)
        evaluator = EvalCurve(trainer, eval_dataset, every, stop_below=stop_below, min_samples=min_samples)
        trainer.add_callback(evaluator)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        from hf_batchsched.callbacks.noise_scale import NoiseScaleCallback

        noise = next(c for c in trainer.callback_handler.callbacks if isinstance(c, NoiseScaleCallback))
        result = {
            "updates": trainer.clock.optimizer_steps,
            "samples": int(trainer.clock.consumed_samples),
            "train_samples_per_epoch": len(trainer.train_dataset),
            "eval_samples": len(eval_dataset),
            "final_eval_loss": evaluator.curve[-1]["loss"],
            "final_noise_scale": round(float(noise.estimator.noise_scale), 2),
            "wall_s": round(wall, 2),
            "curve": evaluator.curve,
        }
        events = getattr(trainer.batch_schedule, "events", None)
        if events is not None:
            result["events"] = [
                {"step": e.get("step"), "effective_from": e.get("effective_from"), "to": e.get("to"),
                 "noise_scale": round(float(e["noise_scale"]), 1) if "noise_scale" in e else None}
                for e in events
            ]  # fmt: skip
        return result


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((point for point in curve if point["loss"] <= target), None)


def reach_row(run: dict, target: float, baseline: dict) -> dict:
    """When ``run`` first reached ``target`` (the baseline's final eval loss), as ratios to the baseline."""
    reached = first_reaching(run["curve"], target)
    baseline_train_s = baseline["curve"][-1]["train_s"]
    return {
        "reached_at_update": None if reached is None else reached["step"],
        "reached_at_samples": None if reached is None else reached["samples"],
        "updates_ratio": None if reached is None else round(reached["step"] / baseline["updates"], 3),
        "samples_ratio": None if reached is None else round(reached["samples"] / baseline["samples"], 3),
        "train_time_ratio": None if reached is None else round(reached["train_s"] / baseline_train_s, 3),
        "final_eval_loss": run["final_eval_loss"],
        "updates_run": run["updates"],
        "samples_run": run["samples"],
    }


def adaptive_vs_fixed(base_dir, data: Data, quick: bool, seeds: list[int], max_size: int, adaptive_epochs: float,
                      every_fixed: int, every_adaptive: int, control_seeds: list[int]) -> dict:  # fmt: skip
    adaptive = {"name": "adaptive", "min_size": 8, "max_size": max_size, "lr_scaling": "sqrt"}
    per_seed = []
    for seed in seeds:
        baseline = batch_run(base_dir, data, quick, seed=seed, schedule=8, epochs=1, every=every_fixed)
        print(f"  fixed 8, seed {seed}: {baseline['updates']} updates, eval loss {baseline['final_eval_loss']:.4f}, "
              f"noise scale {baseline['final_noise_scale']}, {baseline['wall_s']} s", flush=True)  # fmt: skip
        target = baseline["final_eval_loss"]
        run = batch_run(
            base_dir, data, quick, seed=seed, schedule=adaptive, epochs=adaptive_epochs, every=every_adaptive,
            stop_below=target, min_samples=baseline["samples"],
        )  # fmt: skip
        reached = first_reaching(run["curve"], target)
        row_train_s = baseline["curve"][-1]["train_s"]
        at_one_epoch = [p for p in run["curve"] if p["samples"] <= baseline["samples"]][-1]
        row = {
            "seed": seed,
            "target_eval_loss": target,
            "baseline_updates": baseline["updates"],
            "baseline_samples": baseline["samples"],
            "baseline_train_s": baseline["curve"][-1]["train_s"],
            "adaptive_reached_at_update": None if reached is None else reached["step"],
            "adaptive_reached_at_samples": None if reached is None else reached["samples"],
            "updates_ratio": None if reached is None else round(reached["step"] / baseline["updates"], 3),
            "samples_ratio": None if reached is None else round(reached["samples"] / baseline["samples"], 3),
            "train_time_ratio": None if reached is None else round(reached["train_s"] / row_train_s, 3),
            "adaptive_eval_loss_after_one_epoch": at_one_epoch["loss"],
            "adaptive_updates_in_one_epoch": at_one_epoch["step"],
            "adaptive_final_eval_loss": run["final_eval_loss"],
            "adaptive_updates_run": run["updates"],
            "adaptive_samples_run": run["samples"],
            "adaptive_batch_sizes": [8] + [e["to"] for e in run["events"]],
            "adaptive_grew_at_samples": [e["effective_from"] for e in run["events"]],
            "runs": {"fixed_8": baseline, "adaptive_sqrt": run},
        }
        per_seed.append(row)
        print(f"  adaptive, seed {seed}: reached {target:.4f} at update {row['adaptive_reached_at_update']} "
              f"(updates ratio {row['updates_ratio']}, samples ratio {row['samples_ratio']}); sizes "
              f"{row['adaptive_batch_sizes']}, {run['wall_s']} s", flush=True)  # fmt: skip
        if seed in control_seeds:  # is it the adaptivity, or just the big batch with its sqrt-scaled LR?
            lr = DEMO_CONFIG["learning_rate"] * (max_size / 8) ** 0.5
            control = batch_run(
                base_dir, data, quick, seed=seed, schedule=max_size, epochs=adaptive_epochs, every=every_adaptive,
                stop_below=target, min_samples=baseline["samples"], learning_rate=lr,
            )  # fmt: skip
            row[f"control_fixed_{max_size}"] = {"learning_rate": lr, **reach_row(control, target, baseline)}
            row["runs"][f"fixed_{max_size}"] = control
            print(
                f"    control fixed {max_size} (lr {lr:.4g}), seed {seed}: {row[f'control_fixed_{max_size}']}",
                flush=True,
            )
    reached = [r for r in per_seed if r["updates_ratio"] is not None]
    summary = {
        "seeds": seeds,
        "reached_in": f"{len(reached)}/{len(per_seed)} seeds",
        "updates_ratio_per_seed": [r["updates_ratio"] for r in per_seed],
        "samples_ratio_per_seed": [r["samples_ratio"] for r in per_seed],
        "train_time_ratio_per_seed": [r["train_time_ratio"] for r in per_seed],
    }
    if reached:
        summary["updates_ratio_median"] = statistics.median(r["updates_ratio"] for r in reached)
        summary["samples_ratio_median"] = statistics.median(r["samples_ratio"] for r in reached)
    return {
        "setup": {
            "task": "demo stage 2 (DEMO_CONFIG via the recipe: LoRA r=16 on the cached base, the demo corpus), "
            "one CPU thread" + (" (--quick: shortened)" if quick else ""),
            "baseline": "constant batch 8, 1 epoch",
            "adaptive": f"AdaptiveBatchSchedule(min_size=8, max_size={max_size}, lr_scaling='sqrt'), defaults "
            f"otherwise (growth x2, threshold 1.05, patience 3, warmup_updates 10, beta 0.99); up to "
            f"{adaptive_epochs} epochs, stopped once it reaches the target after at least one epoch",
            "both": "NoiseScaleCallback (every step), micro-batch 4, AdamW, the demo's lr_policy (warmup 400 samples, "
            "constant 3e-3), no sharpness probe, same seed per pair (LoRA init and data order)",
            "control": f"seeds {control_seeds}: a fixed batch of {max_size} from the start, LR 3e-3 x "
            f"sqrt({max_size}/8) (what the adaptive run ends at), same stopping rule",
            "eval": f"held-out eval set ({per_seed[0]['runs']['fixed_8']['eval_samples']} samples of 64 tokens) "
            f"every {every_fixed} updates (fixed) / every {every_adaptive} updates (adaptive; every update once "
            "within 0.03 of the target, so the first update at or below it is exact)",
        },
        "summary": summary,
        "per_seed": per_seed,
    }


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


def markdown(result: dict) -> str:
    """README-ready tables of a result (what ``--from-json`` prints)."""
    lines = []
    part = result.get("sharpness")
    if part:
        lines += [
            f"Sharpness probe on the demo's stage 2 ({part['optimizer_steps']} steps, {part['evaluations']} "
            f"evaluations, which take {part['eval_pct_of_train_median']:.1f} % of training; "
            f"{part['setup']['repeats']} interleaved repeats):",
            "",
            "| run | probes | probe time, % of training (median, range) | training wall (median) "
            "| wall vs without (median; per repeat) |",
            "|---|---|---|---|---|",
            f"| no probe | — | — | {part['train_wall_s_without_median']:.1f} s | — |",
        ]
        for name, label in (("defaults", "defaults (`budget=0.03`)"), ("no_budget", "defaults but `budget=None`")):
            row = part[name]
            per = ", ".join(f"{d:+.1f}" for d in row["wall_diff_pct_per_repeat"])
            lines.append(
                f"| {label} | {statistics.median(row['num_probes']):g} | **{row['probe_pct_of_train_median']:.2f} %** "
                f"({_range(row['probe_pct_of_train_range'])}) | {row['train_wall_s_median']:.1f} s "
                f"| {row['wall_diff_pct_of_medians']:+.1f} % ({per}) |"
            )
        lines.append("")
    part = result.get("adaptive")
    if part:
        lines += [
            "Adaptive vs fixed batch on the demo's stage 2 (target: the fixed-8 baseline's final eval loss after one "
            "epoch):",
            "",
            "| seed | run | final eval loss | updates to reach the target | updates ratio | samples ratio "
            "| train-time ratio | batch sizes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in part["per_seed"]:
            base = row["runs"]["fixed_8"]
            sizes = ", ".join(map(str, row["adaptive_batch_sizes"]))
            reached = row["adaptive_reached_at_update"]
            lines.append(
                f"| {row['seed']} | fixed 8 (baseline) | {row['target_eval_loss']:.4f} | {base['updates']} | 1 | 1 "
                f"| 1 | 8 |"
            )
            lines.append(
                f'| | adaptive, `lr_scaling="sqrt"` | {row["adaptive_final_eval_loss"]:.4f} '
                f"| {reached if reached is not None else 'not reached'} "
                f"| **{row['updates_ratio']}×** | {row['samples_ratio']}× | {row['train_time_ratio']}× | {sizes} |"
            )
            for key, control in row.items():
                if key.startswith("control_fixed_"):
                    size = key.rsplit("_", 1)[1]
                    lines.append(
                        f"| | fixed {size}, LR × √{int(size) // 8} (control) | {control['final_eval_loss']:.4f} "
                        f"| {control['reached_at_update'] or 'not reached'} | {control['updates_ratio']}× "
                        f"| {control['samples_ratio']}× | {control['train_time_ratio']}× | {size} |"
                    )
        summary = part["summary"]
        lines += [
            "",
            f"Reached in {summary['reached_in']}; updates ratio median {summary.get('updates_ratio_median')}, "
            f"samples ratio median {summary.get('samples_ratio_median')}.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on a shortened task (under 2 minutes)")
    parser.add_argument("--part", choices=("all", "sharpness", "adaptive"), default="all")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of the probe variants (default 3; quick 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="adaptive part seeds (default 0 1 2)")
    parser.add_argument("--max-size", type=int, default=64, help="the adaptive schedule's cap (default 64)")
    parser.add_argument("--adaptive-epochs", type=float, default=2.0)
    parser.add_argument("--from-json", metavar="PATH", help="print the README tables of a results file and exit")
    args = parser.parse_args()
    if args.from_json:
        print(markdown(json.loads(pathlib.Path(args.from_json).read_text())))
        return
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("hf_batchsched").setLevel(logging.ERROR)

    started = time.perf_counter()
    base_dir, trained = demo_base_model(fast=args.quick)
    commit = subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "hf_batchsched/demo.py", "hf_batchsched/recipe", "hf_batchsched/assets"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_demo_task.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": 1,
            "cpus": os.cpu_count(),
        },  # fmt: skip
        "git_head": commit,
        "demo_or_recipe_modified_in_worktree": bool(dirty),
        "base_model": {
            "dir": base_dir.name,
            "trained_now": trained,
            "seconds": round(time.perf_counter() - started, 1),
        },  # fmt: skip
    }
    print(f"base model {base_dir.name} ({'trained' if trained else 'cached'}); HEAD {commit}", flush=True)
    data = Data()
    if args.part in ("all", "sharpness"):
        part = sharpness_overhead(base_dir, data, args.quick, args.repeats or (1 if args.quick else 3))
        result["sharpness"] = part
        print(
            f"sharpness probe over {part['optimizer_steps']} steps, {part['evaluations']} evals (evals take "
            f"{part['eval_pct_of_train_median']:.1f}% of training); training without the probe "
            f"{part['train_wall_s_without_median']:.1f} s (median of {part['wall_s_without']})",
            flush=True,
        )
        for name in list(PROBE_VARIANTS)[1:]:
            row = part[name]
            print(
                f"  {name}: {row['num_probes']} probes, probe time {row['probe_pct_of_train_median']:.2f}% of "
                f"training (range {row['probe_pct_of_train_range']}); wall {row['train_wall_s_median']:.1f} s, "
                f"{row['wall_diff_pct_of_medians']:+.2f}% vs without (per repeat {row['wall_diff_pct_per_repeat']})",
                flush=True,
            )
    if args.part in ("all", "adaptive"):
        seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
        part = adaptive_vs_fixed(
            base_dir, data, args.quick, seeds, max_size=args.max_size, adaptive_epochs=args.adaptive_epochs,
            every_fixed=5 if args.quick else 50, every_adaptive=5, control_seeds=seeds[:1],
        )  # fmt: skip
        result["adaptive"] = part
        print(f"adaptive vs fixed 8: {json.dumps(part['summary'])}", flush=True)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    path = QUICK_RESULTS if args.quick else RESULTS
    if args.part != "all" and path.exists():  # one part rerun: keep the other part's results
        previous = json.loads(path.read_text())
        other = "adaptive" if args.part == "sharpness" else "sharpness"
        if other in previous:
            result[other] = previous[other]
            result.setdefault("earlier_runs", {})[other] = {
                key: previous.get(key) for key in ("command", "git_head", "wall_seconds")
            }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {path} ({result['wall_seconds']} s)\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
