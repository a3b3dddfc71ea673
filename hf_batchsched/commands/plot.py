"""``hf-batchsched plot``: draw an LR policy and a batch-size schedule over a run, and print a short table.

Both are read from flags or from a YAML file with ``lr_policy:`` and ``batch_schedule:`` sections (or an
``equivalent_to_lr:`` section that turns the LR policy's decay into batch growth, Smith et al. 2018, or a
``seesaw:`` section, Meterez et al. 2025: LR x sqrt(a) and batch x 1/a where the policy decays by a; a
``batch_schedule: {name: seesaw, ...}`` is drawn the same way)::

    hf-batchsched plot --example                                   # the shipped Smith-style CIFAR-10 example
    hf-batchsched plot --config hf_batchsched/examples/schedule.yaml --output smith.png
    hf-batchsched plot --lr-policy COS --lr-param k0=0 --lr-param k1=1e-4 --lr-param l=1e6 --lr-unit samples \\
        --batch "0:32 200K:64 500K:128" --samples 1M --json
    hf-batchsched plot --lr-policy cosine --lr-param total=1M --lr-unit samples --seesaw 64 --max-batch-size 512 \
        --samples 1M

The PNG has two panels against samples seen: the learning rate and the global batch size. The table has one row
per tenth of the run: progress, samples (and epochs with a dataset size), LR, batch size, optimizer steps so far.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from ..schedules.batch import ConstantBatch, parse_quantity
from ..schedules.batch_config import batch_schedule_from_config
from ..schedules.lr_config import lr_policy_from_config, lr_policy_to_config
from ..schedules.seesaw_pair import SeesawBatch, check_seesaw_pair, seesaw
from ..schedules.simulate import simulate
from ..schedules.smith import equivalent_to_lr

__all__ = ["HELP", "EXAMPLE_CONFIG", "add_arguments", "load_plot_config", "run"]

HELP = "Plot an LR policy and a batch-size schedule over a run (PNG + table, or --json)."

EXAMPLE_CONFIG = "examples/schedule.yaml"
_TOP_LEVEL_KEYS = {
    "lr_policy",
    "batch_schedule",
    "equivalent_to_lr",
    "seesaw",
    "samples",
    "epochs",
    "dataset_size",
    "tokens_per_sample",
    "base_lr",
    "multiple",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("what to plot (a config file, or flags; flags override the file)")
    source.add_argument("--config", help="YAML with lr_policy:, batch_schedule: (or equivalent_to_lr:) and run keys")
    source.add_argument(
        "--example", action="store_true", help="use the shipped example config (Smith et al. CIFAR-10)"
    )
    source.add_argument("--lr-policy", help="LR policy name, e.g. NSTEP, COS, cosine, wsd")
    source.add_argument(
        "--lr-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="LR policy parameter (repeat): k0=0.1",
    )
    source.add_argument("--lr-unit", help="the LR policy's unit: steps, samples, tokens or fraction (default steps)")
    source.add_argument("--base-lr", type=float, help="optimizer LR for multiplier policies (default 1)")
    source.add_argument("--batch", help="batch schedule: a size ('64') or Megatron thresholds ('0:32 2M:64 8M:128')")
    source.add_argument("--batch-unit", choices=["samples", "tokens"], help="unit of --batch thresholds")
    source.add_argument("--multiple", type=int, help="round batch sizes down to multiples of micro_batch x world_size")
    source.add_argument(
        "--equivalent-batch",
        type=int,
        metavar="B0",
        help="turn the LR policy's decay into batch growth from B0 (Smith et al.); needs --dataset-size",
    )
    source.add_argument(
        "--seesaw",
        type=int,
        metavar="B0",
        help="Seesaw from B0: LR x sqrt(a), batch x 1/a where the policy decays by a",
    )
    source.add_argument("--seesaw-factor", type=int, help="Seesaw's batch growth per jump (default 2)")
    source.add_argument(
        "--max-batch-size", type=int, help="cap for --seesaw, or --equivalent-batch (default dataset_size // 10)"
    )
    source.add_argument("--optimizer", choices=["sgd", "adam"], help="scaling rule for --equivalent-batch")
    run_group = parser.add_argument_group("the run")
    run_group.add_argument("--samples", help="samples in the run (K/M/B suffixes), default epochs x dataset size")
    run_group.add_argument("--dataset-size", help="training samples per epoch (shows epochs; K/M suffixes)")
    run_group.add_argument("--epochs", type=float, help="epochs in the run (with --dataset-size)")
    run_group.add_argument("--tokens-per-sample", type=float, help="tokens per sample, for tokens-unit schedules")
    output = parser.add_argument_group("output")
    output.add_argument("--output", default="schedule.png", help="PNG path (default schedule.png)")
    output.add_argument("--no-png", action="store_true", help="print the table only")
    output.add_argument("--rows", type=int, default=11, help="table rows, evenly spaced in progress (default 11)")
    output.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")


# --------------------------------------------------------------------------------------------------
# Building the run from a config / flags
# --------------------------------------------------------------------------------------------------


def load_plot_config(path: str | Path) -> dict:
    """Read a plot config (YAML) and check its top-level keys."""
    import yaml

    text = Path(path).read_text()
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a mapping with lr_policy: and batch_schedule: sections")
    unknown = sorted(set(config) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(_TOP_LEVEL_KEYS))}"
        )
    return config


def _parse_param(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--lr-param takes KEY=VALUE (e.g. k0=0.1), got {text!r}")
    return key.strip(), _with_suffixes(yaml.safe_load(value))


def _with_suffixes(value):
    """Read K/M/B/T suffixes on lengths (``l=2M``, ``l=[3M, 6M]``); leave other strings (names) alone."""
    if isinstance(value, list):
        return [_with_suffixes(item) for item in value]
    if isinstance(value, str):
        try:
            return parse_quantity(value)
        except ConfigError:
            return value
    return value


def _override(section: dict | None, **flags) -> dict:
    """A copy of the config ``section`` with the flags that were given (not ``None``) on top."""
    return {**(section or {}), **{key: value for key, value in flags.items() if value is not None}}


def _merge_flags(config: dict, args: argparse.Namespace) -> dict:
    config = dict(config)
    if args.lr_policy or args.lr_param or args.lr_unit:
        if args.lr_policy:
            lr_cfg = {"name": args.lr_policy}
        elif isinstance(config.get("lr_policy"), dict):
            lr_cfg = dict(config["lr_policy"])
        else:
            raise ConfigError("--lr-param and --lr-unit need --lr-policy NAME (or an lr_policy: section in --config)")
        lr_cfg.update(_parse_param(p) for p in args.lr_param)
        if args.lr_unit:
            lr_cfg["unit"] = args.lr_unit
        config["lr_policy"] = lr_cfg
    if args.batch is not None:
        config["batch_schedule"] = args.batch if not args.batch_unit else {"spec": args.batch, "unit": args.batch_unit}
    if args.seesaw is not None or args.seesaw_factor is not None or isinstance(config.get("seesaw"), dict):
        section = _override(
            config.get("seesaw"),
            base_batch_size=args.seesaw,
            max_batch_size=args.max_batch_size,
            factor=args.seesaw_factor,
        )
        if section:
            config["seesaw"] = section
    elif args.equivalent_batch is not None or args.max_batch_size is not None or args.optimizer is not None:
        config["equivalent_to_lr"] = _override(
            config.get("equivalent_to_lr"),
            base_batch_size=args.equivalent_batch,
            max_batch_size=args.max_batch_size,
            optimizer=args.optimizer,
        )
    for key in ("samples", "dataset_size", "epochs", "tokens_per_sample", "base_lr", "multiple"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    return config


def _count(config: dict, key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    number = parse_quantity(value)
    if number <= 0 or number != int(number):
        raise ConfigError(f"{key} must be a positive whole number, got {value!r}")
    return int(number)


def _build(config: dict) -> dict:
    """Turn a merged plot config into the LR policy, the batch schedule and the run's length."""
    dataset_size = _count(config, "dataset_size")
    total = _count(config, "samples")
    if total is None:
        if dataset_size is None or config.get("epochs") is None:
            raise ConfigError("give the run's length: --samples N, or --dataset-size N with --epochs E")
        total = int(round(float(config["epochs"]) * dataset_size))
    lr_policy = lr_policy_from_config(config["lr_policy"]) if config.get("lr_policy") is not None else None
    original_lr = None
    baseline = None
    batch_cfg = config.get("batch_schedule")
    if config.get("seesaw") is not None:
        if batch_cfg is not None or config.get("equivalent_to_lr") is not None:
            raise ConfigError("give one of batch_schedule (--batch), equivalent_to_lr or seesaw (--seesaw)")
        if lr_policy is None:
            raise ConfigError("seesaw (--seesaw) needs the base LR policy whose decay it converts (--lr-policy)")
        section = dict(config["seesaw"])
        missing = [key for key in ("base_batch_size", "max_batch_size") if key not in section]
        if missing:
            raise ConfigError(f"seesaw needs {' and '.join(missing)} (--seesaw B0, --max-batch-size)")
        section.setdefault("unit", lr_policy.unit if lr_policy.unit in ("samples", "tokens") else "samples")
        batch, pair_lr = seesaw(lr_policy, **section)
        baseline = ConstantBatch(batch.base_batch_size, unit=batch.unit)
        lr_policy, original_lr = pair_lr, lr_policy
    elif config.get("equivalent_to_lr") is not None:
        if batch_cfg is not None:
            raise ConfigError(
                "give either batch_schedule (--batch) or equivalent_to_lr (--equivalent-batch), not both"
            )
        if lr_policy is None:
            raise ConfigError("equivalent_to_lr (--equivalent-batch) needs an LR policy to convert (--lr-policy)")
        if dataset_size is None:
            raise ConfigError("equivalent_to_lr (--equivalent-batch) needs the dataset size (--dataset-size)")
        section = dict(config["equivalent_to_lr"])
        if "base_batch_size" not in section:
            raise ConfigError("equivalent_to_lr needs base_batch_size (B0, the original constant batch)")
        section.setdefault("unit", lr_policy.unit if lr_policy.unit in ("samples", "tokens") else "samples")
        batch, residual = equivalent_to_lr(lr_policy, dataset_size=dataset_size, **section)
        baseline = ConstantBatch(section["base_batch_size"], unit=batch.unit)
        lr_policy, original_lr = residual, lr_policy
    elif batch_cfg is None:
        raise ConfigError(
            "give a batch schedule: --batch '0:32 2M:64' (or batch_schedule: / equivalent_to_lr: in --config)"
        )
    elif isinstance(batch_cfg, dict) and "spec" in batch_cfg:
        batch = batch_schedule_from_config(batch_cfg["spec"], unit=batch_cfg.get("unit"))
    else:
        batch = batch_schedule_from_config(batch_cfg)
        if isinstance(batch, SeesawBatch):
            if lr_policy is not None:
                raise ConfigError(
                    "a seesaw batch_schedule carries its base LR policy; remove lr_policy (or use a seesaw: section)"
                )
            lr_policy, original_lr = check_seesaw_pair(batch, None, 1), batch.lr_policy
            baseline = ConstantBatch(batch.base_batch_size, unit=batch.unit)
    multiple = int(config.get("multiple") or 1)
    tokens_per_sample = config.get("tokens_per_sample")
    run = simulate(batch, total, multiple=multiple, tokens_per_sample=tokens_per_sample)
    baseline_run = simulate(baseline, total, tokens_per_sample=tokens_per_sample) if baseline else None
    base_lr = float(config.get("base_lr") if config.get("base_lr") is not None else 1.0)
    return {
        "lr_policy": lr_policy,
        "original_lr": original_lr,
        "batch": batch,
        "run": run,
        "baseline_run": baseline_run,
        "dataset_size": dataset_size,
        "base_lr": base_lr,
        "tokens_per_sample": tokens_per_sample,
    }


