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
"""

from __future__ import annotations

import ast
import csv
import json
import math
import operator
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from ..errors import ConfigError, check_choice
from ..schedules.base import Registry

__all__ = [
    "METRIC_NAMES",
    "UTILITIES",
    "CandidateResult",
    "build_task",
    "evaluate_utility",
    "load_lrbench_config",
    "rank_results",
    "recipe_run_config",
    "run_candidate",
    "run_lrbench",
    "write_reports",
]

METRIC_NAMES = (
    "final_eval_loss",
    "best_eval_loss",
    "final_train_loss",
    "train_eval_gap",
    "optimizer_updates",
    "wall_time_s",
    "sharpness",
)

DEFAULT_CONFIG = {
    "task": {
        "model": "tiny",
        "model_config": {},
        "dataset": "synthetic",
        "num_train_samples": 256,
        "num_eval_samples": 32,
        "seq_len": 16,
    },
    "training": {
        "learning_rate": 3e-3,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 32,
        "max_steps": 30,
        "weight_decay": 0.0,
    },
    "num_evals": 5,
    "rank_by": "best_eval_loss",
    "rank_mode": "min",
    "halving": False,
    "sharpness": False,
    "seed": 0,
}

# --------------------------------------------------------------------------------------------------
# Utilities: registered, or a safely evaluated expression
# --------------------------------------------------------------------------------------------------

UTILITIES = Registry("utility")


@UTILITIES.register("best_eval_loss")
def best_eval_loss(metrics: Mapping) -> float:
    """The lowest held-out loss of the run."""
    return metrics["best_eval_loss"]


@UTILITIES.register("final_eval_loss")
def final_eval_loss(metrics: Mapping) -> float:
    """The held-out loss at the end of the run."""
    return metrics["final_eval_loss"]


@UTILITIES.register("robust_eval_loss")
def robust_eval_loss(metrics: Mapping) -> float:
    """Final eval loss plus the train-eval gap when positive (penalises overfitting, LRBench's robustness)."""
    return metrics["final_eval_loss"] + max(metrics["train_eval_gap"], 0.0)


@UTILITIES.register("loss_per_update")
def loss_per_update(metrics: Mapping) -> float:
    """Best eval loss times log(updates): rewards reaching a low loss in fewer updates."""
    return metrics["best_eval_loss"] * math.log(max(metrics["optimizer_updates"], 2))


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_BINARY[ast.Pow] = operator.pow
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS = {"abs": abs, "min": min, "max": max, "log": math.log, "sqrt": math.sqrt}


def _compile_expression(expression: str) -> ast.Expression:
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as error:
        raise ConfigError(f"rank_by expression {expression!r} is not valid Python arithmetic: {error.msg}") from None
    for node in ast.walk(tree):
        allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Call)
        if not isinstance(node, allowed + tuple(_BINARY) + tuple(_UNARY)):
            raise ConfigError(
                f"rank_by expression {expression!r} uses {type(node).__name__}; only numbers, metric names "
                f"({', '.join(METRIC_NAMES)}), + - * / **, and {', '.join(_FUNCTIONS)} are allowed"
            )
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float)):
            raise ConfigError(f"rank_by expression {expression!r}: only numeric constants are allowed")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS):
            raise ConfigError(f"rank_by expression {expression!r}: only {', '.join(_FUNCTIONS)} may be called")
        if isinstance(node, ast.Call) and node.keywords:
            raise ConfigError(f"rank_by expression {expression!r}: keyword arguments are not allowed")
        if isinstance(node, ast.Name) and node.id not in METRIC_NAMES and node.id not in _FUNCTIONS:
            raise ConfigError(
                f"rank_by expression {expression!r} names {node.id!r}, which is not a metric; metrics: "
                f"{', '.join(METRIC_NAMES)}"
            )
    return tree


