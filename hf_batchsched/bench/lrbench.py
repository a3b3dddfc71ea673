"""LRBench for the Hugging Face Trainer: compare candidate LR policies as short fine-tunes on one task.

Each candidate (any ``hf_batchsched`` LR policy config) trains the same model from the same initialisation on the
same data in the same order (``BatchRampTrainer(lr_policy=...)``), for the same number of optimizer updates, and
is measured:

| metric | meaning |
|---|---|
| ``final_eval_loss`` | held-out loss after the last update |
| ``best_eval_loss`` | lowest held-out loss over the run's evaluations |
| ``final_train_loss`` | loss on a training subset (as large as the eval set) after the last update |
| ``train_eval_gap`` | ``final_eval_loss - final_train_loss`` (LRBench's "robustness") |
| ``optimizer_updates`` | optimizer steps taken |
| ``wall_time_s`` | training wall time (evaluations included) |
| ``sharpness`` | ``lambda_max`` of the final point on one eval batch (with ``sharpness: true``) |

Candidates are ranked by a utility the user chooses (``rank_by``; lower is better unless ``rank_mode: max``): a
metric name, a registered utility (``UTILITIES``), or an arithmetic expression over metric names
(``"best_eval_loss + 0.5 * train_eval_gap"``), evaluated safely (numbers, metric names, ``+ - * / **``, ``abs``,
``min``, ``max``, ``log``, ``sqrt``; nothing else). With ``halving: true`` candidates go through successive halving
(Jamieson & Talwalkar 2016): every round trains the remaining candidates with the current budget, keeps the better
half, and doubles the budget, until one is left. Policies on the ``fraction`` unit stretch with the budget.

Outputs (``write_reports``): ``results.md``, ``results.csv``, ``results.json`` (with every curve),
``lr_curves.png`` and ``loss_curves.png``.

The task (what every candidate trains) comes from one of two sections:

- ``task:`` (the default) needs no network: a tiny Llama (``hf_batchsched.assets.tiny_llama``) on
  ``synthetic_lm_dataset``; ``task.model`` may name a local model folder and ``task.dataset`` a local JSON/JSONL
  file (``input_ids`` rows, or ``text`` rows tokenised with the model's tokenizer); ``training:`` holds the
  ``TrainingArguments``.
- ``recipe:`` the user's own fine-tune, built by the recipe (``hf_batchsched.recipe``): a path to a recipe YAML
  (relative to the lrbench config file, else to the working directory) or an inline recipe mapping, with
  ``recipe_overrides:`` on top. Any causal LM by name or path, hub or local data, LoRA/QLoRA, the batch ramp and the
  callbacks all apply. Every candidate gets a fresh model and trainer with the same seed (set before loading, so
  LoRA adapters start identical too), its own ``lr_policy`` and the round's ``max_steps``; ``training:`` then takes
  only ``max_steps`` (unset: the recipe's own ``max_steps``, which must be > 0).

Internally a task is a factory ``make_trainer(policy, max_steps, eval_steps, run_dir) -> Trainer`` (``build_task``);
the runner measures whatever trainer it returns, on its ``eval_dataset`` and a train subset of the same size.

Files: ``lrbench_config`` (defaults, utilities, validation), ``lrbench_tasks`` (the trainer factories), this module
(running and ranking), ``lrbench_report`` (the reports).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .lrbench_config import METRIC_NAMES, evaluate_utility, load_lrbench_config
from .lrbench_report import write_reports
from .lrbench_tasks import build_task

__all__ = ["CandidateResult", "rank_results", "run_candidate", "run_lrbench"]


@dataclass
class CandidateResult:
    """One candidate's run: its metrics, its utility and its curves."""

    name: str
    policy: dict
    round: int = 0
    budget_steps: int = 0
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    final_train_loss: float | None = None
    train_eval_gap: float | None = None
    optimizer_updates: int = 0
    wall_time_s: float = 0.0
    sharpness: float | None = None
    utility: float | None = None
    curves: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        """``METRIC_NAMES`` -> value."""
        return {name: getattr(self, name) for name in METRIC_NAMES}


def _sharpness(model, trainer, eval_dataset) -> float:
    """``lambda_max`` of ``model`` on the first eval batch, moved to the trainer's device."""
    from accelerate.utils import send_to_device

    from ..probes.sharpness import estimate_sharpness

    batch = next(iter(trainer.get_eval_dataloader(eval_dataset)))
    batch = send_to_device(batch, trainer.args.device)
    return float(estimate_sharpness(model, [batch], ("lambda_max",))["lambda_max"])