def _to_json(table: list[dict], built: dict, png: str | None) -> dict:
    from ..bench.common import jsonable

    run, batch = built["run"], built["batch"]
    try:
        batch_config = batch.to_config()
    except ConfigError:
        batch_config = None
    lr_policy = built["original_lr"] or built["lr_policy"]
    return {
        "samples": run.total_samples,
        "dataset_size": built["dataset_size"],
        "num_steps": run.num_steps,
        "dropped_samples": run.dropped_samples,
        "baseline_num_steps": built["baseline_run"].num_steps if built["baseline_run"] else None,
        "batch_schedule": batch_config,
        "batch_unit": batch.unit,
        "lr_policy": jsonable(lr_policy_to_config(lr_policy), non_finite=str) if lr_policy is not None else None,
        "lr_is_residual": built["original_lr"] is not None,
        "rows": table,
        "png": png,
    }


def run(args: argparse.Namespace) -> int:
    from ..bench.schedule_view import describe_run, draw_run, format_run_table

    if args.example and args.config:
        raise ConfigError("give --config FILE or --example, not both")
    config: dict = {}
    if args.example:
        config = load_plot_config(resources.files("hf_batchsched").joinpath(EXAMPLE_CONFIG))
    elif args.config:
        config = load_plot_config(args.config)
    built = _build(_merge_flags(config, args))
    table = describe_run(
        built["lr_policy"],
        built["run"],
        rows=args.rows,
        dataset_size=built["dataset_size"],
        base_lr=built["base_lr"],
        tokens_per_sample=built["tokens_per_sample"],
    )
    png = None if args.no_png else args.output
    if png:
        draw_run(built, png)
    if args.json:
        print(json.dumps(_to_json(table, built, png), indent=2))
    else:
        print(format_run_table(table, built))
        if png:
            print(f"wrote {png}")
    return 0
