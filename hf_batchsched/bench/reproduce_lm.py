"""Batch schedules on a language model: Seesaw (Meterez et al. 2025) and batch warmup from the measured critical
batch size (Merrill et al. 2025), against a tuned constant batch with cosine decay, on CPU.

Two tasks, both on the demo's offline text and tokenizer (``hf_batchsched.demo``), sequences of 64 tokens:

- ``pretrain``: ``demo_model`` (a 0.46 M-parameter Llama) trained from scratch on the standard-library code
  (``demo_corpus(max_train_chars=None)``, about 1.2 M tokens), eval on the held-out modules;
- ``lora``: the demo's LoRA fine-tune (r=16 on every linear layer and the head) of the demo base model on the
  demo's training code, eval on the held-out modules.

Every run is a ``BatchRampTrainer`` on the samples clock with AdamW (weight decay ``weight_decay``), the same data
budget ``total_samples`` and a linear warmup then cosine decay to 0. The arms:

- ``constant``: batch ``B0`` throughout, at the best LR of a sweep (``lrs``, seed 0, also constant ``B0``);
- ``seesaw``: ``hf_batchsched.seesaw`` of that cosine policy, batch doubled each time the cosine halves, capped at
  ``max_batch_size``;
- ``cbs_warmup``: batch ``B0 * 2**k`` up to the critical batch size measured at the reference run's checkpoints
  (``critical_batch_size`` at ``cbs_fractions`` of the data), LR coupled ``sqrt``, the same cosine;
- ``seesaw_coupled``: ``seesaw`` plus the weight-decay (constant time scale) and beta (constant half-life) couplings.

The critical-batch experiment measures ``B_crit`` and the noise scale ``B_simple`` at the reference run's checkpoints
(the sweep's best-LR run) for both tasks; the branches of ``B0`` run at the reference run's LR at the checkpoint
(its peak LR for the initial model), larger batches at ``sqrt(B / B0)`` times that. The LR range test
(``bench.range_test``) is run on the same task at ``B0`` and its suggestion set against the sweep's best LR.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
import tempfile
import time
from dataclasses import dataclass

import torch

from ..critical_batch import _eval_loss, critical_batch_size, windows
from ..errors import ConfigError, check_choice
from .reproduce import _mean_std, _pyplot, _write, quiet_cpu_args

__all__ = ["ARMS", "LMConfig", "TASKS", "reproduce_critical_batch", "reproduce_seesaw"]

TASKS = ("pretrain", "lora")
ARMS = ("constant", "seesaw", "cbs_warmup", "seesaw_coupled")


@dataclass(frozen=True)
class LMConfig:
    """Sizes of the language-model reproductions (the defaults are the full run; ``quick()`` the CI one)."""

    total_samples: int = 8192
    base_batch_size: int = 16
    max_batch_size: int = 128
    max_micro_batch_size: int = 32
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_samples: int = 256
    cbs_fractions: tuple[float, ...] = (0.0, 0.25, 0.5)
    cbs_batch_sizes: tuple[int, ...] = (16, 32, 64, 128)
    cbs_budget_samples: int = 2048
    cbs_tolerance: float = 0.01
    range_test_steps: int = 30
    seq_length: int = 64
    fast_base: bool = False
    tasks: tuple[str, ...] = TASKS

    @classmethod
    def quick(cls) -> LMConfig:
        return cls(
            total_samples=256,
            base_batch_size=8,
            max_batch_size=32,
            max_micro_batch_size=32,
            lrs=(3e-3, 1e-2),
            seeds=(0, 1),
            eval_samples=32,
            cbs_fractions=(0.0, 0.5),
            cbs_batch_sizes=(8, 16, 32),
            cbs_budget_samples=64,
            range_test_steps=8,
            fast_base=True,
        )

    @property
    def warmup_samples(self) -> int:
        return max(1, round(self.warmup_fraction * self.total_samples))


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


def _ids(tokenizer, texts) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return ids


def _task_data(task: str, config: LMConfig) -> dict:
    """Token rows and a model factory for ``task``."""
    from .. import assets as demo

    base_path, _ = demo.demo_base_model(fast=config.fast_base)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    if task == "pretrain":
        train, held_out = demo.demo_corpus(max_train_chars=None)
        if config.total_samples <= 256:  # quick: a prefix of the text is enough
            train = demo.demo_corpus()[0]

        def make_model(seed: int):
            return demo.demo_model(len(tokenizer), seed=seed)

    else:
        train, held_out = demo.demo_corpus()

        def make_model(seed: int):
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(base_path))
            cfg = demo.DEMO_CONFIG
            lora = LoraConfig(
                r=cfg["lora_r"],
                lora_alpha=cfg["lora_alpha"],
                lora_dropout=0.0,
                target_modules=list(cfg["lora_target_modules"]),
                task_type="CAUSAL_LM",
            )
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                return get_peft_model(model, lora)

    train_rows = windows(_ids(tokenizer, train), config.seq_length)
    eval_rows = windows(_ids(tokenizer, held_out), config.seq_length)[: config.eval_samples]
    if len(train_rows) < config.max_batch_size:
        raise ConfigError(
            f"{task}: {len(train_rows)} training rows, fewer than max_batch_size {config.max_batch_size}"
        )
    return {"train_rows": train_rows, "eval_rows": eval_rows, "make_model": make_model}


def _cosine(config: LMConfig):
    from ..schedules.lr import lr_policy_from_config

    warmup = config.warmup_samples
    return lr_policy_from_config(
        {
            "name": "warmup",
            "unit": "samples",
            "warmup": warmup,
            "policy": {"name": "cosine", "total": config.total_samples - warmup},
        }
    )


def _arm_schedules(arm: str, config: LMConfig, cbs_schedule=None) -> dict:
    from ..coupling import Coupling
    from ..schedules.seesaw_pair import seesaw

    cosine = _cosine(config)
    if arm == "constant":
        return {"batch_schedule": config.base_batch_size, "lr_policy": cosine}
    if arm in ("seesaw", "seesaw_coupled"):
        batch, _ = seesaw(
            cosine, config.base_batch_size, config.max_batch_size, warmup=config.warmup_samples, unit="samples"
        )
        couple = Coupling(weight_decay=True, betas=True) if arm == "seesaw_coupled" else None
        return {"batch_schedule": batch, "lr_policy": None, "couple": couple}
    return {"batch_schedule": cbs_schedule, "lr_policy": cosine, "couple": Coupling(lr="sqrt")}


class _Snapshots:
    """A callback that keeps ``(model state, optimizer state)`` when the consumed samples first reach each fraction."""

    def __init__(self, fractions, total):
        from transformers import TrainerCallback

        marks = sorted(round(f * total) for f in fractions if f > 0)
        store: dict = {}
        self.store = store

        class _Cb(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
                consumed = trainer_ref["trainer"].clock.consumed_samples
                for mark in marks:
                    if mark not in store and consumed >= mark:
                        store[mark] = (
                            copy.deepcopy(model.state_dict()),
                            copy.deepcopy(optimizer.state_dict()),
                            consumed,
                        )

        trainer_ref: dict = {}
        self.trainer_ref = trainer_ref
        self.callback = _Cb()


def _trainer(model, data, config, *, learning_rate, seed, batch_schedule, lr_policy, couple=None, callbacks=()):
    from transformers import PrinterCallback

    from ..schedules.seesaw_pair import SeesawBatch
    from ..trainer import BatchRampTrainer

    output_dir = tempfile.mkdtemp(prefix="hf-batchsched-lm-")
    args = quiet_cpu_args(
        output_dir,
        own_lr=lr_policy is not None or isinstance(batch_schedule, SeesawBatch),
        num_train_epochs=config.total_samples / len(data["train_rows"]),
        per_device_train_batch_size=config.max_micro_batch_size,
        learning_rate=learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=1.0,
        seed=seed,
    )
    trainer = BatchRampTrainer(
        model=model,
        args=args,
        train_dataset=_Rows(data["train_rows"]),
        callbacks=list(callbacks),
        batch_schedule=batch_schedule,
        max_micro_batch_size=config.max_micro_batch_size,
        lr_policy=lr_policy,
        couple=couple,
        seed=seed,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer, output_dir


def _train(data, config, *, learning_rate, seed, schedules, snapshots: _Snapshots | None = None) -> dict:
    import shutil

    model = data["make_model"](seed)
    callbacks = [snapshots.callback] if snapshots is not None else []
    trainer, output_dir = _trainer(
        model, data, config, learning_rate=learning_rate, seed=seed, callbacks=callbacks, **schedules
    )
    if snapshots is not None:
        snapshots.trainer_ref["trainer"] = trainer
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    plan = list(trainer.ramp_plan)
    return {
        "eval_loss": _eval_loss(model, data["eval_rows"]),
        "optimizer_steps": trainer.clock.optimizer_steps,
        "samples": trainer.clock.consumed_samples,
        "tokens": trainer.clock.consumed_samples * config.seq_length,
        "batch_sizes": sorted(set(plan)),
        "seconds": round(time.perf_counter() - start, 2),
        "model": model,
    }


# --------------------------------------------------------------------------------------------------
# The experiments
# --------------------------------------------------------------------------------------------------


def _sweep_and_cbs(task: str, data: dict, config: LMConfig) -> dict:
    """LR sweep at constant ``B0`` (seed 0) and the critical batch size at the best run's checkpoints."""
    sweep, best = {}, None
    snapshots_by_lr = {}
    for lr in config.lrs:
        snapshots = _Snapshots(config.cbs_fractions, config.total_samples)
        run = _train(
            data,
            config,
            learning_rate=lr,
            seed=config.seeds[0],
            schedules=_arm_schedules("constant", config),
            snapshots=snapshots,
        )
        run.pop("model")
        sweep[lr] = run
        snapshots_by_lr[lr] = snapshots
        if best is None or run["eval_loss"] < sweep[best]["eval_loss"]:
            best = lr
    cbs = []
    cosine = _cosine(config)
    init = data["make_model"](config.seeds[0])
    for fraction in sorted(config.cbs_fractions):
        mark = round(fraction * config.total_samples)
        model, state, consumed = copy.deepcopy(init), None, 0
        if fraction > 0:
            model_state, state, consumed = snapshots_by_lr[best].store[mark]
            model.load_state_dict(model_state)
        result = critical_batch_size(
            model,
            data["train_rows"],
            data["eval_rows"],
            batch_sizes=config.cbs_batch_sizes,
            budget_samples=config.cbs_budget_samples,
            # the reference run's LR at the checkpoint (the peak for the initial model, before its warmup)
            learning_rate=best * cosine(max(consumed, config.warmup_samples)),
            lr_rule="sqrt",
            tolerance=config.cbs_tolerance,
            optimizer_state=state,
            weight_decay=config.weight_decay,
            seed=config.seeds[0],
        )
        row = result.to_dict()
        row.update(fraction=fraction, samples=consumed, tokens=consumed * config.seq_length)
        row["extra"]["reference_lr"] = best
        cbs.append(row)
    return {"sweep": {str(lr): run for lr, run in sweep.items()}, "best_lr": best, "critical_batch": cbs}