def evaluate_utility(rank_by: str, metrics: Mapping) -> float:
    """The utility ``rank_by`` (a registered utility, a metric name or an expression) of one candidate's metrics.

    >>> m = {"best_eval_loss": 2.0, "final_eval_loss": 2.5, "train_eval_gap": 0.3, "optimizer_updates": 10}
    >>> evaluate_utility("best_eval_loss", m), evaluate_utility("final_eval_loss + 2 * max(train_eval_gap, 0)", m)
    (2.0, 3.1)
    >>> evaluate_utility("open('x')", m)
    Traceback (most recent call last):
    ...
    hf_batchsched.errors.ConfigError: rank_by expression "open('x')": only abs, min, max, log, sqrt may be called
    """
    if rank_by in UTILITIES:
        return float(UTILITIES.get(rank_by)(metrics))
    tree = _compile_expression(rank_by)

    def visit(node):
        if isinstance(node, ast.Expression):
            return visit(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            value = metrics.get(node.id)
            if value is None:
                raise ConfigError(
                    f"rank_by uses {node.id!r}, which was not measured (enable it, e.g. sharpness: true)"
                )
            return value
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](visit(node.left), visit(node.right))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](visit(node.operand))
        return _FUNCTIONS[node.func.id](*(visit(arg) for arg in node.args))

    return float(visit(tree))


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _merge(defaults: Mapping, overrides: Mapping) -> dict:
    merged = dict(defaults)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(defaults.get(key), Mapping):
            merged[key] = _merge(defaults[key], value)
        else:
            merged[key] = value
    return merged


