"""The lrbench config: its defaults, the ranking utilities (registered, or a safely evaluated expression) and
``load_lrbench_config``, which reads, fills and validates a config (the keys are described in ``bench.lrbench``)."""

from __future__ import annotations

import ast
import math
import operator
import os
from collections.abc import Mapping

from ..errors import ConfigError, check_choice
from ..schedules.base import Registry

__all__ = [
    "DEFAULT_CONFIG",
    "METRIC_NAMES",
    "RECIPE_RUN_DEFAULTS",
    "UTILITIES",
    "evaluate_utility",
    "load_lrbench_config",
    "recipe_run_config",
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
    from ..schedules.lr_config import lr_policy_from_config

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