def cbs_warmup_schedule(cbs_rows, config: LMConfig):
    """``PiecewiseBatch``: from each measured point on, ``B0 * 2**k`` up to its ``B_crit`` (never decreasing,
    capped at ``max_batch_size``)."""
    from ..schedules.batch import PiecewiseBatch

    thresholds, sizes, current = [], [], config.base_batch_size
    for row in sorted(cbs_rows, key=lambda r: r["samples"]):
        target = config.base_batch_size
        while target * 2 <= min(row["b_crit"], config.max_batch_size):
            target *= 2
        current = max(current, target)
        if not sizes or current != sizes[-1]:
            thresholds.append(0 if not thresholds else row["samples"])
            sizes.append(current)
    return PiecewiseBatch(tuple(thresholds), tuple(sizes), unit="samples")


def _range_test(data, config: LMConfig, seed: int) -> dict:
    import shutil

    from .range_test import lr_range_test

    model = data["make_model"](seed)
    trainer, output_dir = _trainer(
        model, data, config, learning_rate=1e-3, seed=seed, batch_schedule=config.base_batch_size, lr_policy=None
    )
    try:
        result = lr_range_test(
            trainer, start_lr=1e-5, end_lr=1.0, num_steps=config.range_test_steps, skip_start=2, skip_end=1
        )
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    return {
        "suggestion": result.suggestion,
        "rule": result.rule,
        "safety_factor": result.safety_factor,
        "diverged_at": result.diverged_at,
        "lrs": result.lrs,
        "smoothed_losses": result.smoothed_losses,
    }