def run_candidate(
    name: str,
    policy: dict,
    config: Mapping,
    budget_steps: int,
    output_dir: str,
    round_index: int = 0,
    make_trainer: Callable | None = None,
) -> CandidateResult:
    """Train one candidate for ``budget_steps`` updates and measure it (see the module docstring).

    ``make_trainer`` is the task's trainer factory (``build_task(config)``, built here when not given).
    """
    from transformers import PrinterCallback, TrainerCallback

    make_trainer = make_trainer if make_trainer is not None else build_task(config)
    eval_steps = max(1, budget_steps // int(config["num_evals"]))
    run_dir = os.path.join(output_dir, "runs", f"{name}-r{round_index}")

    class _LRRecorder(TrainerCallback):
        def __init__(self):
            self.lrs: list[float] = []

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    trainer = make_trainer(policy, budget_steps, eval_steps, run_dir)
    train_dataset, eval_dataset = trainer.train_dataset, trainer.eval_dataset
    trainer.remove_callback(PrinterCallback)
    recorder = _LRRecorder()
    trainer.add_callback(recorder)
    start = time.perf_counter()
    trainer.train()
    history = trainer.state.log_history
    evals = [(log["step"], log["eval_loss"]) for log in history if "eval_loss" in log]
    if not evals or evals[-1][0] != trainer.state.global_step:
        metrics = trainer.evaluate()
        evals.append((trainer.state.global_step, metrics["eval_loss"]))
    wall_time = time.perf_counter() - start
    train_subset = train_dataset.select(range(min(len(eval_dataset), len(train_dataset))))
    final_train_loss = trainer.evaluate(train_subset, metric_key_prefix="train_subset")["train_subset_loss"]
    result = CandidateResult(
        name=name,
        policy=dict(policy),
        round=round_index,
        budget_steps=budget_steps,
        final_eval_loss=float(evals[-1][1]),
        best_eval_loss=float(min(loss for _, loss in evals)),
        final_train_loss=float(final_train_loss),
        optimizer_updates=int(trainer.state.global_step),
        wall_time_s=round(wall_time, 3),
        curves={
            "lr": recorder.lrs,
            "train_loss": [(log["step"], log["loss"]) for log in history if "loss" in log],
            "eval_loss": evals,
        },
    )
    result.train_eval_gap = result.final_eval_loss - result.final_train_loss
    if config["sharpness"]:
        result.sharpness = _sharpness(trainer.model, trainer, eval_dataset)
    del trainer  # free the model (and its GPU memory) before the next candidate
    return result


def rank_results(results: list[CandidateResult], rank_by: str, rank_mode: str = "min") -> list[CandidateResult]:
    """Compute each result's utility and sort best first (non-finite utilities last)."""
    for result in results:
        result.utility = evaluate_utility(rank_by, result.metrics())
    sign = 1.0 if rank_mode == "min" else -1.0

    def key(result):
        value = result.utility
        return (not math.isfinite(value), sign * value if math.isfinite(value) else 0.0)

    return sorted(results, key=key)


def run_lrbench(config: str | Mapping, output_dir: str, log=print, config_dir: str | None = None) -> dict:
    """Run the benchmark described by ``config`` and write the reports to ``output_dir``.

    ``config_dir`` is where a relative ``recipe:`` path is looked up first (``load_lrbench_config``).

    Returns:
        `dict`: ``{"ranking": [CandidateResult, ...] (best first), "all_runs": [...], "config": ..., "files": ...}``.
    """
    config = load_lrbench_config(config, config_dir)
    os.makedirs(output_dir, exist_ok=True)
    make_trainer = build_task(config)
    candidates = [
        (str(c.get("name") or c["policy"].get("name", f"candidate_{i}")), dict(c["policy"]))
        for i, c in enumerate(config["candidates"])
    ]
    budget = int(config["training"]["max_steps"])
    all_runs: list[CandidateResult] = []
    round_index = 0
    while True:
        results = []
        for name, policy in candidates:
            result = run_candidate(name, policy, config, budget, output_dir, round_index, make_trainer)
            results.append(result)
            log(
                f"[lrbench] round {round_index} budget {budget}: {name}: best eval loss {result.best_eval_loss:.4f}, "
                f"final {result.final_eval_loss:.4f}, {result.wall_time_s:.1f}s"
            )
        all_runs.extend(results)
        ranked = rank_results(results, config["rank_by"], config["rank_mode"])
        if not config["halving"] or len(ranked) <= 1:
            break
        keep = math.ceil(len(ranked) / 2)
        kept = {result.name for result in ranked[:keep]}
        candidates = [(name, policy) for name, policy in candidates if name in kept]
        budget *= 2
        round_index += 1
    # Final ranking: candidates that survived longer rank above those eliminated earlier.
    latest = {}
    for run in all_runs:
        latest[run.name] = run
    final: list[CandidateResult] = []
    for reached in sorted({run.round for run in latest.values()}, reverse=True):
        final += rank_results(
            [run for run in latest.values() if run.round == reached], config["rank_by"], config["rank_mode"]
        )
    files = write_reports(final, all_runs, config, output_dir)
    return {"ranking": final, "all_runs": all_runs, "config": config, "files": files}