RECIPE_KEYS = ("recipe", "recipe_overrides")
# Recipe settings an lrbench run uses unless the recipe_overrides say otherwise: a loss point per update for the
# curves, no checkpoints, no per-run logging integrations, no progress bars.
RECIPE_RUN_DEFAULTS = {"logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True}


def _resolve_recipe(recipe, config_dir: str | None) -> dict:
    """The recipe mapping: ``recipe`` itself, or the YAML file it names (relative to ``config_dir``, then cwd)."""
    from ..recipe import load_config_file

    if isinstance(recipe, Mapping):
        return dict(recipe)
    if not isinstance(recipe, str) or not recipe:
        raise ConfigError(f"recipe must be a path to a recipe YAML or an inline recipe mapping, got {recipe!r}")
    candidates = [recipe] if os.path.isabs(recipe) else [os.path.join(config_dir or ".", recipe), recipe]
    for path in candidates:
        if os.path.isfile(path):
            return load_config_file(path)
    where = " or ".join(repr(os.path.normpath(path)) for path in dict.fromkeys(candidates))
    raise ConfigError(f"recipe file {recipe!r} not found (looked for {where}); give a path or an inline mapping")


def recipe_run_config(config: Mapping, policy: Mapping, max_steps: int, eval_steps: int, run_dir: str) -> dict:
    """The flat recipe config of one lrbench run: the recipe, ``RECIPE_RUN_DEFAULTS``, ``recipe_overrides``, then
    what lrbench sets for every candidate (its LR policy, the budget, the evaluation cadence, the seed)."""
    return {
        **config["recipe"],
        **RECIPE_RUN_DEFAULTS,
        **config["recipe_overrides"],
        "lr_policy": dict(policy),
        "max_steps": int(max_steps),
        "eval_strategy": "steps",
        "eval_steps": int(eval_steps),
        "output_dir": run_dir,
        "seed": int(config["seed"]),
    }


def load_lrbench_config(config: str | Mapping, config_dir: str | None = None) -> dict:
    """Read (YAML file or dict), fill defaults and validate an lrbench config; bad input raises ``ConfigError``.

    Args:
        config (`str` or `Mapping`): a YAML file or the config itself.
        config_dir (`str`, *optional*): where a relative ``recipe:`` path is looked up first (then the working
            directory); defaults to the YAML file's folder when ``config`` is a path.
    """
    from ..schedules.lr import lr_policy_from_config

    if isinstance(config, str):
        import yaml

        if not os.path.isfile(config):
            raise FileNotFoundError(f"lrbench config {config!r} does not exist")
        config_dir = config_dir if config_dir is not None else os.path.dirname(os.path.abspath(config))
        with open(config) as file:
            config = yaml.safe_load(file) or {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"an lrbench config must be a mapping, got {type(config).__name__}")
    valid = ("candidates", *DEFAULT_CONFIG, *RECIPE_KEYS)
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ConfigError(f"unknown lrbench config key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    uses_recipe = config.get("recipe") is not None
    if uses_recipe and "task" in config:
        raise ConfigError("an lrbench config takes either 'task' or 'recipe', not both; remove one of them")
    if "recipe_overrides" in config and not uses_recipe:
        raise ConfigError("'recipe_overrides' needs a 'recipe' to override; add 'recipe: path/to/recipe.yaml'")
    if uses_recipe:
        training = dict(config.get("training") or {})
        extra = sorted(set(training) - {"max_steps"})
        if extra:
            raise ConfigError(
                f"with 'recipe', training takes only max_steps (got {', '.join(extra)}); put TrainingArguments "
                "in the recipe or under recipe_overrides"
            )
        config = {key: value for key, value in config.items() if key != "training"}
    merged = _merge(DEFAULT_CONFIG, config)
    candidates = merged.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        raise ConfigError("an lrbench config needs 'candidates': a non-empty list of {name, policy} entries")
    names = set()
    for index, candidate in enumerate(candidates):
        if not isinstance(candidate, Mapping) or "policy" not in candidate:
            raise ConfigError(f"candidates[{index}] must be a mapping with a 'policy' (and optionally a 'name')")
        name = str(candidate.get("name") or candidate["policy"].get("name", f"candidate_{index}"))
        if name in names:
            raise ConfigError(f"two candidates are named {name!r}; give each a unique 'name'")
        names.add(name)
        lr_policy_from_config(candidate["policy"])  # validate now, before any training
    check_choice("rank_mode", merged["rank_mode"], ("min", "max"))
    rank_by = merged["rank_by"]
    if not isinstance(rank_by, str):
        raise ConfigError(f"rank_by must be a string (a metric, utility or expression), got {rank_by!r}")
    if rank_by not in UTILITIES:
        _compile_expression(rank_by)
    if not isinstance(merged["num_evals"], int) or merged["num_evals"] < 1:
        raise ConfigError(f"num_evals must be a positive integer, got {merged['num_evals']!r}")
    if uses_recipe:
        _check_recipe(merged, training.get("max_steps"), config_dir)
    training = merged["training"]
    if not isinstance(training.get("max_steps"), int) or training["max_steps"] < 1:
        raise ConfigError(f"training.max_steps must be a positive integer, got {training.get('max_steps')!r}")
    return merged


def _check_recipe(merged: dict, max_steps, config_dir: str | None) -> None:
    """Resolve ``recipe``, settle the first-round budget and validate the recipe (``ConfigError`` naming the key)."""
    from ..recipe import parse_config

    merged["task"] = None
    merged["recipe"] = _resolve_recipe(merged["recipe"], config_dir)
    overrides = merged.get("recipe_overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"recipe_overrides must be a mapping of recipe keys to values, got {overrides!r}")
    merged["recipe_overrides"] = dict(overrides)
    if max_steps is None:
        max_steps = {**merged["recipe"], **merged["recipe_overrides"]}.get("max_steps")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ConfigError(
                f"the recipe's max_steps is {max_steps!r}; lrbench needs a step budget: set training.max_steps "
                "(or max_steps under recipe_overrides, or --max-steps)"
            )
    merged["training"] = {"max_steps": max_steps}
    if isinstance(max_steps, int) and max_steps >= 1:
        policy = merged["candidates"][0]["policy"]
        parse_config(recipe_run_config(merged, policy, max_steps, 1, os.path.join("outputs", "lrbench")))


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


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
        return {name: getattr(self, name) for name in METRIC_NAMES}


def _build_task(task: Mapping, seed: int):
    """``(make_model, train, eval)`` of the ``task:`` section (also used by ``hf-batchsched range-test``)."""
    from ..assets import synthetic_lm_dataset, tiny_llama

    if task is None:
        raise ConfigError("this config takes its task from 'recipe:'; only lrbench supports that, use a 'task:' here")
    model_name, dataset_name = task["model"], task["dataset"]
    if model_name == "tiny":
        model_config = dict(task.get("model_config") or {})

        def make_model():
            return tiny_llama(seed=seed, **model_config)

        vocab_size = model_config.get("vocab_size", 128)
        tokenizer = None
    else:
        if not os.path.isdir(model_name):
            raise ConfigError(
                f"task.model {model_name!r} is not a local folder; lrbench runs offline: use 'tiny' or a folder "
                "with a saved model (save_pretrained)"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        def make_model():
            import torch

            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_pretrained(model_name)

        tokenizer = AutoTokenizer.from_pretrained(model_name) if dataset_name != "synthetic" else None
        vocab_size = None
    if dataset_name == "synthetic":
        if vocab_size is None:
            from transformers import AutoConfig

            vocab_size = AutoConfig.from_pretrained(model_name).vocab_size
        train = synthetic_lm_dataset(task["num_train_samples"], task["seq_len"], vocab_size, seed=seed)
        evaluation = synthetic_lm_dataset(task["num_eval_samples"], task["seq_len"], vocab_size, seed=seed + 1)
        return make_model, train, evaluation
    if not os.path.isfile(dataset_name):
        raise ConfigError(f"task.dataset {dataset_name!r} must be 'synthetic' or a local .json/.jsonl file")
    import datasets

    rows = datasets.load_dataset("json", data_files=dataset_name, split="train")
    if "input_ids" not in rows.column_names:
        if "text" not in rows.column_names or tokenizer is None:
            raise ConfigError(
                f"{dataset_name} needs an 'input_ids' column, or a 'text' column and a task.model folder with a "
                "tokenizer"
            )

        def tokenize(row):
            ids = tokenizer(row["text"], truncation=True, max_length=task["seq_len"])["input_ids"]
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

        rows = rows.map(tokenize, remove_columns=rows.column_names)
    elif "labels" not in rows.column_names:
        rows = rows.map(lambda row: {"labels": list(row["input_ids"]), "attention_mask": [1] * len(row["input_ids"])})
    num_eval = min(task["num_eval_samples"], len(rows) // 5)
    if num_eval < 1:
        raise ConfigError(f"{dataset_name} has {len(rows)} rows; lrbench needs at least 5 (train + eval split)")
    split = rows.train_test_split(test_size=num_eval, seed=seed)
    return make_model, split["train"], split["test"]


def _builtin_task(config: Mapping) -> Callable:
    """The ``task:`` section as a trainer factory: a ``BatchRampTrainer`` with ``training:`` as its arguments."""
    from transformers import TrainingArguments

    from ..trainer import BatchRampTrainer

    seed = int(config["seed"])
    make_model, train_dataset, eval_dataset = _build_task(config["task"], seed)

    def make_trainer(policy: Mapping, max_steps: int, eval_steps: int, run_dir: str):
        arguments = {
            "output_dir": run_dir,
            "eval_strategy": "steps",
            "eval_steps": eval_steps,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "seed": seed,
            "data_seed": seed,
        }
        arguments.update(config["training"])  # the config's training section wins (e.g. report_to)
        arguments["max_steps"] = max_steps
        try:
            args = TrainingArguments(**arguments)
        except TypeError as error:
            raise ConfigError(f"training section: {error}; use TrainingArguments field names") from None
        return BatchRampTrainer(
            model=make_model(),
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            lr_policy=dict(policy),
        )

    return make_trainer


def _recipe_task(config: Mapping) -> Callable:
    """The ``recipe:`` section as a trainer factory: ``parse_config`` -> seed -> ``load_model_and_tokenizer`` ->
    ``build_trainer``, the data loaded and tokenised once and shared by every run."""
    from transformers import set_seed

    from ..recipe import build_trainer, load_data, load_model_and_tokenizer, parse_config

    data: list = []

    def make_trainer(policy: Mapping, max_steps: int, eval_steps: int, run_dir: str):
        args = parse_config(recipe_run_config(config, policy, max_steps, eval_steps, run_dir))
        set_seed(args.training.seed)  # the LoRA init draws from the global RNG: the same adapters for everyone
        model, tokenizer = load_model_and_tokenizer(args)
        if not data:
            train_dataset, eval_dataset = load_data(args, tokenizer)
            if eval_dataset is None or len(eval_dataset) == 0:
                raise ConfigError(
                    "the recipe has no eval data (eval_fraction: 0 and no eval_split); lrbench ranks on held-out "
                    "loss: set eval_fraction or eval_split under recipe_overrides"
                )
            data.extend((train_dataset, eval_dataset))
        return build_trainer(args, model, tokenizer, *data)

    return make_trainer


def build_task(config: Mapping) -> Callable:
    """The trainer factory of a loaded lrbench config (``load_lrbench_config``): ``recipe:`` or ``task:``.

    Returns:
        `Callable`: ``make_trainer(policy, max_steps, eval_steps, run_dir)`` returning a fresh ``Trainer`` (same
        initialisation, data and data order on every call) that applies ``policy`` for ``max_steps`` updates and
        evaluates on its ``eval_dataset`` every ``eval_steps``.
    """
    return _recipe_task(config) if config.get("recipe") is not None else _builtin_task(config)


def _sharpness(model, trainer, eval_dataset) -> float | None:
    try:
        from ..probes.sharpness import estimate_sharpness
    except ImportError:
        return None
    batch = next(iter(trainer.get_eval_dataloader(eval_dataset)))
    batch = trainer._prepare_inputs(batch)
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


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("rank", "name", "utility", "round", *METRIC_NAMES)


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_reports(ranking: list[CandidateResult], all_runs: list[CandidateResult], config: Mapping, output_dir: str):
    """Write ``results.md``, ``results.csv``, ``results.json``, ``lr_curves.png`` and ``loss_curves.png``."""
    from .plots import plot_curves

    rows = [
        {"rank": i + 1, "name": r.name, "utility": r.utility, "round": r.round, **r.metrics()}
        for i, r in enumerate(ranking)
    ]
    paths = {
        name: os.path.join(output_dir, name)
        for name in ("results.md", "results.csv", "results.json", "lr_curves.png", "loss_curves.png")
    }
    with open(paths["results.csv"], "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["results.json"], "w") as file:
        json.dump(
            {
                "rank_by": config["rank_by"],
                "rank_mode": config["rank_mode"],
                "ranking": rows,
                "runs": [asdict(run) for run in all_runs],
                "config": config,
            },
            file,
            indent=2,
            default=str,
        )
    lines = [
        "# LRBench results",
        "",
        f"Ranked by `{config['rank_by']}` ({'lower' if config['rank_mode'] == 'min' else 'higher'} is better)"
        + (", successive halving" if config["halving"] else "")
        + f"; {config['training']['max_steps']} optimizer updates in the first round, seed {config['seed']}.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    lines += ["| " + " | ".join(_format(row[column]) for column in TABLE_COLUMNS) + " |" for row in rows]
    lines += ["", "Policies:", ""]
    lines += [f"- `{r.name}`: `{json.dumps(r.policy)}`" for r in ranking]
    with open(paths["results.md"], "w") as file:
        file.write("\n".join(lines) + "\n")
    final_runs = {r.name: r for r in ranking}
    plot_curves(
        {name: (range(1, len(r.curves["lr"]) + 1), r.curves["lr"]) for name, r in final_runs.items()},
        paths["lr_curves.png"],
        title="Learning rate (group 0) per optimizer update",
        xlabel="optimizer update",
        ylabel="learning rate",
    )
    plot_curves(
        {name: tuple(zip(*r.curves["train_loss"])) for name, r in final_runs.items()},
        paths["loss_curves.png"],
        title="Training loss (solid) and eval loss (dashed, markers)",
        xlabel="optimizer update",
        ylabel="loss",
        extra={name: tuple(zip(*r.curves["eval_loss"])) for name, r in final_runs.items()},
    )
    return paths