def _name(stem: str, config: LMConfig) -> str:
    """``stem`` for both tasks, ``stem-<task>`` for one."""
    return stem if tuple(config.tasks) == TASKS else "-".join([stem, *config.tasks])


def _rel(x: float, ref: float) -> float:
    return (x - ref) / ref


def _check(config: LMConfig) -> None:
    for task in config.tasks:
        check_choice("task", task, TASKS)
    if config.base_batch_size not in config.cbs_batch_sizes:
        raise ConfigError("cbs_batch_sizes must include base_batch_size (the branch all others are compared with)")


def _measure(task: str, config: LMConfig) -> tuple[dict, dict]:
    """``(data, measured)`` of one task: the LR sweep, ``B_crit`` along the best run, and the LR range test."""
    data = _task_data(task, config)
    measured = _sweep_and_cbs(task, data, config)
    measured["range_test"] = _range_test(data, config, config.seeds[0])
    return data, measured


def reproduce_critical_batch(output_dir: str | os.PathLike, config: LMConfig | None = None, plot: bool = True) -> dict:
    """``B_crit`` (branch runs) and ``B_simple`` (noise scale) along the reference run of each task; also the LR
    sweep and range test on the same task. Writes ``critical_batch.json`` (and ``critical_batch.png``)."""
    config = config or LMConfig()
    _check(config)
    result = {"config": dataclasses.asdict(config), "tasks": {}}
    for task in config.tasks:
        _, measured = _measure(task, config)
        measured["range_test"]["best_sweep_lr"] = measured["best_lr"]
        result["tasks"][task] = measured
    name = _name("critical_batch", config)
    _write(output_dir, name, result)
    if plot:
        _plot_cbs(result, pathlib.Path(output_dir) / f"{name}.png")
    return result


def reproduce_seesaw(output_dir: str | os.PathLike, config: LMConfig | None = None, plot: bool = True) -> dict:
    """The four arms x seeds on each task (see the module doc). Writes ``seesaw.json`` (and ``seesaw.png``)."""
    config = config or LMConfig()
    _check(config)
    result = {"config": dataclasses.asdict(config), "tasks": {}}
    for task in config.tasks:
        data, measured = _measure(task, config)
        best = measured["best_lr"]
        cbs_schedule = cbs_warmup_schedule(measured["critical_batch"], config)
        arms = {}
        for arm in ARMS:
            runs = []
            for seed in config.seeds:
                if arm == "constant" and seed == config.seeds[0]:
                    runs.append(measured["sweep"][str(best)])  # the sweep's best run is this arm's first seed
                    continue
                run = _train(
                    data, config, learning_rate=best, seed=seed, schedules=_arm_schedules(arm, config, cbs_schedule)
                )
                run.pop("model")
                runs.append(run)
            mean, std = _mean_std([r["eval_loss"] for r in runs])
            arms[arm] = {
                "eval_loss": mean,
                "eval_loss_std": std,
                "eval_losses": [r["eval_loss"] for r in runs],
                "optimizer_steps": runs[0]["optimizer_steps"],
                "tokens": runs[0]["tokens"],
                "batch_sizes": runs[0]["batch_sizes"],
                "seconds": sum(r["seconds"] for r in runs),
            }
        arms["cbs_warmup"]["schedule"] = {
            "thresholds": list(cbs_schedule.thresholds),
            "sizes": list(cbs_schedule.sizes),
        }
        a = arms["constant"]
        summary = {}
        for arm in ARMS[1:]:
            summary[arm] = {
                "eval_loss_rel_diff_vs_constant": _rel(arms[arm]["eval_loss"], a["eval_loss"]),
                "step_reduction_vs_constant": 1 - arms[arm]["optimizer_steps"] / a["optimizer_steps"],
            }
        s = summary["seesaw"]
        summary["target_met"] = s["eval_loss_rel_diff_vs_constant"] <= 0.005 and s["step_reduction_vs_constant"] >= 0.3
        measured.update(arms=arms, summary=summary)
        result["tasks"][task] = measured
    name = _name("seesaw", config)
    _write(output_dir, name, result)
    if plot:
        _plot_seesaw(result, pathlib.Path(output_dir) / f"{name}.png")
        _plot_cbs(result, pathlib.Path(output_dir) / f"{name}_critical_batch.png")
    return result


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _plot_cbs(result: dict, path: pathlib.Path) -> None:
    from .plots import save_figure

    plt = _pyplot()
    tasks = result["tasks"]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, (task, measured) in zip(axes[0], tasks.items()):
        rows = measured["critical_batch"]
        tokens = [r["tokens"] / 1e6 for r in rows]
        ax.plot(tokens, [r["b_crit"] for r in rows], marker="o", label="B_crit (branch runs)")
        ax.plot(tokens, [r["noise_scale"] or float("nan") for r in rows], marker="s", label="B_simple (noise scale)")
        ax.set_yscale("log")
        ax.set_xlabel("tokens trained (M)")
        ax.set_ylabel("batch size (sequences)")
        ax.set_title(f"{task}: critical batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    save_figure(figure, str(path))


def _plot_seesaw(result: dict, path: pathlib.Path) -> None:
    from .plots import save_figure

    plt = _pyplot()
    tasks = result["tasks"]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, (task, measured) in zip(axes[0], tasks.items()):
        for arm, cell in measured["arms"].items():
            ax.errorbar(
                [cell["optimizer_steps"]],
                [cell["eval_loss"]],
                yerr=[cell["eval_loss_std"]],
                fmt="o",
                capsize=4,
                label=arm,
            )
        ax.set_xlabel("optimizer steps (equal tokens)")
        ax.set_ylabel("final eval loss (mean +- std)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    save_figure(figure, str(path))


def headline(name: str, result: dict) -> str:
    """One line per task for the command's output."""
    lines = []
    for task, m in result["tasks"].items():
        rt = m["range_test"]
        lr_part = (
            f"range test suggests {rt['suggestion']:.3g} vs sweep best {m['best_lr']:.3g}"
            if rt["suggestion"]
            else f"range test gave no suggestion; sweep best {m['best_lr']:.3g}"
        )
        cbs = ", ".join(
            f"{r['tokens'] / 1e6:.2f}M tok: B_crit {r['b_crit']} / B_simple {_num(r['noise_scale'])}"
            for r in m["critical_batch"]
        )
        if name == "critical-batch":
            lines.append(f"{task}: {cbs}; {lr_part}")
            continue
        cells = "; ".join(
            f"{arm} {c['eval_loss']:.4f}+-{c['eval_loss_std']:.4f} in {c['optimizer_steps']} steps"
            for arm, c in m["arms"].items()
        )
        s = m["summary"]["seesaw"]
        lines.append(
            f"{task}: {cells}; seesaw vs constant {100 * s['eval_loss_rel_diff_vs_constant']:+.2f}% eval loss, "
            f"{100 * s['step_reduction_vs_constant']:.0f}% fewer steps (target met: {m['summary']['target_met']}); "
            f"{lr_part}"
        )
    return "\n".join(lines)


def _num(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}"


def markdown(result: dict) -> str:
    """The README tables: arms (eval loss mean +- std, optimizer steps, tokens) and the critical batch sizes."""
    lines = []
    for task, m in result["tasks"].items():
        if "arms" in m:
            lines += [
                f"**{task}** (best swept LR {m['best_lr']:g})",
                "",
                "| arm | eval loss (mean +- std) | vs constant (paired) | optimizer steps | tokens | batch sizes |",
                "|---|---|---|---|---|---|",
            ]
            for arm, c in m["arms"].items():
                rel = m["summary"].get(arm, {}).get("eval_loss_rel_diff_vs_constant")
                paired = [x / c0 - 1 for x, c0 in zip(c["eval_losses"], m["arms"]["constant"]["eval_losses"])]
                p_mean, p_std = _mean_std(paired)
                rel_text = (
                    "" if rel is None else f"{100 * rel:+.2f}% (paired {100 * p_mean:+.2f} +- {100 * p_std:.2f}%)"
                )
                lines.append(
                    f"| {arm} | {c['eval_loss']:.4f} +- {c['eval_loss_std']:.4f} | {rel_text} | "
                    f"{c['optimizer_steps']} | {c['tokens']:,} | {', '.join(map(str, c['batch_sizes']))} |"
                )
            lines.append("")
        lines += [
            f"| {task}: tokens trained | B_crit | B_simple | loss at checkpoint | branch losses |",
            "|---|---|---|---|---|",
        ]
        for r in m["critical_batch"]:
            losses = ", ".join(f"{b}: {x:.4f}" for b, x in zip(r["batch_sizes"], r["losses"]))
            lines.append(
                f"| {r['tokens']:,} | {r['b_crit']} | {_num(r['noise_scale'])} | {r['loss_start']:.4f} | {losses} |"
            )
        sweep = ", ".join(f"{float(lr):g}: {run['eval_loss']:.4f}" for lr, run in m["sweep"].items())
        rt = m["range_test"]
        lines += [
            "",
            f"LR sweep (constant batch, seed {result['config']['seeds'][0]}): {sweep}; range test "
            f"suggestion {_num(rt['suggestion'])}.",
            "",
        ]
    return "\n".join(lines)
